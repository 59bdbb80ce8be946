"""Stage 2's output: the work files merged in plan order into ``out_dir``: the generated images as an image
store (PNG shards ``aug-000000.bin`` ... of :data:`SHARD_IMAGES` images, see :mod:`dfpipe.data.store`,
plus the prepared folder's ``store.json``), manifest, masks, contact sheet, summary."""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ..config import AugmentConfig
from ..data.images import decode_image
from ..data.preprocess import Stage1
from ..data.store import ShardWriter, shard_name, write_store_record
from ..io import write_csv, write_json
from ..layout import Layout
from .plan import REAL_KINDS, SD_PREFIX, WIDEN, Job
from .sheet import Example, contact_sheet
from .work import load_work

MANIFEST_COLUMNS = ["uid", "img_name", "label", "source_uid", "donor_uid", "method", "params", "seed",
                    "mask_path", "cache_file", "cache_index"]
SHARD_PREFIX = "aug"
SHARD_IMAGES = 1024  # images per shard of the stage-2 store



def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG from its header (IHDR), without decoding it."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def _decode_mask(data: bytes) -> np.ndarray:
    m = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return m.astype(np.float32) / 255.0


class _Writer:
    """Streams PNG-encoded images into shards of the staging store (a new shard every ``shard_images``),
    masks to PNG files, rows to a list; keeps contact-sheet examples."""

    def __init__(self, tmp: Path, per_method: int, shard_images: int | None = None) -> None:
        self.tmp, self.per_method = tmp, per_method
        self.shard_images = max(1, SHARD_IMAGES if shard_images is None else shard_images)
        (tmp / "masks").mkdir(parents=True)
        self.rows: list[dict] = []
        self.examples: dict[str, list[Example]] = {}
        self.shard: ShardWriter | None = None
        self.n_shards = 0
        self.sizes: set[tuple[int, int]] = set()  # (width, height) of the images written

    def wants_example(self, method: str) -> bool:
        return len(self.examples.get(method, ())) < self.per_method

    def add(self, job: Job, reals: pd.DataFrame, png: bytes, mask_png: bytes | None, params_json: str,
            src: np.ndarray | None = None) -> None:
        """One row; ``src`` (the source image) only when :meth:`wants_example` said so."""
        i = len(self.rows)
        self.sizes.add(png_size(png))
        if self.shard is None:
            self.shard = ShardWriter(self.tmp / shard_name(SHARD_PREFIX, self.n_shards))
        cache_file = self.shard.path.name
        index = self.shard.add(png)
        if len(self.shard.entries) >= self.shard_images:
            self._commit()
        name = f"{job.method}_{i:06d}.png"
        mask_path = ""
        if mask_png is not None:
            mask_path = f"masks/{Path(name).stem}.png"
            (self.tmp / mask_path).write_bytes(mask_png)
        self.rows.append({
            "uid": f"aug/{name}", "img_name": name, "label": 0 if job.kind in REAL_KINDS else 1,
            "source_uid": reals.uid[job.source], "donor_uid": reals.uid[job.donor] if job.donor >= 0 else "",
            "method": job.method, "params": params_json,
            "seed": job.seed, "mask_path": mask_path, "cache_file": cache_file, "cache_index": index,
        })
        if src is not None and self.wants_example(job.method):
            self.examples.setdefault(job.method, []).append(
                (src, decode_image(png), None if mask_png is None else _decode_mask(mask_png)))

    def _commit(self) -> None:
        if self.shard is not None:
            self.shard.commit()
            self.shard, self.n_shards = None, self.n_shards + 1

    def close(self) -> None:
        self._commit()

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
            self.shard = None


def assemble(cfg: AugmentConfig, layout: Layout, jobs: list[Job], names: list[str], reals: pd.DataFrame,
             image: Callable[[int], np.ndarray], work: Path, stage1: Stage1) -> dict:
    """Merge the work files of ``work``, in plan order, into a staging dir, then swap it in for
    ``layout.augmented``. ``image``: real-table index -> stage-1 image (for the contact sheet); ``stage1``: the
    prepared store's record, which the output's ``store.json`` repeats."""
    out = Path(layout.augmented)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer: _Writer | None = None
    try:
        writer = _Writer(tmp, cfg.contact_sheet_per_method)
        for job, name in tqdm(list(zip(jobs, names)), desc="augment merge", unit="img"):
            png, mask_png, params = load_work(work / name)
            # the source is decoded only for the contact sheet's few examples
            src = image(job.source) if writer.wants_example(job.method) else None
            writer.add(job, reals, png, mask_png, params, src)
        writer.close()
        _copy_models(work, tmp)
        summary = _write_tables(tmp, writer, cfg, reals)
        # generated images are stage-1 images of the same contract as their sources; after the manifest, whose
        # row count and hash it records
        write_store_record(tmp, stage1, manifest_rows=len(writer.rows))
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written output behind
        raise
    shutil.rmtree(out, ignore_errors=True)  # the stage owns its output folder: no stale file may survive
    os.replace(tmp, out)
    return summary


def _copy_models(work: Path, tmp: Path) -> None:
    """Trained reconstruction models (random autoencoders) into ``reconstruct/``: kept with the images they
    made (a DVC output), so a row can be traced to its model's weights."""
    models = sorted((work / "models").glob("*.safetensors"))
    if models:
        (tmp / "reconstruct").mkdir()
        for path in models:
            shutil.copyfile(path, tmp / "reconstruct" / path.name)


def _write_tables(tmp: Path, writer: _Writer, cfg: AugmentConfig, reals: pd.DataFrame) -> dict:
    """manifest.csv, contact_sheet.png and summary.json into the staging folder."""
    manifest = pd.DataFrame(writer.rows, columns=MANIFEST_COLUMNS)
    write_csv(tmp / "manifest.csv", manifest)
    if writer.examples and cfg.contact_sheet_per_method > 0:
        sheet = contact_sheet(writer.examples, cfg.contact_sheet_per_method)
        cv2.imwrite(str(tmp / "contact_sheet.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    summary = _summary(cfg, reals, manifest, writer)
    write_json(tmp / "summary.json", summary)
    return summary


def size_range(sizes: set[tuple[int, int]]) -> dict | None:
    """``{"width": [min, max], "height": [min, max]}`` of (width, height) pairs; None when there are none.
    Images keep their native size, so stage 2 reports the range rather than one size."""
    if not sizes:
        return None
    ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
    return {"width": [min(ws), max(ws)], "height": [min(hs), max(hs)], "n_distinct": len(sizes)}


def _summary(cfg: AugmentConfig, reals: pd.DataFrame, manifest: pd.DataFrame, writer: _Writer) -> dict:
    by_method = {str(k): int(v) for k, v in manifest.method.value_counts().sort_index().items()}
    summary = {
        "seed": cfg.seed, "image_sizes": size_range(writer.sizes), "n_real_sources": len(reals),
        "n_images": len(manifest), "n_shards": writer.n_shards,
        "n_fake": int((manifest.label == 1).sum()), "n_widened_real": int((manifest.method == WIDEN).sum()),
        "n_diffusion": int(manifest.method.str.startswith(SD_PREFIX).sum()),
        "diffusion_model": cfg.diffusion.model or None, "by_method": by_method,
    }
    if cfg.reconstruct.per_real:  # only then: with reconstruction off the summary is as before, byte for byte
        recon = manifest.method.isin(list(cfg.reconstruct.methods))
        summary["n_reconstructed"] = int(recon.sum())
        summary["n_reconstruction_reals"] = int((manifest.method == "recon_real").sum())
    return summary
