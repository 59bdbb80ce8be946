"""Stage 1: validate the input datasets, decode every image once, write a resized cache.

Inputs: by default the competition layout under ``data_root`` (``trainset/`` + ``trainset_label.txt``,
``valset/`` + ``valset_label.txt``, every image of ``testset/``); or ``datasets``, a list of
{name, split, images, labels} combining several sources (see :func:`resolve_sources`).

Output (``out_dir``):
  manifest.csv  uid,img_name,split,label,path,cache_file,cache_index,orig_w,orig_h,error,
                phash,dhash,dup_group,face,face_x,face_y,face_w,face_h,dataset,converted
                (label -1 for test; ``path`` is the source file; one row per listed image that
                exists: an image that failed to decode keeps its row, with cache_index -1 and
                the reason in ``error``, so the submission can still give it a row).
                ``phash``/``dhash``: 64-bit perceptual hashes (hex) of the decoded image;
                ``dup_group``: connected component of the near-duplicate graph (-1 for failed
                images; a singleton has its own id), so a split can keep duplicates in one fold;
                ``face``: off / found / largest_of_N / none (no face, kept whole) / skipped, and the
                detector's box (x, y, w, h in original pixels, -1 when none); ``dataset``: the input
                it came from; ``converted``: ``;``-joined conversions applied (exif_rotated, cmyk, ...).
  {split}.npy   uint8 (N, S, S, 3) RGB, one row per manifest row of the split, in manifest order, at
                ``cache_index``; S = cache_size. The row of a failed image stays zero (its
                cache_index is -1), so no row ever moves and no cache is copied to compact it.
                Images are resized to S x S (aspect ratio not kept: faces crops are near square and
                the detectors see the same geometry at train and test time).
The report (``report``) lists every skipped file with its reason code (``kind``) and message, counts
per reason, conversions per kind, files that no label lists, per-dataset counts and the near-duplicate
counts per split pair (``duplicates``); the pairs themselves go to ``cfg.duplicates``
(see :mod:`dfpipe.data.dedup`).

Scale and resume: images are decoded by a process pool in tasks of ``TASK_SIZE``, with a bounded number
of tasks in flight, and their pixels written straight to the cache files with ``os.pwrite`` (no memory
map, whose touched pages would count in RSS). Every ``chunk_size`` images of a split form a chunk whose
manifest rows are committed atomically to ``<out_dir>.work/chunks/``; ``journal.json`` there holds a
fingerprint of the settings and of every input file (path, size, mtime). A killed run, rerun with the
same fingerprint, decodes only the chunks not committed and ends with the same bytes; any other
fingerprint starts afresh. The work dir lives beside ``out_dir`` (dvc deletes declared outs before a
run) and is renamed into place at the end, so the caches are never copied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
import PIL
from tqdm import tqdm

from ..config import ConfigError, PrepareConfig
from ..io import atomic_open, work_dir, write_csv, write_json
from .dedup import DUP_COLUMNS, dedup_report, find_duplicates_arrays, hash_image, to_uint64
from .faces import FaceResult, apply_face_crop, check_face_config
from .images import ImageError, decode, resize_square, scan_folder
from .labels import read_labels, read_names

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["uid", "img_name", "split", "label", "path", "cache_file", "cache_index", "orig_w",
                    "orig_h", "error", "phash", "dhash", "dup_group", "face", "face_x", "face_y", "face_w", "face_h",
                    "dataset", "converted"]
CHUNK_COLUMNS = [*MANIFEST_COLUMNS, "error_kind", "digest"]  # the work files keep what the report needs
WORK_VERSION = 1  # bump when a code change makes old work files wrong
# settings that change what a chunk holds (the others, e.g. dup_max_distance or workers, reuse the work)
WORK_KEYS = ("cache_size", "min_side", "max_pixels", "face_crop", "face_margin", "face_policy", "chunk_size")
TASK_SIZE = 16  # images per worker task: amortises inter-process overhead, bounds memory in flight
REPORT_EXAMPLES = 100  # unlabelled / ignored files named in the report (all are counted)
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Source:
    """One resolved input dataset."""

    name: str
    split: str
    images: Path
    labels: Path | None  # None: every image file of ``images``
    optional: bool = False  # competition layout: a missing val / test set is a warning, not an error


@dataclass(frozen=True, slots=True)
class Item:
    split: str
    img_name: str
    label: int
    path: str
    dataset: str


@dataclass
class Collected:
    items: list[Item] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # listed but missing files
    unlabelled: list[str] = field(default_factory=list)  # image files no label file lists (ignored)
    ignored: list[str] = field(default_factory=list)  # non-image files in an image folder (ignored)
    listed: dict[str, int] = field(default_factory=dict)  # dataset -> images listed


def resolve_sources(cfg: PrepareConfig) -> list[Source]:
    """The datasets to read: ``cfg.datasets`` or, when empty, the competition layout of ``data_root``."""
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_root {root} does not exist (set prepare.data_root in params.yaml)")
    if not cfg.datasets:
        return [Source(cfg.train_dir, "train", root / cfg.train_dir, root / cfg.train_labels),
                Source(cfg.val_dir, "val", root / cfg.val_dir, root / cfg.val_labels, optional=True),
                Source(cfg.test_dir, "test", root / cfg.test_dir, None, optional=True)]
    seen: set[str] = set()
    sources = []
    for i, d in enumerate(cfg.datasets):
        where = f"prepare.datasets[{i}]"
        if not DATASET_NAME.match(d.name) or d.name in seen:
            raise ConfigError(f"{where}.name={d.name!r}: give each dataset a unique name of letters, digits, _ . -")
        if d.split not in SPLITS:
            raise ConfigError(f"{where}.split={d.split!r}: choose one of {list(SPLITS)}")
        if not d.images:
            raise ConfigError(f"{where}.images is empty: give the image folder (relative to data_root)")
        if d.split != "test" and not d.labels:
            raise ConfigError(f"{where}.labels is empty: a {d.split} dataset needs a label CSV img_name,target")
        seen.add(d.name)
        sources.append(Source(d.name, d.split, root / d.images, root / d.labels if d.labels else None))
    return sources


def collect_items(cfg: PrepareConfig) -> Collected:
    """List the images of every dataset, in params order then label-file order; report missing ones.

    When several datasets feed one split, img_name becomes ``<dataset>/<name>`` so it stays unique.
    """
    sources = resolve_sources(cfg)
    per_split = Counter(s.split for s in sources)
    out = Collected()
    for src in sources:
        prefix = f"{src.name}/" if per_split[src.split] > 1 else ""
        _collect_source(src, cfg.limit, prefix, out)
    return out


def _collect_source(src: Source, limit: int, prefix: str, out: Collected) -> None:
    if src.optional and not _present(src):
        return
    table = _listing(src)
    if not src.images.is_dir():
        raise FileNotFoundError(f"{src.images}: image folder of dataset {src.name!r} not found (check the path)")
    on_disk, others = scan_folder(src.images)
    if table is None:  # a folder of test images: every image file, sorted
        table = pd.DataFrame({"img_name": on_disk, "label": -1, "line": 0})
    if limit:
        table = table.head(limit)
    present = set(on_disk)
    n0 = len(out.items)
    for name, label, line in zip(table.img_name, table.label, table.line):
        path = src.images / name
        if name not in present and not path.is_file():
            reason = f"listed in {src.labels}:{line} but the file does not exist (add the file or delete the row)"
            log.warning("%s: %s", path, reason)
            out.skipped.append({"split": src.split, "dataset": src.name, "file": str(path), "kind": "missing_file",
                                "reason": reason})
            continue
        out.items.append(Item(src.split, prefix + name, int(label), str(path), src.name))
    out.listed[src.name] = len(table)
    if not limit:
        listed = set(table.img_name)
        _note_unlisted(src, sorted(present - listed), [n for n in others if n not in listed], out)
    log.info("%s (%s): %d images listed, %d found", src.name, src.split, len(table), len(out.items) - n0)


def _present(src: Source) -> bool:
    """Whether an optional layout set exists; warn when it does not."""
    if src.labels is not None and not src.labels.exists():
        log.warning("%s: no validation labels; the cluster split will make the validation fold", src.labels)
        return False
    if src.labels is None and not src.images.is_dir():
        log.warning("%s: no test folder; the submission will have no rows", src.images)
        return False
    return True


def _listing(src: Source) -> pd.DataFrame | None:
    """(img_name, label, line) rows of the dataset's label file or name list; None: list the folder."""
    if src.labels is None:
        return None
    if src.split == "test":
        return read_names(src.labels).assign(label=-1)
    return read_labels(src.labels)


