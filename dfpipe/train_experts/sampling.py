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

:class:`PairBatchSampler` (expert setting ``pair_batches``) keeps all of that and draws groups instead of
samples: an original and every stage-2 image made from it land in one global batch, so the batch holds
matched content and the gradient contrasts the generator's traces (Dual Data Alignment's aligned pairs).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import albumentations as A
import numpy as np
import pandas as pd
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


def shard_length(n: int, rank: int, world: int, length: int | None) -> int:
    """The epoch length a sampler of ``n`` rows uses (default ``n``), checked with ``rank`` of ``world``: positions
    in (0, n], divisible over the ranks."""
    length = n if length is None else length
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    if not 0 < length <= n or length % world:
        raise ValueError(f"epoch length {length} must be in (0, {n}] and divisible by {world} ranks")
    return length


class SeededSampler(Sampler[tuple[int, int]]):
    """Yield ``(index, augmentation_seed)`` pairs in a random order drawn from ``generator``.

    ``length`` (default ``n``) positions of the global order are used per epoch (see :func:`epoch_length`);
    this rank yields every ``world``-th of them from ``rank``.
    """

    def __init__(self, n: int, generator: torch.Generator, rank: int = 0, world: int = 1, length: int | None = None):
        length = shard_length(n, rank, world, length)
        self.n, self.generator, self.rank, self.world, self.length = n, generator, rank, world, length

    def __len__(self) -> int:
        return self.length // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # always n draws of each: the generator's next state depends on neither rank, world nor length
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(0, SEED_HIGH, (self.n,), generator=self.generator).tolist()
        pairs = list(zip(order, seeds))[:self.length]
        return iter(pairs[self.rank::self.world])


def pair_groups(df: pd.DataFrame) -> np.ndarray:
    """The group code (0..G-1) of each row of ``df`` (pool columns uid, origin, source_uid): its root image.

    An original is its own root; a generated row's root is its ``source_uid`` (a reconstruction, the real copy
    stage 2 stores beside it, an editing forgery: a splice groups with its source, not its donor)."""
    roots = np.where(df.origin.to_numpy() == "aug", df.source_uid.to_numpy(), df.uid.to_numpy())
    return pd.factorize(roots)[0]


class PairBatchSampler(Sampler[tuple[int, int]]):
    """:class:`SeededSampler`'s contract, with each group of ``groups`` (:func:`pair_groups`) inside one global batch.

    Every epoch draws a random order of the *groups* and one augmentation seed per position from ``generator``
    (always G + n draws: the next state depends on neither rank, world, length nor batch), then packs the groups,
    in that order, into ``length // batch`` global batches of ``batch`` (the global batch; a ``length`` below it
    is one batch of ``length``). A group that does not fit the current batch waits and starts a later one, so
    batches are full and whole groups stay together. A group is split only when it is larger than a batch, or
    when no group left fits the space a batch has left (sizes that cannot tile a batch: only triples in batches
    of 4); such a group spans two consecutive batches (:func:`pack_groups`). Rows past the last batch sit the
    epoch out (fewer than one batch, as with SeededSampler).

    Rank ``r`` of ``world`` yields positions ``r, r + world, ...`` of the packed order: the shards are disjoint
    and their batch ``k`` together is the one-process batch ``k``. So a pair is in one *global* batch, but
    under DDP its two images may sit on different ranks: the all-reduced gradient and the gathered NCE term see
    the pair, per-rank BN statistics (without sync_bn) and mixup's partners do not.
    """

    def __init__(self, groups: np.ndarray, generator: torch.Generator, batch: int, rank: int = 0, world: int = 1,
                 length: int | None = None):
        n = len(groups)
        length = shard_length(n, rank, world, length)
        self.cap = min(batch, length)  # rows per global batch
        if length % self.cap or self.cap % world:
            raise ValueError(f"epoch length {length} must be whole batches of {self.cap} split over {world} ranks")
        self.n, self.generator, self.rank, self.world, self.length = n, generator, rank, world, length
        groups = np.asarray(groups)
        self.members = np.argsort(groups, kind="stable")  # rows grouped, each group in row order
        sizes = np.bincount(groups)
        self.ends = np.cumsum(sizes)
        self.starts = self.ends - sizes  # group g = members[starts[g]:ends[g]]

    def __len__(self) -> int:
        return self.length // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # draws first, always the same number: the generator's next state depends on the data only
        order = torch.randperm(len(self.starts), generator=self.generator).numpy()
        seeds = torch.randint(0, SEED_HIGH, (self.n,), generator=self.generator).numpy()
        starts, sizes = _pieces(self.starts[order], self.ends[order], self.cap)
        spans = pack_groups(starts, sizes, self.cap, self.length // self.cap)
        rows = self.members[_expand(spans)]
        pairs = list(zip(rows.tolist(), seeds[:self.length].tolist()))
        return iter(pairs[self.rank::self.world])


def _pieces(starts: np.ndarray, ends: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Groups ``[starts, ends)`` (in order) cut into consecutive pieces of at most ``cap`` rows: (starts, sizes)."""
    count = -(-(ends - starts) // cap)  # pieces per group: 1 unless it is larger than a batch
    first = np.repeat(starts, count)
    k = np.arange(len(first)) - np.repeat(np.cumsum(count) - count, count)  # piece number within its group
    piece_starts = first + k * cap
    return piece_starts, np.minimum(cap, np.repeat(ends, count) - piece_starts)


def pack_groups(starts: np.ndarray, sizes: np.ndarray, cap: int, n_batches: int) -> list[tuple[int, int]]:
    """``n_batches`` full batches of ``cap`` rows from the groups ``(start, size)`` taken in order, as spans
    ``(start, size)`` one batch after another.

    A group too big for the space left waits (by size) and is placed first, largest that fits, in a later
    batch. When the stream runs out before a batch is full, the smallest waiting group is split to fill it and
    its rest opens the next batch: it spans two consecutive batches.
    """
    waiting: list[deque[tuple[int, int]]] = [deque() for _ in range(cap + 1)]  # by size
    stream = zip(starts.tolist(), sizes.tolist())
    spans: list[tuple[int, int]] = []
    rest = None  # the second part of a group split to fill the previous batch
    for _ in range(n_batches):
        space = cap
        if rest is not None:
            spans.append(rest)
            space -= rest[1]
            rest = None
        size = space
        while size > 0:  # waiting groups first, largest that fits
            if waiting[size]:
                spans.append(waiting[size].popleft())
                space -= size
                size = min(size, space)
            else:
                size -= 1
        while space > 0:  # waiting groups left are all larger than space: the stream's next groups
            group = next(stream, None)
            if group is None:
                break
            if group[1] <= space:
                spans.append(group)
                space -= group[1]
            else:
                waiting[group[1]].append(group)
        if space > 0:  # no whole group left fits: split one (the rows suffice, see PairBatchSampler)
            start, size = waiting[next(s for s in range(space + 1, cap + 1) if waiting[s])].popleft()
            spans.append((start, space))
            rest = (start + space, size - space)
    return spans


def _expand(spans: list[tuple[int, int]]) -> np.ndarray:
    """The positions covered by ``spans``, in order."""
    starts, sizes = np.array(spans, dtype=np.int64).reshape(-1, 2).T
    offsets = np.cumsum(sizes) - sizes
    return np.repeat(starts - offsets, sizes) + np.arange(int(sizes.sum()))


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
