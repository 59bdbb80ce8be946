"""Stage 2's work files (resume): one atomically written ``.npz`` per finished image, named by a hash of
everything its bytes depend on. It holds the image already PNG-encoded (the bytes the stage-2 store will
hold: encoding happens in the worker processes, the merge only copies), the mask as an 8-bit PNG and the
params."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ..config import AugmentConfig
from ..data.store import PNG_LEVEL, STORE_RECORD, encode_png
from ..errors import DataError
from .editing import USES_LANDMARKS
from .plan import Job

WORK_VERSION = 2  # bump when a change makes old work files wrong (part of every work file's key)


def prepared_fingerprint(prepared_dir: str | Path) -> str:
    """Changes when stage 1 is rerun differently (its manifest or its ``store.json`` settings), so work made
    from other sources is never reused."""
    folder = Path(prepared_dir)
    h = hashlib.sha1((folder / "manifest.csv").read_bytes())
    record = folder / STORE_RECORD
    if record.is_file():
        h.update(record.read_bytes())
    return h.hexdigest()


def sd_batches(jobs: list[Job], batch_size: int) -> list[list[int]]:
    """Indices of the diffusion jobs in fixed batches of the plan (the same whatever is resumed or sharded,
    so every image is made in the same batch composition and comes out with the same bytes)."""
    idx = [i for i, j in enumerate(jobs) if j.kind == "sd"]
    return [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]


def recon_batches(jobs: list[Job], cfg: AugmentConfig) -> list[list[int]]:
    """Indices of the reconstruction fakes in fixed batches of the plan, one model per batch (like
    :func:`sd_batches`: the same whatever is resumed or sharded)."""
    from .reconstruct import variant

    r = cfg.reconstruct
    groups: dict[tuple[str, int], list[int]] = {}
    for i, j in enumerate(jobs):
        if j.kind == "recon":
            groups.setdefault((j.method, variant(j.method, j.seed, r)), []).append(i)
    return [idx[s:s + r.batch_size] for idx in groups.values() for s in range(0, len(idx), r.batch_size)]


def work_names(jobs: list[Job], reals: pd.DataFrame, cfg: AugmentConfig, prepared: str) -> list[str]:
    """File name of each job's work file: a hash of everything its bytes depend on (never the row index), with
    ``prepared`` the stage-1 store the sources come from."""
    base = {"v": WORK_VERSION, "prepared": prepared_fingerprint(prepared)}
    d = cfg.diffusion
    sd = {k: v for k, v in asdict(d).items() if k not in ("per_image", "fraction")}
    mates: dict[int, list] = {}
    for batch in sd_batches(jobs, d.batch_size) if d.model else []:
        members = [[reals.uid[jobs[i].source], jobs[i].seed] for i in batch]
        mates.update({i: members for i in batch})
    recon = {k: v for k, v in asdict(cfg.reconstruct).items() if k not in ("per_real", "methods")}
    for batch in recon_batches(jobs, cfg) if cfg.reconstruct.per_real else []:
        members = [[reals.uid[jobs[i].source], jobs[i].seed] for i in batch]
        mates.update({i: members for i in batch})
    names = []
    for i, j in enumerate(jobs):
        key = {**base, "kind": j.kind, "method": j.method, "seed": j.seed, "source": reals.uid[j.source],
               "donor": reals.uid[j.donor] if j.donor >= 0 else ""}
        if j.kind == "sd":
            key.update(diffusion=sd, batch=mates[i])
        if j.kind in ("recon", "recon_real"):  # a pair's draws depend on these settings too
            key["reconstruct"] = recon
        if j.kind == "recon":
            key["batch"] = mates[i]
        if j.method in USES_LANDMARKS and cfg.landmarks != "none":  # absent for none: older work files still match
            key["landmarks"] = cfg.landmarks
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        names.append(f"{j.method}_{digest}.npz")
    return names


def encode_mask(mask: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of a [0, 1] mask (masks are quantised to 1/255 steps: the PNG is exact)."""
    ok, buf = cv2.imencode(".png", np.round(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8),
                           [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
    if not ok:  # pragma: no cover - cv2 always encodes a valid uint8 image
        raise DataError(f"cannot PNG-encode a mask of shape {mask.shape}")
    return buf.tobytes()


def save_work(path: Path, fake: np.ndarray, mask: np.ndarray | None, params: dict) -> None:
    """Write one finished image atomically (a kill leaves the old state or the whole file)."""
    if fake.dtype != np.uint8 or fake.ndim != 3 or fake.shape[2] != 3:
        raise RuntimeError(f"{path.name}: generated image is {fake.dtype} {fake.shape}, expected uint8 (H, W, 3)")
    if mask is not None and mask.shape != fake.shape[:2]:
        raise RuntimeError(f"{path.name}: mask {mask.shape} does not match the image {fake.shape[:2]}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    png = np.frombuffer(encode_png(fake), np.uint8)
    mask_png = np.zeros(0, np.uint8) if mask is None else np.frombuffer(encode_mask(mask), np.uint8)
    with open(tmp, "wb") as fh:
        np.savez(fh, image=png, mask=mask_png,
                 params=np.array(json.dumps(params, sort_keys=True, separators=(",", ":"))))
    os.replace(tmp, path)


def load_work(path: Path) -> tuple[bytes, bytes | None, str]:
    """(image PNG bytes, mask PNG bytes or None, params as JSON text) of a work file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing at the merge: a process did not finish its shard "
                                "(rerun the stage: finished images are kept)")
    with np.load(path) as z:
        mask = z["mask"]
        return z["image"].tobytes(), (mask.tobytes() if mask.size else None), str(z["params"])
