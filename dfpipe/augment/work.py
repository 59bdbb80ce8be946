"""Stage 2's work files (resume): one atomically written ``.npz`` per finished image, named by a hash of
everything its bytes depend on."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import AugmentConfig
from .plan import Job

WORK_VERSION = 1  # bump when a change makes old work files wrong (part of every work file's key)


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
