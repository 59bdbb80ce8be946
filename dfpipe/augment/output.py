"""Stage 2's output: the work files merged in plan order into ``out_dir`` (images, manifest, masks, contact
sheet, summary)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ..config import AugmentConfig
from ..io import work_dir, write_csv, write_json
from .plan import SD_PREFIX, WIDEN, Job
from .sources import CacheReader
from .work import load_work

MANIFEST_COLUMNS = ["uid", "img_name", "label", "source_uid", "donor_uid", "method", "params", "seed",
                    "mask_path", "cache_file", "cache_index"]
CACHE_FILE = "images.npy"


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


def _summary(cfg: AugmentConfig, reals: pd.DataFrame, manifest: pd.DataFrame, size: int) -> dict:
    by_method = {str(k): int(v) for k, v in manifest.method.value_counts().sort_index().items()}
    return {
        "seed": cfg.seed, "image_size": size, "n_real_sources": int(len(reals)), "n_images": int(len(manifest)),
        "n_fake": int((manifest.label == 1).sum()), "n_widened_real": int((manifest.method == WIDEN).sum()),
        "n_diffusion": int(manifest.method.str.startswith(SD_PREFIX).sum()),
        "diffusion_model": cfg.diffusion.model or None, "by_method": by_method,
    }