def _note_unlisted(src: Source, unlisted: list[str], others: list[str], out: Collected) -> None:
    """Warn (once per dataset) about unlisted image files and unlisted non-image files; both are ignored."""
    if unlisted:
        log.warning("%s: %d image files are not listed in %s and are ignored, e.g. %s",
                    src.images, len(unlisted), src.labels, unlisted[0])
        out.unlabelled += [str(src.images / n) for n in unlisted]
    label_file = src.labels.resolve() if src.labels is not None else None
    others = [n for n in others if (src.images / n).resolve() != label_file]
    if others:
        log.warning("%s: %d files without an image extension are ignored, e.g. %s", src.images, len(others), others[0])
        out.ignored += [str(src.images / n) for n in others]


# --------------------------------------------------------------------------- decoding (worker side)
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


# --------------------------------------------------------------------------- work dir (resume)
def fingerprint(cfg: PrepareConfig, items: Iterable[Item]) -> str:
    """Hash of the settings that shape the work and of every input file's path, size and mtime."""
    h = hashlib.sha256()
    settings = {k: getattr(cfg, k) for k in WORK_KEYS}
    h.update(json.dumps({"v": WORK_VERSION, "pil": PIL.__version__, "cv2": cv2.__version__, **settings},
                        sort_keys=True).encode())
    for it in items:
        try:
            st = os.stat(it.path)
            stat = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stat = "gone"
        h.update(f"{it.split}\0{it.img_name}\0{it.label}\0{it.path}\0{it.dataset}\0{stat}\n".encode())
    return h.hexdigest()


