"""Stage 2's reconstruction jobs: load or train the models, make each pair's images, store them as work files.

A pair is (real, reconstruction) of one source and one seed. Its real is the stored stage-1 image when
the pair is clean and small enough, else a new real image (job kind ``recon_real``) made from the same
seed: the pair's fit, resize and compression applied to the source (:mod:`.parity`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ...config import AugmentConfig, ReconstructConfig
from ...data.images import decode_image
from ...data.store import StoreReader
from ...workers import exit_with_parent
from ..dist import Dist
from ..plan import Job
from ..sources import Sources
from ..work import prepared_fingerprint, recon_batches, save_work
from . import RANDOM_AE, Context, Reconstructor, get_method, reconstruct, resolve_dtype, variant
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
    dtype = resolve_dtype(r.dtype, next(rec.model.parameters()).device)
    recs = reconstruct(rec, [fit(img, p) for img, p in zip(srcs, posts)], r.batch_size, dtype)
    out = []
    for made, post, raw in zip(recs, posts, raws):
        data, history = fake_bytes(made, raw, post)
        out.append((decode_image(data), {"reconstruct": rec.info, "dtype": dtype, "post": post.record(),
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
                  cache_dir=work / MODEL_DIR, key=prepared_fingerprint(sources.prepared_dir))
    models = {}
    train_first = RANDOM_AE in methods and dist.world > 1
    if train_first and dist.is_main:
        models[RANDOM_AE] = get_method(RANDOM_AE)(cfg.reconstruct, ctx)
    if train_first:
        dist.barrier()  # the others load what the main process trained
    for name in methods:
        if name not in models:
            models[name] = get_method(name)(cfg.reconstruct, ctx)
    for rec in (m for ms in models.values() for m in ms):
        rec.model.to(_device(dist))
    return models


def _device(dist: Dist) -> str:
    return dist.device or ("cuda" if torch.cuda.is_available() else "cpu")


_WORKER: dict = {}  # in a pool process: what _run_task needs (set by _init_worker)
MIN_IMAGES_PER_WORKER = 16  # fewer: a process's start-up and model loading outweigh the work
COPY_CHUNK = 16  # new real images per pool task


def _init_worker(cfg: AugmentConfig, jobs: list[Job], names: list[str], done: set[str], reals: pd.DataFrame,
                 sources: Sources, work: str, methods: list[str]) -> None:
    import cv2

    exit_with_parent()  # a killed stage 2 leaves no orphan worker
    torch.set_num_threads(1)  # one process per core: no thread oversubscription
    cv2.setNumThreads(1)
    models = load_models(cfg, methods, reals, sources, Path(work), Dist())  # random_ae: from the cache
    _WORKER.update(cfg=cfg, jobs=jobs, names=names, done=done, work=Path(work), models=models, src=RawSources(sources))


def _run_task(task: tuple[str, list[int]], state: dict | None = None) -> int:
    """One task: ("copy", job indices) new real images, or ("recon", a batch of job indices) fakes."""
    state = _WORKER if state is None else state
    kind, idx = task
    jobs, names, done, work, src = state["jobs"], state["names"], state["done"], state["work"], state["src"]
    r = state["cfg"].reconstruct
    if kind == "copy":
        for i in idx:
            raw = src.raw(jobs[i].source)
            img, params = real_copy(decode_image(raw), jobs[i].seed, r, raw)
            save_work(work / names[i], img, None, params)
        return len(idx)
    first = jobs[idx[0]]
    rec = state["models"][first.method][variant(first.method, first.seed, r)]
    raws = [src.raw(jobs[i].source) for i in idx]
    made = recon_fakes(rec, [decode_image(b) for b in raws], raws, [jobs[i].seed for i in idx], r)
    for i, (fake, params) in zip(idx, made):
        if names[i] not in done:
            save_work(work / names[i], fake, None, params)
    return len(idx)


def n_processes(requested: int, n_images: int, world: int, device: str) -> int:
    """Reconstruction processes: ``requested`` (0 = this process's share of the cores); 1 on a GPU."""
    if device != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = requested or max(1, cores // max(1, world))
    return max(1, min(wanted, n_images // MIN_IMAGES_PER_WORKER))


def run_reconstruct(cfg: AugmentConfig, jobs: list[Job], names: list[str], done: set[str], reals: pd.DataFrame,
                    sources: Sources, work: Path, dist: Dist) -> int:
    """This process's share of the pending reconstruction pairs, stored in ``work``; the number of images made.

    Every process calls it (it may hold a barrier), also those with nothing to make. On CPU the work runs
    in ``cfg.workers`` single-threaded processes (0 = this process's share of the cores): on a shared
    machine one thread per process keeps its speed where two threads of one process wait on each other.
    """
    batches = [b for b in recon_batches(jobs, cfg) if any(names[i] not in done for i in b)]
    copies = [i for i, j in enumerate(jobs) if j.kind == "recon_real" and names[i] not in done]
    methods = sorted({jobs[b[0]].method for b in batches})  # the same on every process
    if not batches and not copies:
        return 0
    my_batches, my_copies = dist.shard(batches), dist.shard(copies)
    models = load_models(cfg, methods, reals, sources, work, dist) if methods else {}  # trains random_ae once
    tasks = [("copy", my_copies[s:s + COPY_CHUNK]) for s in range(0, len(my_copies), COPY_CHUNK)]
    tasks += [("recon", b) for b in my_batches]
    n = sum(len(b) for b in my_batches) + len(my_copies)
    n_proc = n_processes(cfg.workers, n, dist.world, _device(dist))
    log.info("%sreconstruct: %d images (%d pairs' fakes, %d new reals) with %s, %d process(es)", dist.tag(), n,
             n - len(my_copies), len(my_copies), methods, n_proc)
    with tqdm(total=n, desc=f"{dist.tag()}augment reconstruct", unit="img") as bar:
        if n_proc == 1:
            state = {"cfg": cfg, "jobs": jobs, "names": names, "done": done, "work": work, "models": models,
                     "src": RawSources(sources)}
            for task in tasks:
                bar.update(_run_task(task, state))
            return n
        ctx = multiprocessing.get_context("spawn")  # torch may be initialised here: never fork
        args = (cfg, jobs, names, done, reals, sources, str(work), methods)
        with ctx.Pool(n_proc, initializer=_init_worker, initargs=args) as pool:
            for k in pool.imap_unordered(_run_task, tasks):
                bar.update(k)
    return n


def regenerate_pair_image(method: str, params: dict, raw: bytes) -> np.ndarray:
    """One reconstruction row's image again, from its source's stored bytes and its recorded ``params``."""
    from ...errors import ConfigError
    from .parity import Post

    post = params["post"]
    post = Post(**{**post, "fit": tuple(post["fit"]) if post["fit"] else None})
    img = decode_image(raw)
    if method == "recon_real":
        return decode_image(real_bytes(raw, img, post))
    if method == RANDOM_AE:
        raise ConfigError("a random_ae row cannot be regenerated from the manifest alone: its model's weights are "
                          "in the stage output's reconstruct/ folder")
    r = ReconstructConfig(vae_model=str(params["reconstruct"].get("model", "")) if method == "vae" else "")
    rec = get_method(method)(r, Context())[0]
    made = reconstruct(rec, [fit(img, post)], 1, params.get("dtype", "float32"))[0]
    return decode_image(fake_bytes(made, raw, post)[0])
