"""Stage 2 inputs: the real images generation starts from, read from the prepared image store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.samples import load_manifest
from ..data.store import StoreReader
from ..errors import DataError, InputError


def load_reals(prepared_dir: str | Path) -> pd.DataFrame:
    """Decodable real (label 0) images of the train and val splits, sorted by uid."""
    path = Path(prepared_dir) / "manifest.csv"
    man = load_manifest(prepared_dir)  # decodable images only; clear error when stage 1 has not run
    missing = {"uid", "split", "label", "cache_file", "cache_index"} - set(man.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}")
    reals = man[man.split.isin(["train", "val"]) & (man.label.astype(int) == 0)]
    if reals.empty:
        raise DataError(f"{path}: no real (label 0) image in the train or val split: nothing to augment from")
    return reals.sort_values("uid", kind="stable").reset_index(drop=True)


class CacheReader:
    """Stage-1 images of a prepared folder by the manifest's (``cache_file``, ``cache_index``): each at its
    own native size, (H, W, 3) uint8 RGB, read from the image store (:mod:`dfpipe.data.store`)."""

    def __init__(self, prepared_dir: str | Path) -> None:
        self.dir = Path(prepared_dir)
        self._store = StoreReader()
        self._seen: set[str] = set()

    def get(self, cache_file: str, index: int) -> np.ndarray:
        path = self.dir / str(cache_file)
        if cache_file not in self._seen:
            if not path.is_file():
                raise InputError(f"{path} not found (listed in the prepared manifest): rerun stage 1")
            self._seen.add(cache_file)
        return self._store.image(path, int(index))  # a fresh array: the caller may keep it

    def raw(self, cache_file: str, index: int) -> bytes:
        """The stored bytes of an image (a clean stage-1 JPEG keeps its own: its quantisation tables)."""
        path = self.dir / str(cache_file)
        if not path.is_file():
            raise InputError(f"{path} not found (listed in the prepared manifest): rerun stage 1")
        return self._store.read(path, int(index))


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