class Work:
    """The work dir: ``journal.json``, ``cache/{split}.npy`` (full size, filled in place), and one
    ``chunks/{split}-{k:06d}.csv`` per committed chunk. ``cache/`` becomes ``out_dir`` at the end."""

    def __init__(self, path: Path, journal: dict) -> None:
        self.path, self.journal = path, journal
        self.cache = path / "cache"
        self.size = int(journal["cache_size"])
        self.row_bytes = self.size * self.size * 3
        self._fds: dict[str, int] = {}
        self._offsets: dict[str, int] = {}

    @classmethod
    def open(cls, path: Path, journal: dict) -> Work:
        """Reuse ``path`` if it holds work of exactly this journal; else start it afresh."""
        work = cls(path, journal)
        if path.exists() and not work._reusable():
            log.info("%s: work of other inputs or settings (or incomplete); starting afresh", path)
            shutil.rmtree(path)
        if not path.exists():
            (path / "chunks").mkdir(parents=True)
            work.cache.mkdir()
            for split, n in journal["n_items"].items():
                _create_npy(work.cache / f"{split}.npy", (n, work.size, work.size, 3))
            write_json(path / "journal.json", journal)  # last: the journal vouches for the caches
        for split in journal["n_items"]:
            npy = work.cache / f"{split}.npy"
            work._offsets[split] = _npy_offset(npy)
            work._fds[split] = os.open(npy, os.O_WRONLY)
        return work

    def _reusable(self) -> bool:
        try:
            if json.loads((self.path / "journal.json").read_text()) != self.journal:
                return False
            for split, n in self.journal["n_items"].items():
                npy = self.cache / f"{split}.npy"
                if npy.stat().st_size != _npy_offset(npy) + n * self.row_bytes:
                    return False
        except (OSError, ValueError):
            return False
        return True

    def chunk_file(self, split: str, k: int) -> Path:
        return self.path / "chunks" / f"{split}-{k:06d}.csv"

    def write_rows(self, split: str, start: int, block: np.ndarray) -> None:
        """Write cache rows ``start ...`` (page cache: survives a killed process)."""
        data = memoryview(np.ascontiguousarray(block)).cast("B")
        pos = self._offsets[split] + start * self.row_bytes
        while len(data):
            n = os.pwrite(self._fds[split], data, pos)
            data, pos = data[n:], pos + n

    def commit(self, split: str, k: int, rows: list[dict]) -> None:
        """A finished chunk: its manifest rows, written atomically (its pixels are already in the cache)."""
        write_csv(self.chunk_file(split, k), pd.DataFrame(rows, columns=CHUNK_COLUMNS))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _create_npy(path: Path, shape: tuple[int, ...]) -> None:
    """An all-zero uint8 .npy of ``shape`` (sparse on disk until written; nothing mapped in memory)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.truncate(fh.tell() + int(np.prod(shape)))


def _npy_offset(path: Path) -> int:
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        return fh.tell()


# --------------------------------------------------------------------------- the stage
def prepare(cfg: PrepareConfig) -> dict:
    """Run stage 1 and return the report dict (also written to ``cfg.report``)."""
    check_face_config(cfg.face_crop, cfg.face_margin, cfg.face_policy)
    if not 0 <= cfg.dup_max_distance <= 64:
        raise ValueError(f"prepare.dup_max_distance={cfg.dup_max_distance}: must be in [0, 64]")
    if cfg.chunk_size < 1 or cfg.cache_size < 1 or cfg.workers < 0:
        raise ValueError(f"prepare: chunk_size ({cfg.chunk_size}) and cache_size ({cfg.cache_size}) must be >= 1, "
                         f"workers ({cfg.workers}) >= 0")
    col = collect_items(cfg)
    sizes = {s: sum(1 for it in col.items if it.split == s) for s in SPLITS}
    journal = {"version": WORK_VERSION, "fingerprint": fingerprint(cfg, col.items), "n_items": sizes,
               "cache_size": cfg.cache_size, "chunk_size": cfg.chunk_size}
    work = Work.open(work_dir(cfg.out_dir), journal)
    try:
        _decode_all(cfg, col.items, work)
    finally:
        work.close()
    return _publish(cfg, col, work)


def _chunks(items: list[Item], chunk_size: int) -> Iterator[tuple[str, int, list[Item]]]:
    """(split, chunk number, items) in manifest order: split order, then item order."""
    for split in SPLITS:
        sub = [it for it in items if it.split == split]
        for k, start in enumerate(range(0, len(sub), chunk_size)):
            yield split, k, sub[start:start + chunk_size]


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


# --------------------------------------------------------------------------- outputs
class Tally:
    """Counts and hash arrays gathered from the committed chunks (O(N) small numbers, no rows)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {k: Counter() for k in ("images", "fake", "labels", "converted", "faces",
                                                                  "ds_ok", "ds_failed")}
        self.failed: list[dict] = []
        self.n_rows = self.n_converted = 0
        self.hashed: list[np.ndarray] = []  # manifest row numbers of hashed images, per chunk
        self.uids: list[np.ndarray] = []
        self.splits: list[np.ndarray] = []
        self.ph: list[np.ndarray] = []
        self.dh: list[np.ndarray] = []
        self.digest: list[np.ndarray] = []

    def add(self, df: pd.DataFrame) -> None:
        ok = (df.cache_index != "-1").to_numpy()
        c = self.counts
        c["images"].update(df.split[ok])
        c["fake"].update(df.split[ok & (df.label == "1").to_numpy()])
        c["labels"].update(df.label[ok & (df.split != "test").to_numpy()])
        c["ds_ok"].update(df.dataset[ok])
        c["ds_failed"].update(df.dataset[~ok])
        conv = df.converted[df.converted != ""]
        self.n_converted += len(conv)
        c["converted"].update(k for notes in conv for k in notes.split(";"))
        c["faces"].update(df.face[df.face != ""].str.replace(r"_of_\d+$", "_of_n", regex=True))
        for r in df[~ok].itertuples():
            self.failed.append({"split": r.split, "dataset": r.dataset, "file": r.path, "kind": r.error_kind,
                                "reason": r.error})
        h = (df.phash != "").to_numpy()
        self.hashed.append(np.flatnonzero(h) + self.n_rows)
        self.uids.append(df.uid[h].to_numpy())
        self.splits.append(df.split[h].to_numpy())
        self.ph.append(to_uint64(df.phash[h]))
        self.dh.append(to_uint64(df.dhash[h]))
        self.digest.append(df.digest[h].to_numpy(dtype="S32"))
        self.n_rows += len(df)

    def duplicates(self, max_distance: int) -> tuple[pd.DataFrame, np.ndarray, dict]:
        """(pairs, dup_group per manifest row, summary)."""
        cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))  # noqa: E731
        pairs, gid = find_duplicates_arrays(cat(self.uids, object), cat(self.splits, object),
                                            cat(self.ph, np.uint64), cat(self.dh, np.uint64),
                                            cat(self.digest, "S32"), max_distance)
        dup = np.full(self.n_rows, -1, np.int64)
        dup[cat(self.hashed, np.int64)] = gid
        return pairs, dup, dedup_report(pairs, gid, max_distance)


