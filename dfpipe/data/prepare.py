"""Stage 1: validate the raw competition layout, decode every image once, write a resized cache.

Output (``out_dir``):
  manifest.csv  uid,img_name,split,label,path,cache_file,cache_index,orig_w,orig_h,error,
                phash,dhash,dup_group,face,face_x,face_y,face_w,face_h
                (label -1 for test; ``path`` is the source file; one row per listed image that
                exists: an image that failed to decode keeps its row, with cache_index -1 and
                the reason in ``error``, so the submission can still give it a row).
                ``phash``/``dhash``: 64-bit perceptual hashes (hex) of the decoded image;
                ``dup_group``: connected component of the near-duplicate graph (-1 for failed
                images; a singleton has its own id), so a split can keep duplicates in one fold;
                ``face``: off / found / largest_of_N / none (no face, kept whole) / skipped, and the
                detector's box (x, y, w, h in original pixels, -1 when none).
  {split}.npy   uint8 (N, S, S, 3) RGB, row ``cache_index`` of the manifest; S = cache_size.
                Images are resized to S x S (aspect ratio not kept: faces crops are near square and
                the detectors see the same geometry at train and test time).
The report (``report``) lists every skipped file with its reason and counts per reason, and the
near-duplicate counts per split pair (``duplicates``); the pairs themselves go to ``cfg.duplicates``
(see :mod:`dfpipe.data.dedup`).
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
from .dedup import DUP_COLUMNS, dedup_report, find_duplicates, hash_image
from .faces import FaceResult, apply_face_crop, check_face_config
from .images import ImageError, decode_image, list_images, resize_square
from .labels import read_labels

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["uid", "img_name", "split", "label", "path", "cache_file", "cache_index", "orig_w",
                    "orig_h", "error", "phash", "dhash", "dup_group", "face", "face_x", "face_y", "face_w", "face_h"]


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


@dataclass(frozen=True)
class Loaded:
    """What the worker sends back for one image (picklable)."""

    img: np.ndarray | None  # the resized cache image; None when the image is not used
    size: tuple[int, int] = (0, 0)  # original (w, h)
    error: str = ""
    phash: str = ""
    dhash: str = ""
    digest: str = ""
    face: FaceResult = FaceResult("")


def _load(path: Path, cfg: PrepareConfig) -> Loaded:
    """Worker: decode once, hash, optionally crop to the face, resize into the cache."""
    try:
        img = decode_image(path, max_pixels=cfg.max_pixels, min_side=cfg.min_side)
    except ImageError as exc:
        return Loaded(None, error=str(exc))
    h, w = img.shape[:2]
    hashes = hash_image(img)  # of the whole decoded image: duplicates are about the source photo
    crop, face = apply_face_crop(img, cfg.face_crop, cfg.face_margin, cfg.face_policy)
    if crop is None:
        return Loaded(None, (w, h), f"no face found (face_policy={cfg.face_policy})", hashes.phash,
                      hashes.dhash, hashes.digest, face)
    return Loaded(resize_square(crop, cfg.cache_size), (w, h), "", hashes.phash, hashes.dhash, hashes.digest,
                  face)


def prepare(cfg: PrepareConfig) -> dict:
    """Run stage 1 and return the report dict (also written to ``cfg.report``)."""
    check_face_config(cfg.face_crop, cfg.face_margin, cfg.face_policy)
    if not 0 <= cfg.dup_max_distance <= 64:
        raise ValueError(f"prepare.dup_max_distance={cfg.dup_max_distance}: must be in [0, 64]")
    items, skipped = collect_items(cfg)
    out = Path(cfg.out_dir)
    tmp_out = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tmp_out.mkdir(parents=True)
    workers = cfg.workers or os.cpu_count() or 1
    rows: list[dict] = []
    digests: list[str] = []
    size = cfg.cache_size
    load = partial(_load, cfg=cfg)
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else _Serial() as pool:
        for split in SPLITS:
            split_items = [it for it in items if it.split == split]
            cache = np.lib.format.open_memmap(
                tmp_out / f"{split}.npy", mode="w+", dtype=np.uint8, shape=(len(split_items), size, size, 3)
            )
            n_ok = 0
            # map() keeps input order and streams results: memory stays bounded by the chunk size.
            results = pool.map(load, [it.path for it in split_items], chunksize=16)
            for it, res in tqdm(
                zip(split_items, results), total=len(split_items), desc=f"prepare {split}", unit="img"
            ):
                rows.append(_row(it, res))
                digests.append(res.digest)
                if res.img is None:
                    log.warning("%s: skipped: %s", it.path, res.error)
                    skipped.append({"split": split, "file": str(it.path), "reason": res.error})
                    continue
                row = rows[-1]
                cache[n_ok] = res.img
                row["cache_index"] = n_ok
                n_ok += 1
            cache.flush()
            del cache
            if n_ok < len(split_items):  # drop the rows reserved for skipped images
                _truncate_npy(tmp_out / f"{split}.npy", n_ok)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    pairs, dup_summary = _duplicates(manifest, digests, cfg.dup_max_distance)
    write_csv(tmp_out / "manifest.csv", manifest)
    _check_usable(manifest)
    write_csv(cfg.duplicates, pairs)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp_out, out)
    report = _report(manifest, skipped, size)
    report["duplicates"] = dup_summary
    report["faces"] = _face_counts(manifest, cfg.face_crop)
    write_json(cfg.report, report)
    log.info("prepared %d images (%s), skipped %d", len(manifest), dict(Counter(manifest.split)), len(skipped))
    return report


def _row(it: Item, res: Loaded) -> dict:
    """The manifest row of one image (cache_index and dup_group are filled in later)."""
    w, h = res.size
    fx, fy, fw, fh = res.face.box
    return dict(uid=f"{it.split}/{it.img_name}", img_name=it.img_name, split=it.split, label=it.label,
                path=str(it.path), cache_file=f"{it.split}.npy", cache_index=-1, orig_w=w, orig_h=h,
                error=res.error, phash=res.phash, dhash=res.dhash, dup_group=-1, face=res.face.status,
                face_x=fx, face_y=fy, face_w=fw, face_h=fh)


def _duplicates(manifest: pd.DataFrame, digests: list[str], max_distance: int) -> tuple[pd.DataFrame, dict]:
    """Find duplicate pairs among every decoded image; sets ``manifest.dup_group`` in place.

    Images dropped by the face policy are hashed too (they may still leak across splits).
    """
    hashed = (manifest.phash != "").to_numpy()
    table = manifest.loc[hashed, ["uid", "split", "phash", "dhash"]].assign(
        digest=np.asarray(digests, dtype=object)[hashed])
    pairs, gid = find_duplicates(table.reset_index(drop=True), max_distance)
    manifest.loc[hashed, "dup_group"] = gid
    manifest["dup_group"] = manifest.dup_group.astype(int)
    summary = dedup_report(pairs, gid, max_distance)
    log.info("duplicates (pHash distance <= %d): %d pairs %s", max_distance, len(pairs), summary["pairs"])
    cross = sum(v for k, v in summary["pairs"].items() if not k.startswith("within_"))
    if cross:
        log.warning("%d near-duplicate pairs across train/val/test: possible leakage (see the duplicates csv)", cross)
    return pairs[DUP_COLUMNS], summary


def _face_counts(manifest: pd.DataFrame, face_crop: str) -> dict:
    """How many images had one face, several, none, or were skipped (``largest_of_N`` counted together)."""
    status = manifest.face[manifest.face != ""].str.replace(r"_of_\d+$", "_of_n", regex=True)
    return {"detector": face_crop, **{str(k): int(v) for k, v in status.value_counts().sort_index().items()}}


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
