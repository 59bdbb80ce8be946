"""One generated image from its seed (editing fake, widened real, diffusion batch): the one code path of the
stage and of :func:`regenerate`; and the editing worker (:func:`edit_chunk`), which makes and stores a chunk of
editing images, next to the per-image code it loops over."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from ..config import DiffusionConfig
from ..errors import InputError, UnknownNameError
from ..data.landmarks import face_landmarks
from ..workers import exit_with_parent
from .editing import MASK_GRID, USES_LANDMARKS, get_method, region_mask
from .plan import RECON_REAL, SD_PREFIX, WIDEN, Job
from .real import widen_real
from .sources import CacheReader, Sources
from .work import save_work

log = logging.getLogger(__name__)
_WORKER: dict[str, Any] = {}  # in a pool process: image reader, work dir, landmark detector (set by init_worker)


def check_made(method: str, src: np.ndarray, fake: np.ndarray, mask: np.ndarray | None) -> None:
    """A generated image has its source's exact shape (sources differ in size), uint8; its mask that size."""
    if fake.shape != src.shape or fake.dtype != np.uint8:
        raise RuntimeError(f"{method} returned {fake.dtype} {fake.shape} for a {src.shape} image")
    if mask is not None and mask.shape != src.shape[:2]:
        raise RuntimeError(f"{method} returned a {mask.shape} mask for a {src.shape} image")


