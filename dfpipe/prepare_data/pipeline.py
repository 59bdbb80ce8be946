"""Stage 1: list the inputs, decode what the work dir lacks, publish (the settings are checked when they are made:
:class:`dfpipe.config.PrepareConfig`)."""

from __future__ import annotations

from ..config import PrepareConfig
from ..data.preprocess import Stage1
from ..io import work_dir
from ..layout import Layout
from .pool import decode_all
from .publish import publish
from .sources import SPLITS, collect_items
from .work import WORK_VERSION, Work, fingerprint


def run(cfg: PrepareConfig, layout: Layout) -> dict:
    """Run stage 1 on ``layout.data_root`` and return the report dict (also written to ``layout.prepare_report``)."""
    s1 = stage1_of(cfg)  # made once: the workers make these images, the store records them
    col = collect_items(cfg, layout)
    sizes = {s: sum(1 for it in col.items if it.split == s) for s in SPLITS}
    path = work_dir(layout.prepared)
    journal = {"version": WORK_VERSION, "fingerprint": fingerprint(cfg, col.items), "n_items": sizes,
               "max_side": cfg.max_side, "chunk_size": cfg.chunk_size}
    work = Work.open(path, journal)
    decode_all(s1, col.items, work, cfg.workers)
    return publish(layout, col, work, s1, cfg.dup_max_distance)


def stage1_of(cfg: PrepareConfig) -> Stage1:
    """The stage-1 part of the preprocessing contract, from stage 1's settings."""
    return Stage1(max_side=cfg.max_side, face_crop=cfg.face_crop, face_margin=cfg.face_margin,
                  face_policy=cfg.face_policy, max_pixels=cfg.max_pixels, min_side=cfg.min_side)
