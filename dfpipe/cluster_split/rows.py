"""Rows of a (possibly memory-mapped) feature matrix, read in float32 chunks: what the k-means engines share."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

READ_ROWS = 32_768  # rows per read when predicting or copying to a device: I/O only, results do not depend on it


def n_rows(feats: np.ndarray, rows: np.ndarray | None) -> int:
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
