"""Stage 2: generated training images from the real images of the prepared train and val splits.

Three kinds of rows, all derived from real (label 0) train/val images (stage 3 re-splits train+val by
cluster, so both splits are sources):

* editing forgeries (label 1): :data:`editing.METHODS`, chosen by ``cfg.methods`` weights;
* widened reals (label 0): JPEG/resize/blur/noise/colour copies, so degradation is not a fake cue;
* Stable Diffusion fakes (label 1): only when ``cfg.diffusion.model`` is set.

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

Resuming: ``<out_dir>.work/`` holds one ``.npz`` per finished image, written atomically and named by a
hash of everything its bytes depend on (source and donor uids, seed, method, image size, the prepared
manifest and, for diffusion, the diffusion settings and the batch it is made in). A killed run
rerun with the same config makes only the missing images and gives the same bytes; work made under
another config is never reused. The work dir is removed once ``out_dir`` is written.

Output (``cfg.out_dir``, replaced as a whole; it is a DVC output):
  images.npy        uint8 (M, S, S, 3) RGB, S = the prepared cache size, row = ``cache_index``
  manifest.csv      uid,img_name,label,source_uid,donor_uid,method,params,seed,mask_path,cache_file,cache_index
  masks/<stem>.png  uint8 mask of the changed pixels (0 = untouched), fakes only
  contact_sheet.png one row per method: source | fake | mask examples
  summary.json      counts (also returned by :func:`run_augment`)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ..config import AugmentConfig, DiffusionConfig
from ..data.samples import load_manifest
from ..io import work_dir, write_csv, write_json
from .dist import Dist, get_dist
from .editing import METHODS, NEEDS_DONOR, get_method, region_mask
from .real import widen_real

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["uid", "img_name", "label", "source_uid", "donor_uid", "method", "params", "seed",
                    "mask_path", "cache_file", "cache_index"]
CACHE_FILE = "images.npy"
WIDEN = "widen_real"
SD_PREFIX = "sd_"
# Seed streams: a row's seed depends on (cfg.seed, stream, index) only.
_STREAMS = {"plan": 0, "edit": 1, "widen": 2, "sd": 3}
WORK_VERSION = 1  # bump when a change makes old work files wrong (part of every work file's key)
EDIT_CHUNK = 16  # editing images per pool task
MIN_JOBS_PER_WORKER = 256  # fewer images per process: its start-up (~1 s) outweighs the work


@dataclass(frozen=True)
class Job:
    """One image to generate: ``source``/``donor`` index the real-image table (-1 = no donor)."""

    kind: str  # edit | widen | sd
    method: str
    source: int
    donor: int
    seed: int


# --------------------------------------------------------------------------- inputs
def load_reals(prepared_dir: str | Path) -> pd.DataFrame:
    """Decodable real (label 0) images of the train and val splits, sorted by uid."""
    path = Path(prepared_dir) / "manifest.csv"
    man = load_manifest(prepared_dir)  # decodable images only; clear error when stage 1 has not run
    missing = {"uid", "split", "label", "cache_file", "cache_index"} - set(man.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    reals = man[man.split.isin(["train", "val"]) & (man.label.astype(int) == 0)]
    if reals.empty:
        raise ValueError(f"{path}: no real (label 0) image in the train or val split: nothing to augment from")
    return reals.sort_values("uid", kind="stable").reset_index(drop=True)


class CacheReader:
    """Read rows of the prepared ``.npy`` caches (memory-mapped once per file)."""

    def __init__(self, prepared_dir: str | Path) -> None:
        self.dir = Path(prepared_dir)
        self._maps: dict[str, np.ndarray] = {}

    def get(self, cache_file: str, index: int) -> np.ndarray:
        if cache_file not in self._maps:
            path = self.dir / cache_file
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (listed in the prepared manifest)")
            self._maps[cache_file] = np.load(path, mmap_mode="r")
        return np.array(self._maps[cache_file][int(index)], dtype=np.uint8)  # a private copy

    def size(self, cache_file: str) -> int:
        self.get(cache_file, 0)
        return int(self._maps[cache_file].shape[1])


def item_seed(base: int, stream: str, index: int) -> int:
    """A 63-bit seed for row ``index`` of ``stream``, independent of how many rows there are."""
    state = np.random.SeedSequence([int(base), _STREAMS[stream], int(index)]).generate_state(1, np.uint64)
    return int(state[0]) & (2**63 - 1)


# --------------------------------------------------------------------------- plan
def _check_cfg(cfg: AugmentConfig) -> tuple[list[str], np.ndarray]:
    """Validate numbers and method names; return method names and normalised weights."""
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"augment.methods: unknown method(s) {unknown}; valid: {sorted(METHODS)}")
    names = list(cfg.methods)
    weights = np.array([cfg.methods[n] for n in names], dtype=np.float64)
    if (weights < 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"augment.methods: weights must be finite and >= 0, got {dict(cfg.methods)}")
    for field_name in ("fakes_per_real", "real_widening"):
        if getattr(cfg, field_name) < 0:
            raise ValueError(f"augment.{field_name} must be >= 0, got {getattr(cfg, field_name)}")
    if cfg.fakes_per_real > 0 and weights.sum() <= 0:
        raise ValueError("augment.methods: fakes_per_real > 0 but no method has a positive weight")
    d = cfg.diffusion
    if d.model:
        from .diffusion import check_config

        check_config(d)
        if not 0.0 <= d.fraction <= 1.0 or d.per_image < 1:
            raise ValueError(f"augment.diffusion: need 0 <= fraction <= 1 and per_image >= 1, got "
                             f"fraction={d.fraction}, per_image={d.per_image}")
    total = weights.sum()
    return names, (weights / total if total > 0 else weights)


def _spread(rng: np.random.Generator, n_items: int, n: int) -> np.ndarray:
    """``n`` indices into ``n_items``: whole shuffled passes, so every item is used once before twice."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    passes = -(-n // n_items)
    return np.concatenate([rng.permutation(n_items) for _ in range(passes)])[:n]


