"""Stage 2's reconstruction jobs: load or train the models, make each pair's images, store them as work files.

A pair is (real, reconstruction) of one source and one seed. Its real is the stored stage-1 image when
the pair is clean and small enough, else a new real image (job kind ``recon_real``) made from the same
seed: the pair's fit, resize and compression applied to the source (:mod:`.parity`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ...config import AugmentConfig, ReconstructConfig
from ...data.images import decode_image
from ...data.store import StoreReader
from ..dist import Dist
from ..plan import Job
from ..sources import Sources
from ..work import _prepared_fingerprint, recon_batches, save_work
from . import RANDOM_AE, Context, Reconstructor, get_method, reconstruct, variant
from .parity import draw_post, fake_bytes, fit, jpeg_history, real_bytes

log = logging.getLogger(__name__)
MODEL_DIR = "models"  # trained random autoencoders, inside the work dir (resume) and the output


class RawSources:
    """The stored bytes of each real (its JPEG history) and the image they decode to."""

    def __init__(self, sources: Sources) -> None:
        self.sources, self.store = sources, StoreReader()

    def raw(self, k: int) -> bytes:
        return self.store.read(Path(self.sources.prepared_dir) / self.sources.files[k], self.sources.indices[k])


def real_copy(img: np.ndarray, seed: int, r: ReconstructConfig, raw: bytes) -> tuple[np.ndarray, dict]:
    """The pair's real image: the source after the pair's fit, resize and compression."""
    post = draw_post(seed, r, *img.shape[:2])
    history = jpeg_history(raw)
    out = decode_image(real_bytes(raw, img, post))
    return out, {"post": post.record(), "source_history": None if history is None else history.record()}


def recon_fakes(rec: Reconstructor, srcs: list[np.ndarray], raws: list[bytes], seeds: list[int],
                r: ReconstructConfig) -> list[tuple[np.ndarray, dict]]:
    """Reconstructions of a batch of reals with their pair's history: (fake, params) each."""
    posts = [draw_post(s, r, *img.shape[:2]) for s, img in zip(seeds, srcs)]
    recs = reconstruct(rec, [fit(img, p) for img, p in zip(srcs, posts)], r.batch_size)
    out = []
    for made, post, raw in zip(recs, posts, raws):
        data, history = fake_bytes(made, raw, post)
        out.append((decode_image(data), {"reconstruct": rec.info, "post": post.record(),
                                         "parity": None if history is None else history.record()}))
    return out


def _train_images(reals: pd.DataFrame, sources: Sources, r: ReconstructConfig, seed: int
                  ) -> Callable[[], list[np.ndarray]]:
    def load() -> list[np.ndarray]:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 102]))
        pick = np.sort(rng.permutation(len(reals))[:r.ae_train_images])
        image = sources.reader()
        return [image(int(k)) for k in pick]
    return load


def load_models(cfg: AugmentConfig, methods: list[str], reals: pd.DataFrame, sources: Sources, work: Path,
                dist: Dist) -> dict[str, list[Reconstructor]]:
    """The models of ``methods``; random autoencoders are trained once (main process) and cached in ``work``."""
    ctx = Context(seed=cfg.seed, train_images=_train_images(reals, sources, cfg.reconstruct, cfg.seed),
                  cache_dir=work / MODEL_DIR, key=_prepared_fingerprint(cfg.prepared_dir))
    models = {}
    train_first = RANDOM_AE in methods and dist.world > 1
    if train_first and dist.is_main:
        models[RANDOM_AE] = get_method(RANDOM_AE)(cfg.reconstruct, ctx)
    if train_first:
        dist.barrier()  # the others load what the main process trained
    for name in methods:
        if name not in models:
            models[name] = get_method(name)(cfg.reconstruct, ctx)
    device = dist.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for rec in (m for ms in models.values() for m in ms):
        rec.model.to(device)
    return models


def run_reconstruct(cfg: AugmentConfig, jobs: list[Job], names: list[str], done: set[str], reals: pd.DataFrame,
                    sources: Sources, work: Path, dist: Dist) -> int:
    """This process's share of the pending reconstruction pairs, stored in ``work``; the number of images made.

    Every process calls it (it may hold a barrier), also those with nothing to make.
    """
    r = cfg.reconstruct
    batches = [b for b in recon_batches(jobs, cfg) if any(names[i] not in done for i in b)]
    copies = [i for i, j in enumerate(jobs) if j.kind == "recon_real" and names[i] not in done]
    methods = sorted({jobs[b[0]].method for b in batches})  # the same on every process
    if not batches and not copies:
        return 0
    my_batches, my_copies = dist.shard(batches), dist.shard(copies)
    models = load_models(cfg, methods, reals, sources, work, dist) if methods else {}
    src = RawSources(sources)
    n = sum(len(b) for b in my_batches) + len(my_copies)
    log.info("%sreconstruct: %d images (%d pairs' fakes, %d new reals) with %s", dist.tag(), n,
             n - len(my_copies), len(my_copies), methods)
    with tqdm(total=n, desc=f"{dist.tag()}augment reconstruct", unit="img") as bar:
        for i in my_copies:
            raw = src.raw(jobs[i].source)
            img, params = real_copy(decode_image(raw), jobs[i].seed, r, raw)
            save_work(work / names[i], img, None, params)
            bar.update(1)
        for batch in my_batches:
            first = jobs[batch[0]]
            rec = models[first.method][variant(first.method, first.seed, r)]
            raws = [src.raw(jobs[i].source) for i in batch]
            made = recon_fakes(rec, [decode_image(b) for b in raws], raws, [jobs[i].seed for i in batch], r)
            for i, (fake, params) in zip(batch, made):
                if names[i] not in done:
                    save_work(work / names[i], fake, None, params)
            bar.update(len(batch))
    return n
