"""A Dataset over the uint8 image caches (``.npy`` memmaps) of stages 1 and 2.

Items are uint8 (S, S, 3) tensors: resizing to each model's size and normalising happen on the
device, in batches (:func:`dfpipe.data.transforms.to_model_input`), the same way at train and test
time, and uint8 moves 4x fewer bytes to the GPU than float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset


class CacheDataset(Dataset):
    def __init__(self, pool: pd.DataFrame, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        self.paths = pool.cache_path.to_numpy()
        self.index = pool.cache_index.to_numpy(dtype=np.int64)
        self.labels = pool.label.to_numpy(dtype=np.int64)
        self.transform = transform
        self._arrays: dict[str, np.ndarray] = {}  # opened lazily in each worker (memmaps don't pickle well)

    def __len__(self) -> int:
        return len(self.index)

    def _array(self, path: str) -> np.ndarray:
        arr = self._arrays.get(path)
        if arr is None:
            arr = self._arrays[path] = np.load(path, mmap_mode="r")
        return arr

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img = np.array(self._array(self.paths[i])[self.index[i]])  # (S, S, 3) uint8, a copy
        if self.transform is not None:
            img = self.transform(img)
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.labels[i]), i

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state
