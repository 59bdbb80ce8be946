"""Stage 1's work dir: the journal that decides what a rerun may reuse, the store's shards, the committed
chunks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import pandas as pd
import PIL

from ..config import PrepareConfig
from ..io import write_csv, write_json
from ..data.store import ShardWriter, shard_name
from .sources import SPLITS, Item

log = logging.getLogger(__name__)
MANIFEST_COLUMNS = ["uid", "img_name", "split", "label", "path", "cache_file", "cache_index", "orig_w",
                    "orig_h", "width", "height", "error", "phash", "dhash", "dup_group", "face", "face_x", "face_y", "face_w", "face_h",
                    "dataset", "converted"]
# the work files keep what the report needs: file / stored bytes, how it was stored (original / png)
CHUNK_COLUMNS = [*MANIFEST_COLUMNS, "error_kind", "digest", "file_bytes", "stored_bytes", "stored"]
WORK_VERSION = 2  # bump when a code change makes old work files wrong
# settings that change what a chunk holds (the others, e.g. dup_max_distance or workers, reuse the work)
WORK_KEYS = ("max_side", "min_side", "max_pixels", "face_crop", "face_margin", "face_policy", "chunk_size")


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
    """The work dir: ``journal.json``, ``cache/<split>-<k>.bin`` (+ ``.idx.npy``) shards, one per committed
    chunk, and one ``chunks/{split}-{k:06d}.csv`` per committed chunk. ``cache/`` becomes ``out_dir``.

    The journal's ``chunk_size`` fixes how the items fall into chunks (:meth:`chunks`): decoding and publishing
    both take the chunks from here, so they cannot cut them differently from the work the journal vouches for."""

    def __init__(self, path: Path, journal: dict) -> None:
        self.path, self.journal = path, journal
        self.cache = path / "cache"

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
            write_json(path / "journal.json", journal)  # last: the journal vouches for the folder
        return work

    def _reusable(self) -> bool:
        try:
            return json.loads((self.path / "journal.json").read_text()) == self.journal and self.cache.is_dir()
        except (OSError, ValueError):
            return False

    def chunks(self, items: list[Item]) -> Iterator[tuple[str, int, list[Item]]]:
        """(split, chunk number, items) in manifest order: split order, then item order."""
        size = self.journal["chunk_size"]
        for split in SPLITS:
            sub = [it for it in items if it.split == split]
            for k, start in enumerate(range(0, len(sub), size)):
                yield split, k, sub[start:start + size]

    def chunk_file(self, split: str, k: int) -> Path:
        return self.path / "chunks" / f"{split}-{k:06d}.csv"

    def shard(self, split: str, k: int) -> ShardWriter:
        """A writer for chunk ``k`` of ``split``'s shard (a killed run's half-written one is overwritten)."""
        return ShardWriter(self.cache / shard_name(split, k))

    def done(self, split: str, k: int) -> bool:
        """Chunk committed: its rows (written last) and its shard are both there."""
        return self.chunk_file(split, k).is_file() and (self.cache / shard_name(split, k)).is_file()

    def commit(self, split: str, k: int, shard: ShardWriter, rows: list[dict]) -> None:
        """A finished chunk: its shard renamed into place, then its manifest rows written atomically."""
        shard.commit()
        write_csv(self.chunk_file(split, k), pd.DataFrame(rows, columns=CHUNK_COLUMNS))
