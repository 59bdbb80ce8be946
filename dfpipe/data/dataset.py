"""Datasets over the image stores of stages 1 and 2 (:mod:`dfpipe.data.store`).

An item's images are decoded from the store in the DataLoader worker and cut to each requested input
policy there (:func:`dfpipe.data.preprocess.fit`), so batches are uint8 ``(B, size, size, 3)`` tensors:
normalising happens on the device (:func:`dfpipe.data.transforms.to_model_input`), the same way at
train and test time, and uint8 moves 4x fewer bytes to the GPU than float32.

Items are ``(inputs, label, index)`` with ``inputs`` a dict ``{policy.key: tensor}``: one entry per
input policy asked for, so experts that share a policy share one decoded batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .preprocess import InputPolicy, fit
from .store import StoreReader


class StoreDataset(Dataset):
    """Images of a pool (columns ``cache_path``, ``cache_index``, ``label``) at one or more input policies.

    The policies crop centrally (test time). Training's random crops are
    :class:`dfpipe.train_experts.sampling.SeededAugmentDataset`'s.
    """

    def __init__(self, pool: pd.DataFrame, policies: Sequence[InputPolicy]):
        if not policies:
            raise ValueError("StoreDataset needs at least one input policy")
        self.paths = pool.cache_path.to_numpy()
        self.index = pool.cache_index.to_numpy(dtype=np.int64)
        self.labels = pool.label.to_numpy(dtype=np.int64)
        self.policies = tuple(dict.fromkeys(policies))  # unique, in order
        self.reader = StoreReader()  # picklable: each worker opens its own files

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> np.ndarray:
        """The stage-1 image of item ``i``: (H, W, 3) uint8 RGB at native resolution."""
        return self.reader.image(self.paths[i], int(self.index[i]))

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int, int]:
        img = self.image(i)
        return {p.key: torch.from_numpy(fit(img, p)) for p in self.policies}, int(self.labels[i]), i
