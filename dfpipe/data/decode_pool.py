"""Batches of stage-1 store images at one input policy, decoded in light worker processes.

For inference over a whole pool (stage 3's embedding) in place of a torch ``DataLoader``: its workers are
forks of the calling process, and a fork's RSS counts every resident anonymous page of its parent (the
torch and timm imports, ~550 MB, plus the pool table, ~0.6 kB an image), so one worker doubled the stage's
summed RSS. These workers are spawned: a fresh interpreter that imports only the store reader and the
resize (numpy, OpenCV, PIL; ~90 MB), whatever the caller holds. A task carries the (shard, index) pairs of
one batch; at most ``2 * workers`` batches are in flight, so memory does not grow with the pool either.
The batches are the same arrays, in the same order, with any number of workers (0 = in this process).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np

from ..workers import exit_with_parent
from .preprocess import InputPolicy, fit
from .store import StoreReader

_READER: StoreReader | None = None  # a worker's, for the life of its pool (one store_batches call)


def _init_worker() -> None:
    exit_with_parent()  # a killed stage leaves no orphan decode worker (nor, through it, the resource tracker)
    cv2.setNumThreads(1)  # one batch per worker at a time: OpenCV threads on top would oversubscribe the cores


def decode_batch(reader: StoreReader, paths: Sequence[str], indexes: Sequence[int], policy: InputPolicy
                 ) -> np.ndarray:
    """(B, S, S, 3) uint8 RGB: image ``indexes[i]`` of shard ``paths[i]``, fitted to ``policy`` (no rng)."""
    return np.stack([fit(reader.image(p, int(i)), policy) for p, i in zip(paths, indexes)])


def _decode_in_worker(paths: list[str], indexes: list[int], policy: InputPolicy) -> np.ndarray:
    global _READER
    if _READER is None:
        _READER = StoreReader()
    return decode_batch(_READER, paths, indexes, policy)


def store_batches(paths: Sequence[str], indexes: Sequence[int], policy: InputPolicy, batch_size: int,
                  workers: int) -> Iterator[np.ndarray]:
    """(B, S, S, 3) uint8 per ``batch_size`` images of (``paths[i]``, ``indexes[i]``), in order; the last may
    be short. ``workers`` 0: decoded in this process."""
    if len(paths) != len(indexes):
        raise ValueError(f"{len(paths)} shard paths for {len(indexes)} indexes")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tasks = ((list(paths[s:s + batch_size]), [int(i) for i in indexes[s:s + batch_size]], policy)
             for s in range(0, len(paths), batch_size))
    if workers <= 0:
        reader = StoreReader()  # a fresh one per call: it caches shard indexes, and a store may be rewritten
        try:
            for task in tasks:
                yield decode_batch(reader, *task)
        finally:
            reader.close()
        return
    # spawn, not fork: a fork would carry the caller's memory (and any lock a torch or OpenCV thread holds)
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, mp_context=ctx)
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(_decode_in_worker, *task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