def _committed(work: Work, items: list[Item], chunk_size: int) -> Iterator[pd.DataFrame]:
    for split, k, _ in _chunks(items, chunk_size):
        yield pd.read_csv(work.chunk_file(split, k), dtype=str, keep_default_na=False)


def _publish(cfg: PrepareConfig, col: Collected, work: Work) -> dict:
    """Manifest, dedup, report: then rename the cache dir onto ``out_dir`` and drop the work dir."""
    tally = Tally()
    for df in _committed(work, col.items, cfg.chunk_size):
        tally.add(df)
    _check_usable(tally.counts["labels"])
    pairs, dup, dup_summary = tally.duplicates(cfg.dup_max_distance)
    _log_duplicates(dup_summary)
    _write_manifest(work.cache / "manifest.csv", _committed(work, col.items, cfg.chunk_size), dup)
    out = Path(cfg.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work.cache, out)  # a rename: the caches are never copied
    write_csv(cfg.duplicates, pairs[DUP_COLUMNS])
    report = _report(cfg, col, tally)
    report["duplicates"] = dup_summary
    write_json(cfg.report, report)
    shutil.rmtree(work.path)
    log.info("prepared %d images (%s), skipped %d", sum(tally.counts["images"].values()),
             dict(tally.counts["images"]), report["n_skipped"])
    return report