def _donors(rng: np.random.Generator, sources: np.ndarray, n_items: int) -> np.ndarray:
    """A random *other* image for each source (itself only when there is a single real image)."""
    if n_items == 1:
        return sources.copy()
    d = rng.integers(0, n_items - 1, size=len(sources))
    return d + (d >= sources)  # skip the source itself without rejection sampling


def plan_jobs(cfg: AugmentConfig, n_real: int) -> list[Job]:
    """Every image to make, in output order: editing fakes, widened reals, diffusion fakes."""
    names, probs = _check_cfg(cfg)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _STREAMS["plan"]]))
    jobs: list[Job] = []
    n_edit = int(round(cfg.fakes_per_real * n_real))
    if n_edit:
        sources = _spread(rng, n_real, n_edit)
        methods = rng.choice(len(names), size=n_edit, p=probs)
        donors = _donors(rng, sources, n_real)
        for i, (src, m, donor) in enumerate(zip(sources, methods, donors)):
            name = names[m]
            donor = int(donor) if name in NEEDS_DONOR else -1
            jobs.append(Job("edit", name, int(src), donor, item_seed(cfg.seed, "edit", i)))
    n_widen = int(round(cfg.real_widening * n_real))
    for i, s in enumerate(_spread(rng, n_real, n_widen)):
        jobs.append(Job("widen", WIDEN, int(s), -1, item_seed(cfg.seed, "widen", i)))
    d = cfg.diffusion
    if d.model:
        chosen = _spread(rng, n_real, int(round(d.fraction * n_real)))
        for i, s in enumerate(np.repeat(chosen, d.per_image)):
            jobs.append(Job("sd", SD_PREFIX + d.mode, int(s), -1, item_seed(cfg.seed, "sd", i)))
    return jobs


