"""The image store: every usable image at its native resolution, encoded, in sharded blobs with an index.

Generators leave their traces in the finest pixels (up-sampling grids, colour correlations, JPEG
history), so stage 1 keeps every pixel of each image rather than a resized raw-pixel cache. An image
is stored as:

* its **original bytes** when the file is a clean JPEG, PNG or WebP that stage 1 did not change (no
  conversion noted by :func:`dfpipe.data.images.decode`, no ``max_side`` downscale, no face crop):
  the common case, so the store is about the size of the input files;
* otherwise a **lossless PNG** of the RGB image stage 1 made (EXIF rotation applied, CMYK, 16-bit,
  palette, alpha flattened, first GIF frame, downscaled, face-cropped...).

Either way, decoding the stored bytes with :func:`dfpipe.data.images.decode_image` gives exactly the
image stage 1 made: the "stage-1 image" of :mod:`dfpipe.data.preprocess`.

Layout: a shard is ``<name>.bin`` (the encoded images back to back) plus ``<name>.idx.npy``, an int64
(n, 3) array of (offset, length, crc32 of the bytes) per image (length 0 = no image at that position: a file
that failed). Every read checks the crc32 (zlib's, a few GB/s: see ``reports/bench/bench_prepare.json``), so
bytes overwritten inside a shard are a one-line error naming the shard and the image, never other pixels; an
(n, 2) index of a store from before the checksums is read unchecked.
A manifest row points at an image with ``cache_file`` (the shard's file name, relative to the store
folder) and ``cache_index`` (its position in the shard). A shard is written to a temporary name and
renamed into place (:meth:`ShardWriter.commit`), so a killed writer never leaves half a shard under the
real name. Reading is one ``pread`` per image: shards are never loaded whole, so memory stays flat at
any store size, and DataLoader workers can share a reader (it reopens its files after a fork or pickle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from ..errors import DataError, InputError
from ..io import write_json
from .images import decode_image
from .preprocess import Stage1

SHARD_SUFFIX = ".bin"
INDEX_SUFFIX = ".idx.npy"
KEEP_FORMATS = ("JPEG", "PNG", "WEBP")  # stored as they came when nothing changed
PNG_LEVEL = 1  # zlib level of re-encoded images: level 1 is ~3x faster to write than 6 and ~10% larger
MAX_OPEN = 64  # shard files a reader keeps open


def encode_png(img: np.ndarray) -> bytes:
    """Lossless PNG bytes of an (H, W, 3) uint8 RGB image."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
    if not ok:
        raise DataError(f"cannot PNG-encode an image of shape {img.shape}")
    return buf.tobytes()


def stored_bytes(raw: bytes, fmt: str, notes: tuple[str, ...], img: np.ndarray, changed: bool) -> tuple[bytes, str]:
    """(bytes to store, "original" or "png") for one image.

    ``raw``/``fmt``/``notes``: the input file's bytes, format and decode notes; ``img``: the stage-1
    image; ``changed``: stage 1 changed the decoded pixels (downscale, face crop). Original bytes are
    kept only when they decode to ``img`` by themselves; ``extension_mismatch`` is about the file name,
    not the pixels.
    """
    if not changed and fmt in KEEP_FORMATS and set(notes) <= {"extension_mismatch"}:
        return raw, "original"
    return encode_png(img), "png"


def shard_name(prefix: str, k: int) -> str:
    return f"{prefix}-{k:06d}{SHARD_SUFFIX}"


def index_path(shard: str | Path) -> Path:
    shard = Path(shard)
    return shard.with_name(shard.name[: -len(SHARD_SUFFIX)] + INDEX_SUFFIX)


