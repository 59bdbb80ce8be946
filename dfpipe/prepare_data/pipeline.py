"""Stage 1: check the settings, list the inputs, decode what the work dir lacks, publish."""

from __future__ import annotations

from ..config import ConfigError, PrepareConfig
from ..io import work_dir
from ..layout import Layout
from ..data.faces import check_face_config
from .pool import decode_all
from .publish import publish
from .sources import SPLITS, collect_items
from .work import WORK_VERSION, Work, fingerprint


def run(cfg: PrepareConfig, layout: Layout) -> dict:
    """Run stage 1 on ``layout.data_root`` and return the report dict (also written to ``layout.prepare_report``)."""
    check_face_config(cfg.face_crop, cfg.face_margin, cfg.face_policy)
    if not 0 <= cfg.dup_max_distance <= 64:
        raise ConfigError(f"prepare_data.dup_max_distance={cfg.dup_max_distance}: must be in [0, 64]")
    if cfg.chunk_size < 1 or cfg.max_side < 0 or cfg.workers < 0:
        raise ConfigError(f"prepare_data: chunk_size ({cfg.chunk_size}) must be >= 1, max_side ({cfg.max_side}) and "
                          f"workers ({cfg.workers}) >= 0")
    col = collect_items(cfg, layout)
    sizes = {s: sum(1 for it in col.items if it.split == s) for s in SPLITS}
    journal = {"version": WORK_VERSION, "fingerprint": fingerprint(cfg, col.items), "n_items": sizes,
               "max_side": cfg.max_side, "chunk_size": cfg.chunk_size}
    work = Work.open(work_dir(layout.prepared), journal)
    decode_all(cfg, col.items, work)
    return publish(cfg, layout, col, work)
