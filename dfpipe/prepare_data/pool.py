"""Stage 1 decoding: worker processes decode, hash and make each stage-1 image (downscale, face crop) and its
stored bytes; the caller appends them to the chunk's shard and commits each chunk."""

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
from tqdm import tqdm

from ..data.dedup import hash_image
from ..data.faces import FaceResult
from ..data.images import ImageError, decode_file
from ..data.preprocess import Stage1, stage1_image
from ..data.store import ShardWriter, shard_name, stored_bytes
from ..workers import exit_with_parent
from .sources import Item
from .work import Work

log = logging.getLogger(__name__)
TASK_SIZE = 16  # images per worker task: amortises inter-process overhead, bounds memory in flight


@dataclass(frozen=True)
class Loaded:
    """What the worker sends back for one image (picklable)."""

    data: bytes | None  # the stored bytes (see dfpipe.data.store); None when the image is not used
    size: tuple[int, int] = (0, 0)  # original (w, h), after EXIF rotation
    error: str = ""
    kind: str = ""  # reason code of ``error``
    phash: str = ""
    dhash: str = ""
    digest: str = ""
    face: FaceResult = FaceResult("")
    notes: tuple[str, ...] = ()
    stored_size: tuple[int, int] = (0, 0)  # (w, h) of the stage-1 image
    stored: str = ""  # original | png
    file_bytes: int = 0


def _load(path: str, s1: Stage1) -> Loaded:
    """Worker: decode once, hash, make the stage-1 image and its stored bytes. Never raises."""
    try:
        raw, dec = decode_file(path, max_pixels=s1.max_pixels, min_side=s1.min_side)
    except ImageError as exc:
        return Loaded(None, error=str(exc), kind=exc.kind)
    except Exception as exc:  # noqa: BLE001 - one file must never stop a 500k run
        return Loaded(None, error=f"decode failed: {type(exc).__name__}: {exc}", kind="corrupt")
    img = dec.img
    h, w = img.shape[:2]
    hashes = hash_image(img)  # of the whole decoded image: duplicates are about the source photo
    out, face = stage1_image(img, s1)
    common = dict(size=(w, h), phash=hashes.phash, dhash=hashes.dhash, digest=hashes.digest, face=face,
                  notes=dec.notes, file_bytes=len(raw))
    if out is None:
        return Loaded(None, error=f"no face found (face_policy={s1.face_policy})", kind="no_face", **common)
    data, how = stored_bytes(raw, dec.format, dec.notes, out, changed=out is not img)
    return Loaded(data, stored_size=(out.shape[1], out.shape[0]), stored=how, **common)


def _load_batch(paths: list[str], s1: Stage1) -> list[Loaded]:
    return [_load(p, s1) for p in paths]


def _init_worker() -> None:
    exit_with_parent()  # a killed stage 1 leaves no orphan decoders
    cv2.setNumThreads(1)  # the pool already uses every core; OpenCV threads on top would oversubscribe


class Task(NamedTuple):
    """Images ``offset ...`` of chunk ``chunk`` of ``split``, decoded by one worker call."""

    split: str
    chunk: int
    offset: int
    items: list[Item]
    last: bool  # the chunk's last task: commit the chunk when it is written


def decode_all(s1: Stage1, items: list[Item], work: Work, workers: int = 0) -> None:
    """Decode every chunk of ``work`` not yet committed into stage-1 images of ``s1``, with ``workers`` processes
    (0: one per core); commit each chunk (shard, then rows) as soon as its last image is in."""
    todo = [(s, k, c) for s, k, c in work.chunks(items) if not work.done(s, k)]
    n_chunks = sum(1 for _ in work.chunks(items))
    if len(todo) < n_chunks:
        log.info("resuming from %s: %d of %d chunks already done", work.path, n_chunks - len(todo), n_chunks)
    tasks = (Task(split, k, j, chunk[j:j + TASK_SIZE], j + TASK_SIZE >= len(chunk))
             for split, k, chunk in todo for j in range(0, len(chunk), TASK_SIZE))
    workers = workers or os.cpu_count() or 1
    rows: list[dict] = []
    shard: ShardWriter | None = None
    with tqdm(total=len(items), initial=len(items) - sum(len(c) for _, _, c in todo), desc="prepare",
              unit="img") as bar:
        for task, results in _run_tasks(partial(_load_batch, s1=s1), tasks, workers):
            if task.offset == 0:
                shard = work.shard(task.split, task.chunk)
            assert shard is not None  # tasks come in order: a chunk's first task opens its shard
            for it, res in zip(task.items, results):
                if res.data is None:
                    log.warning("%s: skipped: %s", it.path, res.error)
                rows.append(_row(it, task.split, task.chunk, shard.add(res.data), res))
            if task.last:
                work.commit(task.split, task.chunk, shard, rows)
                rows, shard = [], None
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


def _row(it: Item, split: str, chunk: int, index: int, res: Loaded) -> dict:
    """The work-file row of one image (dup_group is filled in at the end)."""
    w, h = res.size
    fx, fy, fw, fh = res.face.box
    ok = res.data is not None
    return dict(uid=f"{it.split}/{it.img_name}", img_name=it.img_name, split=it.split, label=it.label,
                path=it.path, cache_file=shard_name(split, chunk), cache_index=index if ok else -1,
                orig_w=w, orig_h=h, width=res.stored_size[0], height=res.stored_size[1], error=res.error,
                phash=res.phash, dhash=res.dhash, dup_group=-1,
                face=res.face.status, face_x=fx, face_y=fy, face_w=fw, face_h=fh, dataset=it.dataset,
                converted=";".join(res.notes), error_kind=res.kind, digest=res.digest,
                file_bytes=res.file_bytes, stored_bytes=len(res.data) if ok else 0, stored=res.stored)