def _write_manifest(path: Path, chunks: Iterable[pd.DataFrame], dup: np.ndarray) -> None:
    """Stream the committed chunks into one CSV (values are written back as read: same bytes)."""
    pos = 0
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        pd.DataFrame(columns=MANIFEST_COLUMNS).to_csv(fh, index=False)
        for df in chunks:
            df["dup_group"] = dup[pos:pos + len(df)].astype(str)
            pos += len(df)
            df[MANIFEST_COLUMNS].to_csv(fh, index=False, header=False)


def _log_duplicates(summary: dict) -> None:
    log.info("duplicates (pHash distance <= %d): %d pairs %s", summary["max_distance"], summary["n_pairs"],
             summary["pairs"])
    cross = sum(v for k, v in summary["pairs"].items() if not k.startswith("within_"))
    if cross:
        log.warning("%d near-duplicate pairs across train/val/test: possible leakage (see the duplicates csv)", cross)


def _check_usable(labels: Counter) -> None:
    """``labels``: decodable labelled images per label ("0"/"1")."""
    if not labels:
        raise ValueError("no usable labelled image: check data_root and the label files")
    if len(labels) < 2:
        raise ValueError(f"labelled images hold one class only (label {next(iter(labels))}): need real and fake")


def _report(cfg: PrepareConfig, col: Collected, tally: Tally) -> dict:
    skipped = col.skipped + tally.failed
    c = tally.counts
    datasets = {name: {"n_listed": n, "n_images": c["ds_ok"][name], "n_failed": c["ds_failed"][name],
                       "n_missing": sum(1 for s in col.skipped if s["dataset"] == name)}
                for name, n in col.listed.items()}
    return {
        "cache_size": cfg.cache_size,
        "n_images": {s: c["images"][s] for s in SPLITS},
        "n_fake": {s: c["fake"][s] for s in ("train", "val")},
        "n_skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["kind"] for s in skipped).items())),
        "skipped": skipped,
        "n_converted": tally.n_converted,
        "converted_by_kind": dict(sorted(c["converted"].items())),
        "n_unlabelled": len(col.unlabelled),
        "unlabelled": col.unlabelled[:REPORT_EXAMPLES],
        "n_ignored_files": len(col.ignored),
        "ignored_files": col.ignored[:REPORT_EXAMPLES],
        "datasets": datasets,
        "faces": {"detector": cfg.face_crop, **dict(sorted(c["faces"].items()))},
    }
