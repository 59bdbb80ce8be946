"""Stage 3's features file: a plain 2-D ``.npy`` (N, D) float16, written and read with file I/O, not a memmap.

Pages of a memmap count toward the process's RSS once touched and stay there until it is closed: writing
(N, D) rows through ``open_memmap`` or reading all of them through ``np.load(mmap_mode="r")`` (k-means passes
over every row) would hold the whole file resident, 500k x 1280 float16 = 1.2 GB. :class:`FeatureWriter`
appends rows with ``write``; :class:`FeatureFile` reads the rows asked for with ``readinto``, so memory holds
only what a caller keeps. The file is the same ``.npy`` ``np.save`` writes: ``np.load`` reads it.

:func:`n_rows`, :func:`take` and :func:`iter_chunks` read the rows of a feature matrix (this file, an array or a
memmap), or of a selection of them, as float32 chunks: how k-means, the silhouette and the torch engine read it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import DataError

BLOCK_BYTES = 8 * 2**20  # one read of an index selection spans at most this many bytes of rows
READ_ROWS = 32_768  # rows per read when predicting or copying to a device: I/O only, results do not depend on it


class FeatureWriter:
    """Append (B, D) row blocks to the open binary file ``fh``; the ``.npy`` header of (``n``, D) goes first.

    D and the dtype come from the first block. :meth:`close` checks that ``n`` rows were written.
    """

    def __init__(self, fh: IO[bytes], n: int, dtype: np.dtype | type = np.float16):
        self.fh, self.n, self.dtype = fh, int(n), np.dtype(dtype)
        self.rows, self.dim = 0, None

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.ndim != 2:
            raise ValueError(f"feature blocks are (B, D), got shape {block.shape}")
        if self.dim is None:  # D is known once the first block exists
            self.dim = block.shape[1]
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (self.n, self.dim)}
            np.lib.format.write_array_header_1_0(self.fh, header)
        elif block.shape[1] != self.dim:
            raise ValueError(f"feature block of width {block.shape[1]}, the file's rows are {self.dim} wide")
        if self.rows + len(block) > self.n:
            raise ValueError(f"more than the {self.n} rows announced")
        self.fh.write(block.data)
        self.rows += len(block)

    def close(self) -> tuple[int, int]:
        """(N, D) once all ``n`` rows are written."""
        if self.rows != self.n or self.dim is None:
            raise RuntimeError(f"wrote {self.rows} of {self.n} feature rows")
        return self.rows, self.dim


class FeatureFile:
    """Read-only (N, D) rows of a 2-D ``.npy`` file, read on demand with plain file reads (no memmap).

    Indexes like an array for what stage 3 needs: ``f[i]``, ``f[a:b:s]``, ``f[idx]`` (integer or
    boolean array, any order), ``len(f)``, ``f.shape``, ``f.dtype``, ``np.asarray(f)`` (all rows). Each
    returns a new in-memory array; nothing stays mapped.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            with open(self.path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(fh)
                self.offset = fh.tell()
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.path}: not a readable .npy features file ({exc}); rerun stage 3") from None
        if len(shape) != 2 or fortran or dtype.hasobject:
            raise DataError(f"{self.path}: expected a C-order 2-D numeric array, got shape {shape} {dtype}")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        size = os.path.getsize(self.path)
        if size < self.offset + self.shape[0] * self.row_bytes:
            raise DataError(f"{self.path}: cut short ({size} bytes for {self.shape} {self.dtype}); rerun stage 3")

    ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"FeatureFile({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (0 <= start <= stop <= N) as a new array, read straight into it."""
        out = np.empty((stop - start, self.shape[1]), self.dtype)
        if not out.size:
            return out
        buf, done = memoryview(out).cast("B"), 0
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.offset + start * self.row_bytes)
            while done < len(buf):
                got = fh.readinto(buf[done:])
                if not got:
                    raise DataError(f"{self.path}: cut short at row {start + done // self.row_bytes}; rerun stage 3")
                done += got
        return out

    def __getitem__(self, key) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return self._read(i, i + 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._read(start, max(start, stop))
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {n} rows")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"FeatureFile takes an int, a slice or a 1-D integer/boolean array, got {key!r}")
        idx = np.where(idx < 0, idx + n, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        return self._take(idx)

    def _take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` in that order: sorted, then read in spans of at most ``BLOCK_BYTES``."""
        out = np.empty((len(idx), self.shape[1]), self.dtype)
        order = np.argsort(idx, kind="stable")
        s = idx[order]
        span = max(1, BLOCK_BYTES // max(1, self.row_bytes))
        i = 0
        while i < len(s):
            lo = int(s[i])
            j = int(np.searchsorted(s, lo + span, side="left"))  # rows lo .. lo + span - 1
            block = self._read(lo, int(s[j - 1]) + 1)
            out[order[i:j]] = block[s[i:j] - lo]
            i = j
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._read(0, self.shape[0])
        return out if dtype is None else out.astype(dtype, copy=False)


def n_rows(feats: np.ndarray, rows: np.ndarray | None) -> int:
    """How many rows are selected: ``rows``' count when given, else all of ``feats``."""
    return len(feats) if rows is None else len(rows)


def take(feats: np.ndarray, rows: np.ndarray | None, start: int = 0, stop: int | None = None) -> np.ndarray:
    """float32 copy of rows ``start:stop`` (of ``rows`` when given, else of ``feats``)."""
    sel = slice(start, stop) if rows is None else rows[start:stop]
    return np.asarray(feats[sel], dtype=np.float32)


def iter_chunks(feats: np.ndarray, rows: np.ndarray | None, size: int | None = None
                ) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 chunk) over all selected rows, in order; ``size`` rows each (default :data:`READ_ROWS`, read
    at call time so a test can shrink it)."""
    size = READ_ROWS if size is None else size
    n = n_rows(feats, rows)
    for s in range(0, n, size):
        yield s, take(feats, rows, s, min(s + size, n))