class ShardWriter:
    """Append encoded images to one shard; :meth:`commit` puts the shard and its index in place."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self.entries: list[tuple[int, int, int]] = []
        self.pos = 0

    def add(self, data: bytes | None) -> int:
        """Append one image (None: a position with no image). Returns its index in the shard."""
        n = len(data) if data else 0
        if n:
            self.fh.write(data)
        self.entries.append((self.pos, n, zlib.crc32(data) if n else 0))
        self.pos += n
        return len(self.entries) - 1

    def commit(self) -> Path:
        """Flush, write the index, rename both into place. Returns the shard path."""
        self.fh.close()
        idx = index_path(self.path)
        idx_tmp = idx.with_name(idx.name + ".tmp")
        with open(idx_tmp, "wb") as fh:
            np.save(fh, np.asarray(self.entries, dtype=np.int64).reshape(-1, 3))
        os.replace(idx_tmp, idx)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


class StoreReader:
    """Read images of the store by (shard path, index): one ``pread`` each, no shard loaded whole.

    Picklable (DataLoader workers, process pools): open files are not carried over, each process
    reopens its own.
    """

    def __init__(self) -> None:
        self._index: dict[str, np.ndarray] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()

    def _entries(self, shard: str) -> np.ndarray:
        idx = self._index.get(shard)
        if idx is None:
            path = index_path(shard)
            try:
                idx = np.load(path)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot read the shard index ({exc}); rerun the stage that wrote it") from None
            if idx.ndim != 2 or idx.shape[1] not in (2, 3):  # (offset, length[, crc32]) rows
                raise DataError(f"{path}: a shard index of shape {idx.shape}, not (n, 3); rerun the stage that wrote it")
            self._index[shard] = idx
        return idx

    def _fd(self, shard: str) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors share file offsets; pread doesn't care,
            self._fds.clear()         # but keep each process's set of its own
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
            try:
                fd = self._fds[shard] = os.open(shard, os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"{shard}: cannot open the shard ({exc.strerror}); rerun the stage that wrote it") from None
        else:
            self._fds.move_to_end(shard)
        return fd

    def read(self, shard: str | Path, index: int) -> bytes:
        """The stored bytes of image ``index`` of ``shard``."""
        shard = str(shard)
        entries = self._entries(shard)
        if not 0 <= index < len(entries):
            raise DataError(f"{shard}: no image {index} (the shard holds {len(entries)})")
        offset, n = int(entries[index, 0]), int(entries[index, 1])
        if n == 0:
            raise DataError(f"{shard}: position {index} holds no image (it failed in the stage that wrote it)")
        data = os.pread(self._fd(shard), n, offset)
        if len(data) != n:
            raise DataError(f"{shard}: image {index} is cut short ({len(data)} of {n} bytes); rerun its stage")
        if entries.shape[1] > 2 and zlib.crc32(data) != int(entries[index, 2]):
            raise DataError(f"{shard}: image {index} does not match its crc32 in {index_path(shard).name} (the shard "
                            "is damaged); rerun the stage that wrote it")
        return data

    def image(self, shard: str | Path, index: int) -> np.ndarray:
        """The stage-1 image (H, W, 3) uint8 RGB of ``index`` in ``shard``."""
        return decode_image(self.read(shard, index))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self) -> dict:
        return {"_index": self._index, "_fds": OrderedDict(), "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_pid", -1) == os.getpid():
            try:
                self.close()
            except OSError:
                pass


def store_bytes_on_disk(folder: str | Path) -> int:
    """Bytes of every shard and index under ``folder`` (the store's size)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.glob(f"*{SHARD_SUFFIX}")) + \
        sum(p.stat().st_size for p in folder.glob(f"*{INDEX_SUFFIX}"))


STORE_RECORD = "store.json"
STORE_FORMAT = 1
MANIFEST = "manifest.csv"


def write_store_record(folder: Path, s1: Stage1, manifest_rows: int | None = None) -> None:
    """``store.json``: the store's format and how its images were made (read by training, which writes it
    into every checkpoint: see :mod:`dfpipe.data.preprocess`); with ``manifest_rows``, also the row count and
    sha256 of the folder's (already written) ``manifest.csv``, which readers verify (:func:`check_manifest`)."""
    rec: dict = {"format": STORE_FORMAT, "stage1": dataclasses.asdict(s1)}
    if manifest_rows is not None:
        rec["manifest"] = {"rows": int(manifest_rows), "sha256": _sha256(Path(folder) / MANIFEST)}
    write_json(Path(folder) / STORE_RECORD, rec)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def check_manifest(folder: str | Path, stage: str) -> int | None:
    """Verify ``<folder>/manifest.csv`` against the row count and sha256 its ``store.json`` records, before
    it is parsed; returns the recorded row count (None: a store from before the record, not checked).
    A cut or edited manifest is one line naming the file; ``stage`` says which stage to rerun."""
    folder = Path(folder)
    try:
        rec = json.loads((folder / STORE_RECORD).read_text()).get("manifest")
    except (OSError, ValueError, AttributeError):
        return None  # no readable record: read_store_record reports it where the record is needed
    if not isinstance(rec, dict):
        return None
    path = folder / MANIFEST
    if _sha256(path) != rec.get("sha256"):
        data, n = path.read_bytes(), rec.get("rows")
        rows = max(data.count(b"\n") - 1, 0)  # whole data rows after the header (a hint for the message)
        if not data.endswith(b"\n"):
            what = f"cut mid-row after {rows} of {n} rows"
        elif rows < n:
            what = f"cut short: {rows} of {n} rows"
        else:
            what = "edited"
        raise DataError(f"{path}: {what} (it does not match the sha256 in {folder / STORE_RECORD}); rerun {stage}")
    return int(rec["rows"])


def read_store_record(folder: str | Path) -> Stage1:
    """The :class:`Stage1` record of a prepared folder (clear error when missing or from an older stage 1)."""
    path = Path(folder) / STORE_RECORD
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} not found: {folder} is not a stage-1 image store (rerun stage 1: "
                         "python 01_prepare_data.py)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); rerun stage 1") from None
    if rec.get("format") != STORE_FORMAT:
        raise DataError(f"{path}: store format {rec.get('format')!r}, this code reads {STORE_FORMAT}; rerun stage 1")
    return Stage1(**rec["stage1"])


def write_png_shard(path: str | Path, images) -> list[int]:
    """Write ``images`` (iterable of (H, W, 3) uint8 RGB, None = a gap) as one PNG shard; their indices."""
    writer = ShardWriter(path)
    try:
        idx = [writer.add(None if im is None else encode_png(im)) for im in images]
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    return idx
