"""k-means engines for stage 3: scikit-learn on CPU (in memory, or chunked over a features file) and
torch_kmeans on a torch device (the GPU when there is one).

Features may be an in-memory array or stage 3's features file (:class:`dfpipe.cluster_split.features.FeatureFile`,
or a ``np.load(..., mmap_mode="r")`` memmap) of float16 rows; ``rows`` selects a subset (e.g. one class)
without copying the rest. Which sklearn path runs:

* n <= ``minibatch_above`` (default 100 000): ``KMeans(n_init=4)`` on the rows as float32 in memory
  (100k x 1280 float32 = 490 MB);
* above: ``MiniBatchKMeans.partial_fit`` over ``MINIBATCH_BATCH``-row batches read from the file, for
  ``PARTIAL_FIT_PASSES`` passes, started from k-means++ ``KMeans`` centres of a ``INIT_SAMPLE``-row sample:
  memory stays at the sample plus one batch, whatever n is.

All paths are deterministic for a seed (the torch one on CPU; on CUDA up to float summation order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import get_args

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from ..config import KMeansBackend
from ..errors import ConfigError
from .features import iter_chunks, n_rows, take  # noqa: F401  (take: re-exported)

log = logging.getLogger(__name__)

BACKENDS = get_args(KMeansBackend)  # ("auto", "sklearn", "torch")
MINIBATCH_ABOVE = 100_000  # more rows: chunked MiniBatchKMeans (bench: KMeans on 20k x 1280, 6-70 s on 2 cores)
MINIBATCH_BATCH = 2048  # rows per partial_fit step
INIT_SAMPLE = 20_000  # rows whose KMeans centres start the chunked path
PARTIAL_FIT_PASSES = 3  # passes over all rows, batch order reshuffled each pass
N_INIT = 4  # k-means restarts (best inertia wins), every backend


@dataclass(frozen=True)
class KMeansEngine:
    """Where and how k-means runs. ``backend`` is resolved: ``sklearn`` or ``torch``, never ``auto``."""

    backend: str = "sklearn"
    device: str = "cpu"  # torch backend only
    minibatch_above: int = MINIBATCH_ABOVE  # sklearn backend only

    def describe(self, n: int) -> dict:
        if self.backend == "torch":
            path = f"torch_kmeans Lloyd, k-means++, n_init {N_INIT} on {self.device}"
        elif n > self.minibatch_above:
            path = (f"MiniBatchKMeans.partial_fit (batch {MINIBATCH_BATCH}, {PARTIAL_FIT_PASSES} passes, "
                    f"init from KMeans on {INIT_SAMPLE} rows)")
        else:
            path = f"KMeans (n_init {N_INIT}, in memory)"
        return {"backend": self.backend, "device": self.device, "minibatch_above": self.minibatch_above,
                "path": path}


def make_engine(backend: str = "auto", minibatch_above: int = MINIBATCH_ABOVE) -> KMeansEngine:
    """``auto``: torch on CUDA when a GPU is visible, else sklearn. ``torch`` without a GPU runs on CPU."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown k-means backend {backend!r}; choose one of {BACKENDS}")
    import torch

    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "torch" if cuda else "sklearn"
    device = "cuda" if backend == "torch" and cuda else "cpu"
    return KMeansEngine(backend=backend, device=device, minibatch_above=int(minibatch_above))


def kmeans_labels(feats: np.ndarray, k: int, seed: int, rows: np.ndarray | None = None,
                  engine: KMeansEngine | None = None) -> np.ndarray:
    """Cluster ids (n,) of the selected rows; k is clamped to the number of rows. See the module doc."""
    engine = engine or KMeansEngine()
    n = n_rows(feats, rows)
    k = max(1, min(int(k), n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if engine.backend == "torch" and k < n:  # torch_kmeans needs k < n; k == n is sklearn's trivial case
        from .kmeans_torch import torch_kmeans_labels

        return torch_kmeans_labels(feats, k, seed, rows=rows, device=engine.device, n_init=N_INIT)
    if n > engine.minibatch_above:
        return minibatch_labels(feats, k, seed, rows)
    km = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed)
    return km.fit_predict(take(feats, rows)).astype(np.int64)


def minibatch_labels(feats: np.ndarray, k: int, seed: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Chunked MiniBatchKMeans: never holds more than ``INIT_SAMPLE`` + one batch of rows in memory."""
    n = n_rows(feats, rows)
    rng = np.random.default_rng(seed)
    init_idx = np.sort(rng.choice(n, size=min(n, INIT_SAMPLE), replace=False))
    sample = take(feats, init_idx if rows is None else rows[init_idx])
    # a good start matters more than many steps: KMeans++ centres of a sample, then minibatch refinement
    centres = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(sample).cluster_centers_
    km = MiniBatchKMeans(n_clusters=k, init=centres, n_init=1, batch_size=MINIBATCH_BATCH, random_state=seed,
                         compute_labels=False)
    starts = np.arange(0, n, MINIBATCH_BATCH)
    for _ in range(PARTIAL_FIT_PASSES):
        for s in rng.permutation(starts):  # file order is often sorted by source: shuffle the batches
            km.partial_fit(take(feats, rows, s, min(s + MINIBATCH_BATCH, n)))
    labels = np.empty(n, dtype=np.int64)
    for s, chunk in iter_chunks(feats, rows):
        labels[s:s + len(chunk)] = km.predict(chunk)
    log.info("chunked MiniBatchKMeans: %d rows, k %d, %d steps", n, k, km.n_steps_)
    return labels
