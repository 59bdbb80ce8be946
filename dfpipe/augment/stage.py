"""Stage 2: generated training images from the real images of the prepared train and val splits.

Three kinds of rows, all derived from real (label 0) train/val images (stage 3 re-splits train+val by
cluster, so both splits are sources):

* editing forgeries (label 1): :data:`editing.METHODS`, chosen by ``cfg.methods`` weights;
* widened reals (label 0): JPEG/resize/blur/noise/colour copies, so degradation is not a fake cue;
* Stable Diffusion fakes (label 1): only when ``cfg.diffusion.model`` is set.

Every row has its own integer seed (derived from ``cfg.seed``, the row's kind and index), so the
same config gives the same bytes and :func:`regenerate` rebuilds any row from the manifest alone.

Output (``cfg.out_dir``, replaced as a whole; it is a DVC output):
  images.npy        uint8 (M, S, S, 3) RGB, S = the prepared cache size, row = ``cache_index``
  manifest.csv      uid,img_name,label,source_uid,donor_uid,method,params,seed,mask_path,cache_file,cache_index
  masks/<stem>.png  uint8 mask of the changed pixels (0 = untouched), fakes only
  contact_sheet.png one row per method: source | fake | mask examples
  summary.json      counts (also returned by :func:`run_augment`)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ..config import AugmentConfig, DiffusionConfig
from ..io import write_csv, write_json
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
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run stage 1 (python 01_prepare_data.py) first")
    man = pd.read_csv(path, keep_default_na=False, dtype={"img_name": str, "uid": str})
    missing = {"uid", "split", "label", "cache_file", "cache_index"} - set(man.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    reals = man[man.split.isin(["train", "val"]) & (man.label.astype(int) == 0) & (man.cache_index.astype(int) >= 0)]
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
            params: dict) -> None:
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
            "method": job.method, "params": json.dumps(params, sort_keys=True, separators=(",", ":")),
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


# --------------------------------------------------------------------------- the stage
def run_augment(cfg: AugmentConfig) -> dict:
    """Run stage 2 and return summary counts (also written to ``out_dir/summary.json``)."""
    reals = load_reals(cfg.prepared_dir)
    cache = CacheReader(cfg.prepared_dir)
    size = cache.size(reals.cache_file[0])
    jobs = plan_jobs(cfg, len(reals))
    if not cfg.diffusion.model:
        log.info("diffusion fakes skipped: no model configured")
    sd_jobs = [j for j in jobs if j.kind == "sd"]
    pipe = _load_diffusion(cfg.diffusion) if sd_jobs else None  # fail fast, before hours of editing
    out = Path(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("augment: %d real sources -> %d images (%d px)", len(reals), len(jobs), size)
    try:
        writer = _Writer(tmp, len(jobs), size, cfg.contact_sheet_per_method)

        def image(k: int) -> np.ndarray:
            return cache.get(reals.cache_file[k], reals.cache_index[k])

        for job in tqdm([j for j in jobs if j.kind != "sd"], desc="augment edit", unit="img"):
            src = image(job.source)
            donor = image(job.donor) if job.donor >= 0 else None
            fake, mask, params = edit_one(job.method, src, job.seed, donor)
            writer.add(job, reals, src, fake, mask, params)
        if sd_jobs:
            _run_diffusion(pipe, cfg.diffusion, sd_jobs, image, writer, reals)
        writer.close()
        summary = _write_tables(tmp, writer, cfg, reals, size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written output behind
        raise
    shutil.rmtree(out, ignore_errors=True)  # the stage owns out_dir: no stale file may survive
    os.replace(tmp, out)
    log.info("augment: wrote %d images to %s %s", summary["n_images"], out, summary["by_method"])
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


def _load_diffusion(d: DiffusionConfig) -> Any:
    from .diffusion import load_pipeline

    return load_pipeline(d.model, d.mode, d.dtype)


def _run_diffusion(pipe: Any, d: DiffusionConfig, jobs: list[Job], image: Any, writer: _Writer,
                   reals: pd.DataFrame) -> None:
    log.info("diffusion: %d %s fakes with %s", len(jobs), d.mode, d.model)
    embeds = _prompt_embeds(pipe)
    with tqdm(total=len(jobs), desc=f"augment sd_{d.mode}", unit="img") as bar:
        for start in range(0, len(jobs), d.batch_size):
            batch = jobs[start:start + d.batch_size]
            srcs = [image(j.source) for j in batch]
            made = sd_batch(pipe, d, srcs, [j.seed for j in batch], embeds)
            for job, src, (fake, mask, params) in zip(batch, srcs, made):
                writer.add(job, reals, src, fake, mask, params)
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
