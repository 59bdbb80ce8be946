"""Resumable, worker-count-independent randomness for the training DataLoader.

Every epoch, :class:`SeededSampler` draws the shuffle order *and one augmentation seed per sample* from
one ``torch.Generator`` in the main process. :class:`SeededAugmentDataset` re-seeds the albumentations
pipeline with that seed before augmenting the sample. So an epoch's batches depend only on that
generator's state (saved in ``last.pt``), not on how many DataLoader workers there are nor on whether
the run was resumed: workers and their private RNG copies play no part.

Under DDP every rank holds a generator in the same state and draws the same global order; rank ``r`` of
``world`` takes positions ``r, r + world, r + 2 * world, ...`` of it. The shards are disjoint, their union
is exactly the one-process epoch, and global batch ``k`` (``world`` per-rank batches ``k``) holds the
samples of the one-process batch ``k``.
"""

from __future__ import annotations

from collections.abc import Iterator

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data.dataset import StoreDataset
from ..data.preprocess import InputPolicy, fit

SEED_HIGH = 2**31 - 1


def epoch_length(n: int, batch_size: int, world: int = 1) -> int:
    """How many of ``n`` samples an epoch uses with global batch ``batch_size`` over ``world`` ranks.

    Whole batches only (the tail ``drop_last`` would drop), so every rank runs the same number of
    equal-sized steps (DDP needs that); a set no bigger than one batch is used whole, less the remainder
    of an even split over the ranks.
    """
    if n > batch_size:
        return n - n % batch_size
    return n - n % world


class SeededSampler(Sampler[tuple[int, int]]):
    """Yield ``(index, augmentation_seed)`` pairs in a random order drawn from ``generator``.

    ``length`` (default ``n``) positions of the global order are used per epoch (see :func:`epoch_length`);
    this rank yields every ``world``-th of them from ``rank``.
    """

    def __init__(self, n: int, generator: torch.Generator, rank: int = 0, world: int = 1, length: int | None = None):
        length = n if length is None else length
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        if not 0 < length <= n or length % world:
            raise ValueError(f"epoch length {length} must be in (0, {n}] and divisible by {world} ranks")
        self.n, self.generator, self.rank, self.world, self.length = n, generator, rank, world, length

    def __len__(self) -> int:
        return self.length // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # always n draws of each: the generator's next state depends on neither rank, world nor length
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(0, SEED_HIGH, (self.n,), generator=self.generator).tolist()
        pairs = list(zip(order, seeds))[:self.length]
        return iter(pairs[self.rank::self.world])


class SeededAugmentDataset(Dataset):
    """A :class:`StoreDataset` item cut to ``policy`` (random crop) and augmented by ``aug``, both seeded
    with the sampler's per-sample seed. Items are ``({policy.key: uint8 tensor}, label, index)``."""

    def __init__(self, base: StoreDataset, policy: InputPolicy, aug: A.Compose | None):
        self.base, self.policy, self.aug = base, policy, aug

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[dict[str, torch.Tensor], int, int]:
        i, seed = item
        img = fit(self.base.image(i), self.policy, np.random.default_rng(seed))
        if self.aug is not None:
            self.aug.set_random_seed(int(seed))
            img = self.aug(image=img)["image"]
        return {self.policy.key: torch.from_numpy(np.ascontiguousarray(img))}, int(self.base.labels[i]), i