# --------------------------------------------------------------------------- one image
def edit_one(method: str, src: np.ndarray, seed: int, donor: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """One editing fake or widened real from its seed (the one code path for run and regenerate)."""
    rng = np.random.default_rng(seed)
    if method == WIDEN:
        fake, params = widen_real(src, rng)
        return fake, None, params
    return get_method(method)(src, rng, donor)


def sd_mask(h: int, w: int, seed: int, mode: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(binary mask for the pipeline, soft mask for pasting back, params) for one diffusion row."""
    if mode != "inpaint":
        ones = np.ones((h, w), np.float32)
        return ones, ones, {}
    rng = np.random.default_rng(seed)
    mask, params = region_mask(h, w, rng, face=True, soft=False)
    binary = (mask >= 0.5).astype(np.float32)
    # Feather outwards only: the repainted interior is kept whole, the seam fades into the original.
    sigma = max(1.0, 0.02 * min(h, w))
    k = int(6 * sigma) | 1
    soft = np.maximum(binary, cv2.GaussianBlur(binary, (k, k), sigma))
    soft[soft < 1.0 / 255.0] = 0.0
    return binary, (np.round(soft * 255.0) / 255.0).astype(np.float32), params


def _sd_params(d: DiffusionConfig, pipe: Any, mask_params: dict) -> dict:
    from .diffusion import native_size

    return {"model": d.model, "mode": d.mode, "prompt": d.prompt, "negative_prompt": d.negative_prompt,
            "strength": d.strength, "guidance_scale": d.guidance_scale, "steps": d.steps, "dtype": d.dtype,
            "size": native_size(pipe), "mask": mask_params}


def _prompt_embeds(pipe: Any) -> Any:
    from .diffusion import placeholder_prompt_embeds

    if getattr(pipe, "text_encoder", None) is not None:
        return None
    log.warning("diffusion pipeline has no text encoder: using fixed random prompt embeddings (tests only)")
    return placeholder_prompt_embeds(pipe)


def sd_batch(pipe: Any, d: DiffusionConfig, srcs: list[np.ndarray], seeds: list[int], prompt_embeds: Any = None
             ) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """Diffusion fakes for a batch of sources: (fake, mask of the change, params) each.

    ``prompt_embeds``: see :func:`_prompt_embeds` (None for a pipeline with a text encoder).
    """
    from .diffusion import composite, generate

    masks = [sd_mask(*s.shape[:2], seed, d.mode) for s, seed in zip(srcs, seeds)]
    gens = generate(pipe, srcs, [m[0] for m in masks] if d.mode == "inpaint" else None, seeds, d,
                    prompt_embeds=prompt_embeds)
    out = []
    for src, gen, (_, soft, mparams) in zip(srcs, gens, masks):
        fake = composite(src, gen, soft) if d.mode == "inpaint" else gen
        out.append((fake, soft, _sd_params(d, pipe, mparams)))
    return out


# --------------------------------------------------------------------------- writing
class _Writer:
    """Streams images into the memmap, masks to PNG, rows to a list; keeps contact-sheet examples."""

    def __init__(self, tmp: Path, n: int, size: int, per_method: int) -> None:
        self.tmp, self.per_method = tmp, per_method
        (tmp / "masks").mkdir(parents=True)
        self.images_tmp = tmp / f".{CACHE_FILE}.tmp"
        self.images = np.lib.format.open_memmap(self.images_tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        self.rows: list[dict] = []
        self.examples: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {}

    def add(self, job: Job, reals: pd.DataFrame, src: np.ndarray, fake: np.ndarray, mask: np.ndarray | None,
            params_json: str) -> None:
        i = len(self.rows)
        if fake.shape != src.shape or fake.dtype != np.uint8:
            raise RuntimeError(f"{job.method} returned {fake.dtype} {fake.shape} for a {src.shape} image")
        self.images[i] = fake
        name = f"{job.method}_{i:06d}.png"
        mask_path = ""
        if mask is not None:
            mask_path = f"masks/{Path(name).stem}.png"
            cv2.imwrite(str(self.tmp / mask_path), np.round(mask * 255.0).astype(np.uint8))
        self.rows.append({
            "uid": f"aug/{name}", "img_name": name, "label": 0 if job.kind == "widen" else 1,
            "source_uid": reals.uid[job.source], "donor_uid": reals.uid[job.donor] if job.donor >= 0 else "",
            "method": job.method, "params": params_json,
            "seed": job.seed, "mask_path": mask_path, "cache_file": CACHE_FILE, "cache_index": i,
        })
        ex = self.examples.setdefault(job.method, [])
        if len(ex) < self.per_method:
            ex.append((src, fake, mask))

    def close(self) -> None:
        self.images.flush()
        del self.images
        os.replace(self.images_tmp, self.tmp / CACHE_FILE)


def contact_sheet(examples: Mapping[str, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]],
                  per_method: int, tile: int = 128) -> np.ndarray:
    """RGB grid: one row per method, ``per_method`` groups of source | fake | mask (or |diff| x4)."""
    label_w, gap = 110, 2
    width = label_w + per_method * (3 * tile + 2 * gap) + (per_method - 1) * 3 * gap
    rows = []
    for method, items in examples.items():
        row = np.full((tile, width, 3), 255, np.uint8)
        cv2.putText(row, method, (4, tile // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        x = label_w
        for src, fake, mask in items:
            if mask is not None:
                third = np.repeat((np.round(mask * 255.0).astype(np.uint8))[..., None], 3, axis=2)
            else:  # no mask (widened real): show where it changed instead
                third = np.clip(np.abs(fake.astype(np.int16) - src.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
            for t in (src, fake, third):
                row[:, x:x + tile] = cv2.resize(t, (tile, tile), interpolation=cv2.INTER_AREA)
                x += tile + gap
            x += 2 * gap
        rows.append(row)
    sep = np.full((gap * 2, width, 3), 255, np.uint8)
    return np.concatenate([r for row in rows for r in (row, sep)][:-1], axis=0)


# --------------------------------------------------------------------------- work files (resume)
def _prepared_fingerprint(prepared_dir: str | Path) -> str:
    """Changes when stage 1 is rerun differently, so work made from other sources is never reused."""
    return hashlib.sha1((Path(prepared_dir) / "manifest.csv").read_bytes()).hexdigest()


def sd_batches(jobs: list[Job], batch_size: int) -> list[list[int]]:
    """Indices of the diffusion jobs in fixed batches of the plan (the same whatever is resumed or sharded,
    so every image is made in the same batch composition and comes out with the same bytes)."""
    idx = [i for i, j in enumerate(jobs) if j.kind == "sd"]
    return [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]


def work_names(jobs: list[Job], reals: pd.DataFrame, cfg: AugmentConfig, size: int) -> list[str]:
    """File name of each job's work file: a hash of everything its bytes depend on (never the row index)."""
    base = {"v": WORK_VERSION, "prepared": _prepared_fingerprint(cfg.prepared_dir), "size": size}
    d = cfg.diffusion
    sd = {k: v for k, v in asdict(d).items() if k not in ("per_image", "fraction")}
    mates: dict[int, list] = {}
    for batch in sd_batches(jobs, d.batch_size) if d.model else []:
        members = [[reals.uid[jobs[i].source], jobs[i].seed] for i in batch]
        mates.update({i: members for i in batch})
    names = []
    for i, j in enumerate(jobs):
        key = {**base, "kind": j.kind, "method": j.method, "seed": j.seed, "source": reals.uid[j.source],
               "donor": reals.uid[j.donor] if j.donor >= 0 else ""}
        if j.kind == "sd":
            key.update(diffusion=sd, batch=mates[i])
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        names.append(f"{j.method}_{digest}.npz")
    return names


def save_work(path: Path, fake: np.ndarray, mask: np.ndarray | None, params: dict) -> None:
    """Write one finished image atomically (a kill leaves the old state or the whole file)."""
    if fake.dtype != np.uint8 or fake.ndim != 3:
        raise RuntimeError(f"{path.name}: generated image is {fake.dtype} {fake.shape}, expected uint8 (H, W, 3)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, image=fake, mask=np.zeros(0, np.float32) if mask is None else mask.astype(np.float32),
                 params=np.array(json.dumps(params, sort_keys=True, separators=(",", ":"))))
    os.replace(tmp, path)


def load_work(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(image, mask or None, params as JSON text) of a work file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing at the merge: a process did not finish its shard "
                                "(rerun the stage: finished images are kept)")
    with np.load(path) as z:
        mask = z["mask"]
        return z["image"], (mask if mask.size else None), str(z["params"])


@dataclass(frozen=True)
class Sources:
    """The real-image table in picklable form (for worker processes): index -> uint8 image."""

    prepared_dir: str
    uids: tuple[str, ...]
    files: tuple[str, ...]
    indices: tuple[int, ...]

    @classmethod
    def from_reals(cls, prepared_dir: str | Path, reals: pd.DataFrame) -> Sources:
        return cls(str(prepared_dir), tuple(reals.uid), tuple(reals.cache_file),
                   tuple(int(i) for i in reals.cache_index))

    def reader(self) -> Callable[[int], np.ndarray]:
        cache = CacheReader(self.prepared_dir)
        return lambda k: cache.get(self.files[k], self.indices[k])


# --------------------------------------------------------------------------- editing fakes (process pool)
_WORKER: dict[str, Any] = {}  # in a pool process: image reader and work dir (set by _init_worker)


def _worker_state(sources: Sources, work: str | Path) -> dict[str, Any]:
    return {"image": sources.reader(), "work": Path(work)}


def _init_worker(sources: Sources, work: str) -> None:
    cv2.setNumThreads(1)  # one process per core: no thread oversubscription
    _WORKER.update(_worker_state(sources, work))


def _edit_chunk(tasks: list[tuple[Job, str]], state: dict[str, Any] | None = None) -> int:
    """Make and store the editing fakes / widened reals of ``tasks`` ((job, work file name) pairs)."""
    state = _WORKER if state is None else state
    image, work = state["image"], state["work"]
    for job, name in tasks:
        donor = image(job.donor) if job.donor >= 0 else None
        fake, mask, params = edit_one(job.method, image(job.source), job.seed, donor)
        save_work(work / name, fake, mask, params)
    return len(tasks)


def n_workers(requested: int, n_tasks: int, world: int = 1) -> int:
    """Editing processes: ``requested`` (0 = this process's share of the cores), fewer for small runs."""
    if requested < 0:
        raise ValueError(f"augment.workers must be >= 0 (0 = all cores), got {requested}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = requested or max(1, cores // max(1, world))
    return max(1, min(wanted, n_tasks // MIN_JOBS_PER_WORKER))


def _run_edits(tasks: list[tuple[Job, str]], sources: Sources, work: Path, workers: int, dist: Dist) -> None:
    """Editing fakes and widened reals, in this process (1 worker) or a spawn pool; same bytes either way."""
    if not tasks:
        return
    chunks = [tasks[s:s + EDIT_CHUNK] for s in range(0, len(tasks), EDIT_CHUNK)]
    n_proc = n_workers(workers, len(tasks), dist.world)
    log.info("%saugment: %d editing images with %d process(es)", dist.tag(), len(tasks), n_proc)
    with tqdm(total=len(tasks), desc=f"{dist.tag()}augment edit", unit="img") as bar:
        if n_proc == 1:
            state = _worker_state(sources, work)
            for chunk in chunks:
                bar.update(_edit_chunk(chunk, state))
            return
        # spawn, not fork: torch/CUDA may already be initialised in this process (diffusion pipeline).
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(n_proc, initializer=_init_worker, initargs=(sources, str(work))) as pool:
            for n in pool.imap_unordered(_edit_chunk, chunks):
                bar.update(n)


# --------------------------------------------------------------------------- the stage
def run_augment(cfg: AugmentConfig, dist: Dist | None = None) -> dict:
    """Run stage 2 (this process's shard under a launcher, see the module docstring).

    Returns the summary counts (also written to ``out_dir/summary.json``) on the main process; other
    processes return ``{"rank": r, "world": w, "generated": n}`` once their shard is stored.
    """
    dist = dist or get_dist()
    reals = load_reals(cfg.prepared_dir)
    sources = Sources.from_reals(cfg.prepared_dir, reals)
    cache = CacheReader(cfg.prepared_dir)
    size = cache.size(reals.cache_file[0])
    jobs = plan_jobs(cfg, len(reals))  # validates the config before anything is written or loaded
    names = work_names(jobs, reals, cfg, size)
    work = work_dir(cfg.out_dir)
    done = {p.name for p in work.glob("*.npz")} if work.is_dir() else set()
    edit_todo = [(j, n) for j, n in zip(jobs, names) if j.kind != "sd" and n not in done]
    sd_todo = [b for b in sd_batches(jobs, cfg.diffusion.batch_size) if any(names[i] not in done for i in b)]
    n_done = sum(n in done for n in names)
    if n_done and dist.is_main:
        log.info("augment: resuming from %s: %d of %d images already made", work, n_done, len(jobs))
    if not cfg.diffusion.model and dist.is_main:
        log.info("diffusion fakes skipped: no model configured")
    my_edits, my_sd = dist.shard(edit_todo), dist.shard(sd_todo)
    pipe = _load_diffusion(cfg.diffusion, dist.device) if my_sd else None  # fail fast, before hours of editing
    if dist.is_main:
        log.info("augment: %d real sources -> %d images (%d px), %d to make", len(reals), len(jobs), size,
                 len(jobs) - n_done)
        work.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # every process has listed `done` before anyone writes, and the work dir exists
    _run_edits(my_edits, sources, work, cfg.workers, dist)
    if my_sd:
        _run_diffusion(pipe, cfg.diffusion, my_sd, jobs, names, done, sources, work, dist)
    n_mine = len(my_edits) + sum(len(b) for b in my_sd)
    dist.barrier()  # every shard is stored
    if not dist.is_main:
        return {"rank": dist.rank, "world": dist.world, "generated": n_mine}
    summary = _assemble(cfg, jobs, names, reals, cache, size)
    shutil.rmtree(work, ignore_errors=True)
    log.info("augment: wrote %d images to %s %s", summary["n_images"], cfg.out_dir, summary["by_method"])
    return summary


def _assemble(cfg: AugmentConfig, jobs: list[Job], names: list[str], reals: pd.DataFrame, cache: CacheReader,
              size: int) -> dict:
    """Merge the work files, in plan order, into a staging dir, then swap it in for ``out_dir``."""
    out, work = Path(cfg.out_dir), work_dir(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        writer = _Writer(tmp, len(jobs), size, cfg.contact_sheet_per_method)
        for job, name in tqdm(list(zip(jobs, names)), desc="augment merge", unit="img"):
            fake, mask, params = load_work(work / name)
            src = cache.get(reals.cache_file[job.source], reals.cache_index[job.source])
            writer.add(job, reals, src, fake, mask, params)
        writer.close()
        summary = _write_tables(tmp, writer, cfg, reals, size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written output behind
        raise
    shutil.rmtree(out, ignore_errors=True)  # the stage owns out_dir: no stale file may survive
    os.replace(tmp, out)
    return summary


def _write_tables(tmp: Path, writer: _Writer, cfg: AugmentConfig, reals: pd.DataFrame, size: int) -> dict:
    """manifest.csv, contact_sheet.png and summary.json into the staging folder."""
    manifest = pd.DataFrame(writer.rows, columns=MANIFEST_COLUMNS)
    write_csv(tmp / "manifest.csv", manifest)
    if writer.examples and cfg.contact_sheet_per_method > 0:
        sheet = contact_sheet(writer.examples, cfg.contact_sheet_per_method, tile=min(size, 160))
        cv2.imwrite(str(tmp / "contact_sheet.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    summary = _summary(cfg, reals, manifest, size)
    write_json(tmp / "summary.json", summary)
    return summary


def _load_diffusion(d: DiffusionConfig, device: str | None = None) -> Any:
    from .diffusion import load_pipeline

    return load_pipeline(d.model, d.mode, d.dtype, device)


def _run_diffusion(pipe: Any, d: DiffusionConfig, batches: list[list[int]], jobs: list[Job], names: list[str],
                   done: set[str], sources: Sources, work: Path, dist: Dist) -> None:
    """This process's diffusion batches; images of a batch already stored are not written again."""
    n = sum(len(b) for b in batches)
    log.info("%sdiffusion: %d %s fakes with %s on %s", dist.tag(), n, d.mode, d.model, pipe.device)
    embeds = _prompt_embeds(pipe)
    image = sources.reader()
    with tqdm(total=n, desc=f"{dist.tag()}augment sd_{d.mode}", unit="img") as bar:
        for batch in batches:
            srcs = [image(jobs[i].source) for i in batch]
            made = sd_batch(pipe, d, srcs, [jobs[i].seed for i in batch], embeds)
            for i, (fake, mask, params) in zip(batch, made):
                if names[i] not in done:
                    save_work(work / names[i], fake, mask, params)
            bar.update(len(batch))


def _summary(cfg: AugmentConfig, reals: pd.DataFrame, manifest: pd.DataFrame, size: int) -> dict:
    by_method = {str(k): int(v) for k, v in manifest.method.value_counts().sort_index().items()}
    return {
        "seed": cfg.seed, "image_size": size, "n_real_sources": int(len(reals)), "n_images": int(len(manifest)),
        "n_fake": int((manifest.label == 1).sum()), "n_widened_real": int((manifest.method == WIDEN).sum()),
        "n_diffusion": int(manifest.method.str.startswith(SD_PREFIX).sum()),
        "diffusion_model": cfg.diffusion.model or None, "by_method": by_method,
    }


# --------------------------------------------------------------------------- regenerate
@functools.lru_cache(maxsize=2)
def _cached_pipeline(model: str, mode: str, dtype: str) -> Any:
    from .diffusion import load_pipeline

    return load_pipeline(model, mode, dtype)


@functools.lru_cache(maxsize=2)
def _prepared(manifest: str, mtime_ns: int) -> tuple[pd.DataFrame, CacheReader]:
    """The prepared manifest indexed by uid and a cache reader (kept while the file is unchanged)."""
    man = pd.read_csv(manifest, keep_default_na=False, dtype={"uid": str})
    return man.set_index("uid"), CacheReader(Path(manifest).parent)


def regenerate(row: Mapping[str, Any], prepared_dir: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Rebuild one manifest row's (image, mask) from its source, donor and seed.

    Editing fakes and widened reals come back byte-identical. Diffusion rows reload the model named
    in ``params`` and run it alone (batch of one): identical when the stage also ran with
    ``batch_size: 1`` on the same hardware, otherwise equal up to floating-point batch effects.
    """
    path = Path(prepared_dir) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: regenerate needs the prepared dir the row came from")
    by_uid, cache = _prepared(str(path.resolve()), path.stat().st_mtime_ns)

    def image(uid: str) -> np.ndarray:
        if uid not in by_uid.index:
            raise KeyError(f"{uid!r} is not in {prepared_dir}/manifest.csv")
        r = by_uid.loc[uid]
        return cache.get(r.cache_file, r.cache_index)

    method, seed = str(row["method"]), int(row["seed"])
    src = image(str(row["source_uid"]))
    if method.startswith(SD_PREFIX):
        p = json.loads(row["params"])
        d = DiffusionConfig(**{k: p[k] for k in asdict(DiffusionConfig()) if k in p}, batch_size=1)
        pipe = _cached_pipeline(d.model, d.mode, d.dtype)
        fake, mask, _ = sd_batch(pipe, d, [src], [seed], _prompt_embeds(pipe))[0]
        return fake, mask
    donor_uid = row.get("donor_uid")
    donor = image(donor_uid) if isinstance(donor_uid, str) and donor_uid else None  # "" or NaN: none
    fake, mask, _ = edit_one(method, src, seed, donor)
    return fake, mask
