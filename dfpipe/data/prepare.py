"""Stage 1: validate the raw competition layout, decode every image once, write a resized cache.

Output (``out_dir``):
  manifest.csv  uid,img_name,split,label,path,cache_file,cache_index,orig_w,orig_h,error
                (label -1 for test; ``path`` is the source file; one row per listed image that
                exists: an image that failed to decode keeps its row, with cache_index -1 and
                the reason in ``error``, so the submission can still give it a row)
  {split}.npy   uint8 (N, S, S, 3) RGB, row ``cache_index`` of the manifest; S = cache_size.
                Images are resized to S x S (aspect ratio not kept: faces crops are near square and
                the detectors see the same geometry at train and test time).
The report (``report``) lists every skipped file with its reason and counts per reason.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..config import PrepareConfig
from ..io import atomic_path, write_csv, write_json
from .images import ImageError, decode_image, list_images, resize_square
from .labels import read_labels

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["uid", "img_name", "split", "label", "path", "cache_file", "cache_index", "orig_w",
                    "orig_h", "error"]


@dataclass(frozen=True)
class Item:
    split: str
    img_name: str
    label: int
    path: Path


def collect_items(cfg: PrepareConfig) -> tuple[list[Item], list[dict]]:
    """List the images of every split from the label files / test folder; report missing ones."""
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_root {root} does not exist (set prepare.data_root in params.yaml)")
    items: list[Item] = []
    skipped: list[dict] = []
    for split, labels_file, folder in (
        ("train", cfg.train_labels, cfg.train_dir),
        ("val", cfg.val_labels, cfg.val_dir),
    ):
        csv_path, img_dir = root / labels_file, root / folder
        if not csv_path.exists() and split == "val":
            log.warning("%s: no validation labels; the cluster split will make the validation fold", csv_path)
            continue
        df = read_labels(csv_path)
        if cfg.limit:
            df = df.head(cfg.limit)
        on_disk = {p.relative_to(img_dir).as_posix() for p in list_images(img_dir)} if img_dir.is_dir() else set()
        for name, label in zip(df.img_name, df.label):
            if name not in on_disk and not (img_dir / name).is_file():
                skipped.append({"split": split, "file": str(img_dir / name), "reason": "listed in labels but file missing"})
                continue
            items.append(Item(split, name, int(label), img_dir / name))
        unlabelled = sorted(on_disk - set(df.img_name)) if not cfg.limit else []
        for name in unlabelled:
            log.warning("%s: image has no label in %s; ignored", img_dir / name, csv_path)
    test_dir = root / cfg.test_dir
    if test_dir.is_dir():
        files = list_images(test_dir)
        if cfg.limit:
            files = files[: cfg.limit]
        items += [Item("test", p.relative_to(test_dir).as_posix(), -1, p) for p in files]
    else:
        log.warning("%s: no test folder; the submission will have no rows", test_dir)
    return items, skipped


def _load(path: Path, size: int, min_side: int, max_pixels: int) -> tuple[np.ndarray | None, tuple[int, int], str]:
    """Worker: decode + resize one image. Returns (image or None, (w, h), error reason)."""
    try:
        img = decode_image(path, max_pixels=max_pixels, min_side=min_side)
    except ImageError as exc:
        return None, (0, 0), str(exc)
    h, w = img.shape[:2]
    return resize_square(img, size), (w, h), ""


def prepare(cfg: PrepareConfig) -> dict:
    """Run stage 1 and return the report dict (also written to ``cfg.report``)."""
    items, skipped = collect_items(cfg)
    out = Path(cfg.out_dir)
    tmp_out = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tmp_out.mkdir(parents=True)
    workers = cfg.workers or os.cpu_count() or 1
    rows: list[dict] = []
    size = cfg.cache_size
    load = partial(_load, size=size, min_side=cfg.min_side, max_pixels=cfg.max_pixels)
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else _Serial() as pool:
        for split in SPLITS:
            split_items = [it for it in items if it.split == split]
            cache = np.lib.format.open_memmap(
                tmp_out / f"{split}.npy", mode="w+", dtype=np.uint8, shape=(len(split_items), size, size, 3)
            )
            n_ok = 0
            # map() keeps input order and streams results: memory stays bounded by the chunk size.
            results = pool.map(load, [it.path for it in split_items], chunksize=16)
            for it, (img, (w, h), reason) in tqdm(
                zip(split_items, results), total=len(split_items), desc=f"prepare {split}", unit="img"
            ):
                row = dict(uid=f"{split}/{it.img_name}", img_name=it.img_name, split=split, label=it.label,
                           path=str(it.path), cache_file=f"{split}.npy", cache_index=-1, orig_w=w, orig_h=h,
                           error=reason)
                rows.append(row)
                if img is None:
                    log.warning("%s: skipped: %s", it.path, reason)
                    skipped.append({"split": split, "file": str(it.path), "reason": reason})
                    continue
                cache[n_ok] = img
                row["cache_index"] = n_ok
                n_ok += 1
            cache.flush()
            del cache
            if n_ok < len(split_items):  # drop the rows reserved for skipped images
                _truncate_npy(tmp_out / f"{split}.npy", n_ok)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    write_csv(tmp_out / "manifest.csv", manifest)
    _check_usable(manifest)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp_out, out)
    report = _report(manifest, skipped, size)
    write_json(cfg.report, report)
    log.info("prepared %d images (%s), skipped %d", len(manifest), dict(Counter(manifest.split)), len(skipped))
    return report


def _check_usable(manifest: pd.DataFrame) -> None:
    train = manifest[(manifest.split != "test") & (manifest.cache_index >= 0)]
    if train.empty:
        raise ValueError("no usable labelled image: check data_root and the label files")
    if train.label.nunique() < 2:
        raise ValueError(f"labelled images hold one class only (label {train.label.iloc[0]}): need real and fake")


def _truncate_npy(path: Path, n: int) -> None:
    """Rewrite a .npy cache keeping its first ``n`` rows (only when images were skipped)."""
    src = np.load(path, mmap_mode="r")
    with atomic_path(path) as tmp:
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(n, *src.shape[1:]))
        for start in range(0, n, 1024):
            stop = min(n, start + 1024)
            dst[start:stop] = src[start:stop]
        dst.flush()
        del dst, src


def _report(manifest: pd.DataFrame, skipped: list[dict], size: int) -> dict:
    counts = Counter(s["reason"].split(":")[0].split(" (")[0] for s in skipped)
    ok = manifest[manifest.cache_index >= 0]
    return {
        "cache_size": size,
        "n_images": {s: int((ok.split == s).sum()) for s in SPLITS},
        "n_fake": {s: int(((ok.split == s) & (ok.label == 1)).sum()) for s in ("train", "val")},
        "n_skipped": len(skipped),
        "skipped_by_reason": dict(sorted(counts.items())),
        "skipped": skipped,
    }


class _Serial:
    """Stand-in for a process pool when workers == 1 (easier debugging, no fork)."""

    def __enter__(self) -> "_Serial":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn, iterable, chunksize: int = 1):  # noqa: ANN001 - mirrors Executor.map
        return map(fn, iterable)
