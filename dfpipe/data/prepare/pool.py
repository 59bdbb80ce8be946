"""Stage 1 decoding: worker processes decode, hash, face-crop and resize; the caller writes the pixels and
commits each chunk."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import cv2
import numpy as np
from tqdm import tqdm

from ...config import PrepareConfig
from ..dedup import hash_image
from ..faces import FaceResult, apply_face_crop
from ..images import ImageError, decode, resize_square
from .sources import Item
from .work import Work, _chunks

log = logging.getLogger(__name__)
TASK_SIZE = 16  # images per worker task: amortises inter-process overhead, bounds memory in flight


@dataclass(frozen=True)
class Loaded:
    """What the worker sends back for one image (picklable)."""

    img: np.ndarray | None  # the resized cache image; None when the image is not used
    size: tuple[int, int] = (0, 0)  # original (w, h)
    error: str = ""
    kind: str = ""  # reason code of ``error``
    phash: str = ""
    dhash: str = ""
    digest: str = ""
    face: FaceResult = FaceResult("")
    notes: tuple[str, ...] = ()


def _load(path: str, cfg: PrepareConfig) -> Loaded:
    """Worker: decode once, hash, optionally crop to the face, resize into the cache. Never raises."""
    try:
        dec = decode(path, max_pixels=cfg.max_pixels, min_side=cfg.min_side)
    except ImageError as exc:
        return Loaded(None, error=str(exc), kind=exc.kind)
    except Exception as exc:  # noqa: BLE001 - one file must never stop a 500k run
        return Loaded(None, error=f"decode failed: {type(exc).__name__}: {exc}", kind="corrupt")
    img = dec.img
    h, w = img.shape[:2]
    hashes = hash_image(img)  # of the whole decoded image: duplicates are about the source photo
    crop, face = apply_face_crop(img, cfg.face_crop, cfg.face_margin, cfg.face_policy)
    if crop is None:
        return Loaded(None, (w, h), f"no face found (face_policy={cfg.face_policy})", "no_face", hashes.phash,
                      hashes.dhash, hashes.digest, face, dec.notes)
    return Loaded(resize_square(crop, cfg.cache_size), (w, h), "", "", hashes.phash, hashes.dhash, hashes.digest,
                  face, dec.notes)


def _load_batch(paths: list[str], cfg: PrepareConfig) -> list[Loaded]:
    return [_load(p, cfg) for p in paths]


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the pool already uses every core; OpenCV threads on top would oversubscribe


class Task(NamedTuple):
    """Images ``offset ...`` of chunk ``chunk`` of ``split``, decoded by one worker call."""

    split: str
    chunk: int
    offset: int
    items: list[Item]
    last: bool  # the chunk's last task: commit the chunk when it is written


def _decode_all(cfg: PrepareConfig, items: list[Item], work: Work) -> None:
    """Decode every chunk not yet committed; commit each as soon as its last image is written."""
    todo = [(s, k, c) for s, k, c in _chunks(items, cfg.chunk_size) if not work.chunk_file(s, k).is_file()]
    n_chunks = sum(1 for _ in _chunks(items, cfg.chunk_size))
    if len(todo) < n_chunks:
        log.info("resuming from %s: %d of %d chunks already done", work.path, n_chunks - len(todo), n_chunks)
    tasks = (Task(split, k, j, chunk[j:j + TASK_SIZE], j + TASK_SIZE >= len(chunk))
             for split, k, chunk in todo for j in range(0, len(chunk), TASK_SIZE))
    workers = cfg.workers or os.cpu_count() or 1
    rows: list[dict] = []
    with tqdm(total=len(items), initial=len(items) - sum(len(c) for _, _, c in todo), desc="prepare",
              unit="img") as bar:
        for task, results in _run_tasks(partial(_load_batch, cfg=cfg), tasks, workers):
            start = task.chunk * cfg.chunk_size + task.offset  # cache row of the task's first image
            block = np.zeros((len(results), cfg.cache_size, cfg.cache_size, 3), np.uint8)  # (B, S, S, 3)
            for i, (it, res) in enumerate(zip(task.items, results)):
                if res.img is not None:
                    block[i] = res.img
                else:
                    log.warning("%s: skipped: %s", it.path, res.error)
                rows.append(_row(it, start + i, res))
            work.write_rows(task.split, start, block)
            if task.last:
                work.commit(task.split, task.chunk, rows)
                rows = []
            bar.update(len(results))


def _run_tasks(fn: Callable[[list[str]], list[Loaded]], tasks: Iterable[Task], workers: int,
               ) -> Iterator[tuple[Task, list[Loaded]]]:
    """(task, fn(task's paths)) in task order, with at most ``2 * workers`` tasks in flight.

    Executor.map would submit every task up front (one future per task: O(N) memory); this keeps the
    memory of decoded images in flight constant whatever N is.
    """
    if workers == 1:  # in-process: easier debugging, no fork
        for task in tasks:
            yield task, fn([it.path for it in task.items])
        return
    # spawn, not fork: forking a process whose threads (torch, OpenCV, a server) hold locks can deadlock
    # the children; a fresh interpreter per worker costs about a second once per run
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, mp_context=ctx) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append((task, pool.submit(fn, [it.path for it in task.items])))
            if len(pending) >= 2 * workers:
                done, fut = pending.popleft()
                yield done, fut.result()
        while pending:
            done, fut = pending.popleft()
            yield done, fut.result()


def _row(it: Item, index: int, res: Loaded) -> dict:
    """The work-file row of one image (dup_group is filled in at the end)."""
    w, h = res.size
    fx, fy, fw, fh = res.face.box
    return dict(uid=f"{it.split}/{it.img_name}", img_name=it.img_name, split=it.split, label=it.label,
                path=it.path, cache_file=f"{it.split}.npy", cache_index=index if res.img is not None else -1,
                orig_w=w, orig_h=h, error=res.error, phash=res.phash, dhash=res.dhash, dup_group=-1,
                face=res.face.status, face_x=fx, face_y=fy, face_w=fw, face_h=fh, dataset=it.dataset,
                converted=";".join(res.notes), error_kind=res.kind, digest=res.digest)
