"""The sample pool shared by stages 3-5: prepared images plus stage-2 generated ones.

Every sample has a ``uid`` (``train/x.jpg``, ``val/y.jpg``, ``test/z.jpg``, ``aug/self_blend_000001.png``),
a label (1 fake, 0 real, -1 unknown), its ``origin`` (train/val/test/aug), the ``source_uid`` it was
derived from (itself for original images), the ``donor_uid`` that lent it pixels (a splice's second image;
"" for none) and where its pixels live (``cache_path``, ``cache_index``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..errors import DataError, InputError
from .store import check_manifest

POOL_COLUMNS = ["uid", "img_name", "label", "origin", "source_uid", "donor_uid", "method", "cache_path",
                "cache_index", "dup_group"]
# the columns of stage 1's and stage 2's manifests load_pool reads: the others (source path, hashes, sizes, face
# box; an edit's params) are not parsed, so a 500k-image pool does not hold (or leave fragmented in the heap)
# ~0.4 kB of strings an image that it never uses
POOL_MANIFEST_COLUMNS = ("uid", "img_name", "split", "label", "cache_file", "cache_index", "dup_group")
AUG_MANIFEST_COLUMNS = ("uid", "img_name", "label", "source_uid", "donor_uid", "method", "cache_file", "cache_index")


def load_manifest(prepared_dir: str | Path, ok_only: bool = True, columns: Sequence[str] | None = None
                  ) -> pd.DataFrame:
    """The stage-1 manifest; ``ok_only`` drops images that failed to decode; ``columns``: only those of them
    the file has (``cache_index`` among them when ``ok_only``). A manifest that does not match the row count
    and sha256 of its ``store.json`` (cut, edited) is a one-line DataError naming it."""
    path = Path(prepared_dir) / "manifest.csv"
    if not path.is_file():
        raise InputError(f"{path} not found: run stage 1 (python 01_prepare_data.py) first")
    rows = check_manifest(path.parent, "stage 1 (python 01_prepare_data.py)")
    usecols = None if columns is None else set(columns).__contains__
    df = pd.read_csv(path, keep_default_na=False, dtype={"img_name": str, "error": str}, usecols=usecols)
    _check_rows(path, df, rows)
    return df[df.cache_index >= 0].reset_index(drop=True) if ok_only else df


def _check_rows(path: Path, df: pd.DataFrame, rows: int | None) -> None:
    """The parsed row count against the one ``store.json`` records (None: not recorded)."""
    if rows is not None and len(df) != rows:
        raise DataError(f"{path}: {len(df)} rows parsed, its store.json records {rows}; rerun the stage that wrote it")


def load_pool(prepared_dir: str | Path, augmented_dir: str | Path | None = None,
              splits: tuple[str, ...] = ("train", "val")) -> pd.DataFrame:
    """Original images of ``splits`` plus (if given) every generated image, with POOL_COLUMNS."""
    prepared_dir = Path(prepared_dir)
    man = load_manifest(prepared_dir, columns=POOL_MANIFEST_COLUMNS)
    man = man[man.split.isin(splits)]
    shards = {f: str(prepared_dir / f) for f in man.cache_file.unique()}  # one path string per shard, not per row
    pool = pd.DataFrame({
        "uid": man.uid, "img_name": man.img_name, "label": man.label.astype(int), "origin": man.split,
        "source_uid": man.uid, "donor_uid": "", "method": "original",
        "cache_path": man.cache_file.map(shards), "cache_index": man.cache_index,
        # near-duplicate group from stage 1 (-1 = unknown, e.g. a manifest from before dedup)
        "dup_group": man.dup_group.astype(int) if "dup_group" in man else -1,
    })
    if augmented_dir is not None:
        aug_path = Path(augmented_dir) / "manifest.csv"
        if not aug_path.is_file():
            raise InputError(f"{aug_path} not found: run stage 2 (python 02_augment_sd.py) first")
        rows = check_manifest(aug_path.parent, "stage 2 (python 02_augment_sd.py)")
        aug = pd.read_csv(aug_path, keep_default_na=False, dtype={"img_name": str},
                          usecols=set(AUG_MANIFEST_COLUMNS).__contains__)  # not params, seed, mask_path
        _check_rows(aug_path, aug, rows)
        if len(aug):
            pool = pd.concat([pool, pd.DataFrame({
                "uid": aug.uid, "img_name": aug.img_name, "label": aug.label.astype(int), "origin": "aug",
                "source_uid": aug.source_uid,
                # stage 3 checks a splice's donor fold too; a manifest from before donor_uid: none
                "donor_uid": aug.donor_uid.astype(str) if "donor_uid" in aug else "", "method": aug.method,
                "cache_path": aug.cache_file.map({f: str(Path(augmented_dir) / f) for f in aug.cache_file.unique()}),
                "cache_index": aug.cache_index, "dup_group": -1,
            })], ignore_index=True)
    if pool.uid.duplicated().any():
        dup = pool.uid[pool.uid.duplicated()].iloc[0]
        raise DataError(f"duplicate sample uid {dup!r} in the pool")
    return pool.reset_index(drop=True)


def load_split_pool(splits_csv: str | Path, prepared_dir: str | Path,
                    augmented_dir: str | Path | None = None) -> pd.DataFrame:
    """The pool (:func:`load_pool`) joined with stage 3's split table (cluster, fold, subset), in pool order.

    Without ``augmented_dir`` the generated images' rows of the split table are left out.
    """
    path = Path(splits_csv)
    if not path.is_file():
        raise InputError(f"{path} not found: run stage 3 (python 03_cluster_split.py) first")
    splits = pd.read_csv(path, keep_default_na=False, dtype={"img_name": str})
    if augmented_dir is None:
        splits = splits[splits.origin != "aug"]
    pool = load_pool(prepared_dir, augmented_dir)
    df = pool.merge(splits[["uid", "cluster", "fold", "subset"]], on="uid", how="inner", validate="1:1")
    if len(df) != len(splits):
        raise DataError(f"{path}: {len(splits) - len(df)} rows have no image in the pool; rerun stage 3")
    return df