def edit_one(method: str, src: np.ndarray, seed: int, donor: np.ndarray | None, landmarks: str = "none",
             points: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """One editing fake or widened real from its seed (the one code path for run and regenerate).

    ``src`` and ``donor`` are stage-1 images of any sizes; the result has ``src``'s shape (a donor of
    another size is resized to it by the method).

    Methods that draw their mask from face landmarks (:data:`editing.USES_LANDMARKS`) get those of
    ``src`` found by the detector ``landmarks`` (``augment_sd.landmarks``; ``none``: no detector), or
    ``points`` when given (the hull a manifest row recorded: the detector is not run). Their params then
    say ``"landmarks": {"detector": ..., "face": found or not}``; ``params["mask"]["shape"]`` says which
    mask was used.
    """
    rng = np.random.default_rng(seed)
    if method == WIDEN:
        fake, params = widen_real(src, rng)
        mask = None
    elif method in USES_LANDMARKS:
        if points is None and landmarks != "none":
            points = face_landmarks(src, landmarks)
        fake, mask, params = get_method(method)(src, rng, donor, landmarks=points)
        if landmarks != "none":
            params["landmarks"] = {"detector": landmarks, "face": points is not None}
    else:
        fake, mask, params = get_method(method)(src, rng, donor)
    check_made(method, src, fake, mask)
    return fake, mask, params


def worker_state(image: Callable[[int], np.ndarray], work: str | Path, landmarks: str = "none") -> dict[str, Any]:
    """What :func:`edit_chunk` needs: ``image`` (real-table index -> stage-1 image), the work dir, the detector."""
    return {"image": image, "work": Path(work), "landmarks": landmarks}


def init_worker(sources: Sources, work: str, landmarks: str) -> None:
    """Pool initializer: each worker process reads the store with its own reader."""
    exit_with_parent()  # a killed stage 2 leaves no orphan worker
    cv2.setNumThreads(1)  # one process per core: no thread oversubscription
    _WORKER.update(worker_state(sources.reader(), work, landmarks))


def edit_chunk(tasks: list[tuple[Job, str]], state: dict[str, Any] | None = None) -> int:
    """Make and store the editing fakes / widened reals of ``tasks`` ((job, work file name) pairs); in a pool
    process with its :func:`init_worker` state, in-process with ``state`` (:func:`worker_state`)."""
    state = _WORKER if state is None else state
    image, work, landmarks = state["image"], state["work"], state["landmarks"]
    for job, name in tasks:
        donor = image(job.donor) if job.donor >= 0 else None
        fake, mask, params = edit_one(job.method, image(job.source), job.seed, donor, landmarks)
        save_work(work / name, fake, mask, params)
    return len(tasks)


def sd_mask(h: int, w: int, seed: int, mode: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(binary mask for the pipeline, soft mask for pasting back, params) for one diffusion row."""
    if mode != "inpaint":
        ones = np.ones((h, w), np.float32)
        return ones, ones, {}
    rng = np.random.default_rng(seed)
    mask, params = region_mask(h, w, rng, face=True, soft=False)
    binary = (mask >= 0.5).astype(np.float32)
    # Feather outwards only: the repainted interior is kept whole, the seam fades into the original. The blur
    # (sigma 2% of the shorter side) runs on the mask's MASK_GRID-sized copy and is resized back: a smooth
    # ramp loses nothing, and a full-size blur of a 12 MP mask costs over a second.
    scale = min(1.0, MASK_GRID / max(h, w))
    small = binary if scale == 1.0 else cv2.resize(binary, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                   interpolation=cv2.INTER_AREA)
    sigma = max(1.0 * scale, 0.02 * min(h, w) * scale)
    blurred = cv2.GaussianBlur(small, (int(6 * sigma) | 1,) * 2, sigma)
    if scale < 1.0:
        blurred = cv2.resize(blurred, (w, h), interpolation=cv2.INTER_LINEAR)
    soft = np.maximum(binary, blurred)
    soft[soft < 1.0 / 255.0] = 0.0
    return binary, (np.round(soft * 255.0) / 255.0).astype(np.float32), params


def _sd_params(d: DiffusionConfig, pipe: Any, mask_params: dict) -> dict:
    from .diffusion import native_size

    return {"model": d.model, "mode": d.mode, "prompt": d.prompt, "negative_prompt": d.negative_prompt,
            "strength": d.strength, "guidance_scale": d.guidance_scale, "steps": d.steps, "dtype": d.dtype,
            "size": native_size(pipe), "mask": mask_params}


def prompt_embeds(pipe: Any) -> Any:
    from .diffusion import placeholder_prompt_embeds

    if getattr(pipe, "text_encoder", None) is not None:
        return None
    log.warning("diffusion pipeline has no text encoder: using fixed random prompt embeddings (tests only)")
    return placeholder_prompt_embeds(pipe)


def sd_batch(pipe: Any, d: DiffusionConfig, srcs: list[np.ndarray], seeds: list[int], prompt_embeds: Any = None
             ) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """Diffusion fakes for a batch of sources: (fake, mask of the change, params) each.

    Sources may differ in size: each fake and mask has its own source's shape (the model runs at a
    multiple-of-8 working size, see :func:`dfpipe.augment_sd.diffusion.generate`).

    ``prompt_embeds``: see :func:`_prompt_embeds` (None for a pipeline with a text encoder).
    """
    from .diffusion import composite, generate

    masks = [sd_mask(*s.shape[:2], seed, d.mode) for s, seed in zip(srcs, seeds)]
    gens = generate(pipe, srcs, [m[0] for m in masks] if d.mode == "inpaint" else None, seeds, d,
                    prompt_embeds=prompt_embeds)
    out = []
    for src, gen, (_, soft, mparams) in zip(srcs, gens, masks):
        fake = composite(src, gen, soft) if d.mode == "inpaint" else gen
        check_made(SD_PREFIX + d.mode, src, fake, soft)
        out.append((fake, soft, _sd_params(d, pipe, mparams)))
    return out


@functools.lru_cache(maxsize=2)
def _cached_pipeline(model: str, mode: str, dtype: str) -> Any:
    from .diffusion import load_pipeline

    return load_pipeline(model, mode, dtype)


@functools.lru_cache(maxsize=2)
def _prepared(manifest: str, mtime_ns: int) -> tuple[pd.DataFrame, CacheReader]:
    """The prepared manifest indexed by uid and a store reader (kept while the file is unchanged)."""
    man = pd.read_csv(manifest, keep_default_na=False, dtype={"uid": str})
    return man.set_index("uid"), CacheReader(Path(manifest).parent)


def is_reconstruction(method: str) -> bool:
    from .reconstruct import METHODS as RECON_METHODS

    return method == RECON_REAL or method in RECON_METHODS


def regenerate(row: Mapping[str, Any], prepared_dir: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Rebuild one manifest row's (image, mask) from its source, donor and seed.

    Editing fakes and widened reals come back byte-identical to the image the stage stored (its store is
    lossless PNG), at the source's native size. Reconstruction rows: a pair's new real image comes back
    byte-identical; a ``taef2`` or ``vae`` fake too when the stage ran with ``reconstruct.batch_size: 1`` on the
    same hardware (``random_ae`` is refused: its weights are in the stage output's ``reconstruct/``). Diffusion rows reload the model named
    in ``params`` and run it alone (batch of one): identical when the stage also ran with
    ``batch_size: 1`` on the same hardware, otherwise equal up to floating-point batch effects.
    """
    path = Path(prepared_dir) / "manifest.csv"
    if not path.is_file():
        raise InputError(f"{path} not found: regenerate needs the prepared dir the row came from")
    by_uid, cache = _prepared(str(path.resolve()), path.stat().st_mtime_ns)

    def image(uid: str) -> np.ndarray:
        if uid not in by_uid.index:
            raise UnknownNameError(f"{uid!r} is not in {prepared_dir}/manifest.csv")
        r = by_uid.loc[uid]
        return cache.get(r.cache_file, r.cache_index)

    method, seed = str(row["method"]), int(row["seed"])
    if is_reconstruction(method):  # needs the source's stored bytes (its JPEG history), no mask
        from .reconstruct.stage import regenerate_pair_image

        r = by_uid.loc[str(row["source_uid"])] if str(row["source_uid"]) in by_uid.index else None
        if r is None:
            raise UnknownNameError(f"{row['source_uid']!r} is not in {prepared_dir}/manifest.csv")
        return regenerate_pair_image(method, json.loads(row["params"]), cache.raw(r.cache_file, r.cache_index)), None
    src = image(str(row["source_uid"]))
    if method.startswith(SD_PREFIX):
        p = json.loads(row["params"])
        d = DiffusionConfig(**{k: p[k] for k in asdict(DiffusionConfig()) if k in p}, batch_size=1)
        pipe = _cached_pipeline(d.model, d.mode, d.dtype)
        fake, mask, _ = sd_batch(pipe, d, [src], [seed], prompt_embeds(pipe))[0]
        return fake, mask
    donor_uid = row.get("donor_uid")
    donor = image(donor_uid) if isinstance(donor_uid, str) and donor_uid else None  # "" or NaN: none
    points = None
    if method in USES_LANDMARKS:  # a landmark mask is rebuilt from the hull the row recorded: no detector
        hull = json.loads(row["params"]).get("mask", {}).get("hull")
        points = None if hull is None else np.asarray(hull, np.float64)
    fake, mask, _ = edit_one(method, src, seed, donor, points=points)
    return fake, mask
