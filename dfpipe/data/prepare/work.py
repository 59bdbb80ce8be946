"""Stage 1's work dir: the journal that decides what a rerun may reuse, the caches filled in place, the
committed chunks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import PIL

from ...config import PrepareConfig
from ...io import write_csv, write_json
from .sources import SPLITS, Item

log = logging.getLogger(__name__)
MANIFEST_COLUMNS = ["uid", "img_name", "split", "label", "path", "cache_file", "cache_index", "orig_w",
                    "orig_h", "error", "phash", "dhash", "dup_group", "face", "face_x", "face_y", "face_w", "face_h",
                    "dataset", "converted"]
CHUNK_COLUMNS = [*MANIFEST_COLUMNS, "error_kind", "digest"]  # the work files keep what the report needs
WORK_VERSION = 1  # bump when a code change makes old work files wrong
# settings that change what a chunk holds (the others, e.g. dup_max_distance or workers, reuse the work)
WORK_KEYS = ("cache_size", "min_side", "max_pixels", "face_crop", "face_margin", "face_policy", "chunk_size")


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


def _chunks(items: list[Item], chunk_size: int) -> Iterator[tuple[str, int, list[Item]]]:
    """(split, chunk number, items) in manifest order: split order, then item order."""
    for split in SPLITS:
        sub = [it for it in items if it.split == split]
        for k, start in enumerate(range(0, len(sub), chunk_size)):
            yield split, k, sub[start:start + chunk_size]
