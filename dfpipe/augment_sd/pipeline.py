"""Stage 2: generated training images from the real images of the prepared train and val splits.

Three kinds of rows, all derived from real (label 0) train/val images (stage 3 re-splits train+val by
cluster, so both splits are sources), read at their native size from the prepared image store
(:mod:`dfpipe.data.store`); every generated image has its source's exact size:

* editing forgeries (label 1): :data:`editing.METHODS`, chosen by ``cfg.methods`` weights;
* widened reals (label 0): JPEG/resize/blur/noise/colour copies, so degradation is not a fake cue;
* Stable Diffusion fakes (label 1): only when ``cfg.diffusion.model`` is set;
* reconstruction fakes (label 1): reals through an autoencoder, only when ``cfg.reconstruct.per_real`` > 0,
  each with a new real image (label 0, ``recon_real``) when its pair's post-processing changed the real
  (:mod:`dfpipe.augment_sd.reconstruct`). A pair's two rows share ``source_uid`` and ``seed``.

Every row has its own integer seed (derived from ``cfg.seed``, the row's kind and index), so the
same config gives the same bytes and :func:`regenerate` rebuilds any row from the manifest alone.

Several processes (GPUs)::

    accelerate launch --num_processes 4 02_augment_sd.py   # 4 GPUs (or: torchrun --nproc_per_node 4 ...)
    torchrun --standalone --nproc_per_node 2 02_augment_sd.py  # CPU-only: gloo (accelerate's --cpu is 1 process)

Every process plans the same job list, takes every ``world``-th pending editing image (each with
``workers`` pool processes, 0 = its share of the cores) and every ``world``-th pending diffusion batch
(on its own device, ``cuda:<local rank>``), and stores each finished image in the work dir. After a
barrier the main process merges the work files, in plan order, into ``out_dir``; the output does not
depend on the number of processes. A plain ``python 02_augment_sd.py`` is the one-process case of the
same code. All processes must see the same filesystem (one machine, or a shared disk).

Resuming: ``<out_dir>.work/`` holds one ``.npz`` per finished image (PNG-encoded by the process that made
it), written atomically and named by a hash of everything its bytes depend on (source and donor uids,
seed, method, the prepared manifest and ``store.json``, for ``self_blend`` the landmark detector and, for
diffusion, the diffusion settings and the batch it is made in). A killed run rerun with the same config
makes only the missing images and gives the same bytes; work made under another config is never reused.
The work dir is removed once ``out_dir`` is written.

Output (``layout.augmented``, replaced as a whole; it is a DVC output), an image store like stage 1's:
  aug-000000.bin    the generated images as lossless PNGs (their exact pixels), up to 1024 per shard,
  aug-000000.idx.npy  with the shard's index (:mod:`dfpipe.data.store`); a row's image is
                    (``cache_file`` = shard name, ``cache_index`` = position in the shard)
  store.json        the prepared folder's stage-1 record (generated images are stage-1 images too)
  manifest.csv      uid,img_name,label,source_uid,donor_uid,method,params,seed,mask_path,cache_file,cache_index
  masks/<stem>.png  uint8 mask of the changed pixels (0 = untouched), fakes only, of the image's size
  contact_sheet.png one row per method: fake with its mask outlined, source | fake | |diff| zoomed on the edit
                    (:mod:`.sheet`), under a row of column titles
  summary.json      counts (also returned by :func:`run`)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..config import AugmentConfig, DiffusionConfig
from ..data.store import read_store_record
from ..errors import ConfigError, DataError
from ..io import work_dir
from ..layout import Layout
from .dist import Dist, get_dist
from .generate import edit_chunk, edit_one, init_worker, prompt_embeds, sd_batch, worker_state
from .output import assemble
from .plan import WIDEN, Job, plan_jobs
from .sources import Sources, load_reals
from .work import save_work, sd_batches, work_names

log = logging.getLogger(__name__)
EDIT_CHUNK = 16  # editing images per pool task
MIN_JOBS_PER_WORKER = 256  # fewer images per process: its start-up (~1 s) outweighs the work

__all__ = ["EDIT_CHUNK", "MIN_JOBS_PER_WORKER", "WIDEN", "edit_one", "n_workers", "run", "sd_batch"]


def n_workers(requested: int, n_tasks: int, world: int = 1) -> int:
    """Editing processes: ``requested`` (0 = this process's share of the cores), fewer for small runs."""
    if requested < 0:
        raise ConfigError(f"augment_sd.workers must be >= 0 (0 = all cores), got {requested}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = requested or max(1, cores // max(1, world))
    return max(1, min(wanted, n_tasks // MIN_JOBS_PER_WORKER))


def _run_edits(tasks: list[tuple[Job, str]], sources: Sources, image: Callable[[int], np.ndarray], work: Path,
               workers: int, dist: Dist, landmarks: str = "none") -> None:
    """Editing fakes and widened reals, in this process (1 worker, reading with ``image``) or a spawn pool (each
    process with its own reader of ``sources``); same bytes either way."""
    if not tasks:
        return
    chunks = [tasks[s:s + EDIT_CHUNK] for s in range(0, len(tasks), EDIT_CHUNK)]
    n_proc = n_workers(workers, len(tasks), dist.world)
    log.info("%saugment: %d editing images with %d process(es)", dist.tag(), len(tasks), n_proc)
    with tqdm(total=len(tasks), desc=f"{dist.tag()}augment edit", unit="img") as bar:
        if n_proc == 1:
            state = worker_state(image, work, landmarks)
            for chunk in chunks:
                bar.update(edit_chunk(chunk, state))
            return
        # spawn, not fork: torch/CUDA may already be initialised in this process (diffusion pipeline).
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(n_proc, initializer=init_worker, initargs=(sources, str(work), landmarks)) as pool:
            for n in pool.imap_unordered(edit_chunk, chunks):
                bar.update(n)


def run(cfg: AugmentConfig, layout: Layout, dist: Dist | None = None) -> dict:
    """Run stage 2 from ``layout.prepared`` into ``layout.augmented`` (this process's shard under a launcher, see
    the module docstring).

    Returns the summary counts (also written to ``<augmented>/summary.json``) on the main process; other
    processes return ``{"rank": r, "world": w, "generated": n}`` once their shard is stored.
    """
    dist = dist or get_dist()
    reals = load_reals(layout.prepared)
    sources = Sources.from_reals(layout.prepared, reals)
    image = sources.reader()  # this process's reader of the reals: in-process editing, diffusion, the merge
    # read once: a clear error for a folder that is not a stage-1 image store, and the output's store.json (its
    # images are stage-1 images of the same contract)
    stage1 = read_store_record(layout.prepared)
    jobs = plan_jobs(cfg, len(reals), _sizes(reals) if cfg.reconstruct.per_real else None)  # validates the config
    names = work_names(jobs, reals, cfg, layout.prepared)
    work = work_dir(layout.augmented)
    done = {p.name for p in work.glob("*.npz")} if work.is_dir() else set()
    edit_todo = [(j, n) for j, n in zip(jobs, names) if j.kind in ("edit", "widen") and n not in done]
    sd_todo = [b for b in sd_batches(jobs, cfg.diffusion.batch_size) if any(names[i] not in done for i in b)]
    n_done = sum(n in done for n in names)
    if n_done and dist.is_main:
        log.info("augment: resuming from %s: %d of %d images already made", work, n_done, len(jobs))
    if not cfg.diffusion.model and dist.is_main:
        log.info("diffusion fakes skipped: no model configured")
    my_edits, my_sd = dist.shard(edit_todo), dist.shard(sd_todo)
    pipe = _load_diffusion(cfg.diffusion, dist.device) if my_sd else None  # fail fast, before hours of editing
    if dist.is_main:
        log.info("augment: %d real sources -> %d images, %d to make", len(reals), len(jobs), len(jobs) - n_done)
        work.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # every process has listed `done` before anyone writes, and the work dir exists
    _run_edits(my_edits, sources, image, work, cfg.workers, dist, cfg.landmarks)
    if my_sd:
        _run_diffusion(pipe, cfg.diffusion, my_sd, jobs, names, done, image, work, dist)
    n_mine = len(my_edits) + sum(len(b) for b in my_sd)
    if cfg.reconstruct.per_real:
        from .reconstruct.stage import run_reconstruct

        n_mine += run_reconstruct(cfg, jobs, names, done, reals, sources, work, dist)
    dist.barrier()  # every shard is stored
    if not dist.is_main:
        return {"rank": dist.rank, "world": dist.world, "generated": n_mine}
    summary = assemble(cfg, layout, jobs, names, reals, image, work, stage1)
    shutil.rmtree(work, ignore_errors=True)
    log.info("augment: wrote %d images to %s %s", summary["n_images"], layout.augmented, summary["by_method"])
    return summary


def _sizes(reals: pd.DataFrame) -> list[tuple[int, int]]:
    """(h, w) of each real from the stage-1 manifest (a pair's fit to ``max_side`` is planned from it)."""
    if not {"width", "height"} <= set(reals.columns):
        raise DataError("the prepared manifest has no width/height columns (an old stage 1): rerun stage 1 "
                        "to use augment_sd.reconstruct")
    return list(zip(reals.height.astype(int), reals.width.astype(int)))


def _load_diffusion(d: DiffusionConfig, device: str | None = None) -> Any:
    from .diffusion import load_pipeline

    return load_pipeline(d.model, d.mode, d.dtype, device)


def _run_diffusion(pipe: Any, d: DiffusionConfig, batches: list[list[int]], jobs: list[Job], names: list[str],
                   done: set[str], image: Callable[[int], np.ndarray], work: Path, dist: Dist) -> None:
    """This process's diffusion batches; images of a batch already stored are not written again."""
    n = sum(len(b) for b in batches)
    log.info("%sdiffusion: %d %s fakes with %s on %s", dist.tag(), n, d.mode, d.model, pipe.device)
    embeds = prompt_embeds(pipe)
    with tqdm(total=n, desc=f"{dist.tag()}augment sd_{d.mode}", unit="img") as bar:
        for batch in batches:
            srcs = [image(jobs[i].source) for i in batch]
            made = sd_batch(pipe, d, srcs, [jobs[i].seed for i in batch], embeds)
            for i, (fake, mask, params) in zip(batch, made):
                if names[i] not in done:
                    save_work(work / names[i], fake, mask, params)
            bar.update(len(batch))

