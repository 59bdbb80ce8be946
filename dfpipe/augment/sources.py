"""Stage 2 inputs: the real images generation starts from, and reading their rows of the prepared caches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.samples import load_manifest
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
    """Read rows of the prepared ``.npy`` caches (memory-mapped once per file)."""

    def __init__(self, prepared_dir: str | Path) -> None:
        self.dir = Path(prepared_dir)
        self._maps: dict[str, np.ndarray] = {}

    def get(self, cache_file: str, index: int) -> np.ndarray:
        if cache_file not in self._maps:
            path = self.dir / cache_file
            if not path.is_file():
                raise InputError(f"{path} not found (listed in the prepared manifest)")
            self._maps[cache_file] = np.load(path, mmap_mode="r")
        return np.array(self._maps[cache_file][int(index)], dtype=np.uint8)  # a private copy

    def size(self, cache_file: str) -> int:
        self.get(cache_file, 0)
        return int(self._maps[cache_file].shape[1])


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
