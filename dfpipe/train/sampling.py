"""Resumable, worker-count-independent randomness for the training DataLoader.

Every epoch, :class:`SeededSampler` draws the shuffle order *and one augmentation seed per sample* from
one ``torch.Generator`` in the main process. :class:`SeededAugmentDataset` re-seeds the albumentations
pipeline with that seed before augmenting the sample. So an epoch's batches depend only on that
generator's state (saved in ``last.pt``), not on how many DataLoader workers there are nor on whether
the run was resumed: workers and their private RNG copies play no part.
"""

from __future__ import annotations

from collections.abc import Iterator

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data.dataset import CacheDataset

SEED_HIGH = 2**31 - 1


class SeededSampler(Sampler[tuple[int, int]]):
    """Yield ``(index, augmentation_seed)`` pairs in a random order drawn from ``generator``."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n = n
        self.generator = generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(0, SEED_HIGH, (self.n,), generator=self.generator).tolist()
        return iter(zip(order, seeds))


class SeededAugmentDataset(Dataset):
    """A :class:`CacheDataset` item augmented by ``aug`` re-seeded with the sampler's per-sample seed."""

    def __init__(self, base: CacheDataset, aug: A.Compose | None):
        if base.transform is not None:
            raise ValueError("the base dataset must not transform: augmentation is seeded here")
        self.base = base
        self.aug = aug

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        i, seed = item
        x, y, idx = self.base[i]
        if self.aug is None:
            return x, y, idx
        self.aug.set_random_seed(int(seed))
        img = self.aug(image=x.numpy())["image"]
        return torch.from_numpy(np.ascontiguousarray(img)), y, idx
