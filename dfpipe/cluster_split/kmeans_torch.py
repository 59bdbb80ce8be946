"""k-means on a torch device with ``torch_kmeans`` (Lloyd iterations, k-means++ init).

``torch_kmeans.KMeans`` computes distances by expanding every (point, centre) pair to a D-vector
(500k x 12 x 1280 float32 = 30 GB) and copies the points once per restart. Here its distance is
replaced by ``|x|^2 - 2 x.c + |c|^2`` (one matmul, O(N*K) memory) and restarts run one at a time, so a
GPU holds the N x D points plus a few N x K tensors.
"""

from __future__ import annotations

import logging

import warnings

import numpy as np
import torch

with warnings.catch_warnings():  # torch_kmeans 0.2 decorates helpers with torch.jit.script, deprecated in torch 2.x
    warnings.simplefilter("ignore", FutureWarning)
    from torch_kmeans import KMeans as _TorchKMeans

from .features import iter_chunks, n_rows

log = logging.getLogger(__name__)

MAX_ITER = 100  # Lloyd iterations per restart (stops earlier once centres move less than TOL)
TOL = 1e-4  # mean centre shift; features are L2-normalised, so this is on a unit scale


class LowMemoryKMeans(_TorchKMeans):
    """``torch_kmeans.KMeans`` with an O(N*K)-memory Euclidean distance."""

    def _pairwise_distance(self, x: torch.Tensor, centers: torch.Tensor, **kwargs) -> torch.Tensor:
        bs, n, d = x.shape  # (BS, N, D)
        _, m, k, _ = centers.shape  # (BS, num_init, K, D)
        c = centers.reshape(bs, m * k, d)
        d2 = ((x * x).sum(-1, keepdim=True) - 2 * torch.bmm(x, c.transpose(1, 2))
              + (c * c).sum(-1)[:, None, :])  # (BS, N, num_init * K)
        return d2.clamp_min_(0).sqrt_().view(bs, n, m, k).permute(0, 2, 1, 3).contiguous()  # (BS, m, N, K)


def to_device(feats: np.ndarray, rows: np.ndarray | None, device: str | torch.device) -> torch.Tensor:
    """(N, D) float32 tensor of the selected rows on ``device``, filled chunk by chunk from the file."""
    n, d = n_rows(feats, rows), feats.shape[1]
    out = torch.empty((n, d), dtype=torch.float32, device=device)
    for s, chunk in iter_chunks(feats, rows):
        out[s:s + len(chunk)] = torch.from_numpy(chunk).to(device)
    return out


@torch.no_grad()
def torch_kmeans_labels(feats: np.ndarray, k: int, seed: int, rows: np.ndarray | None = None,
                        device: str | torch.device = "cpu", n_init: int = 4) -> np.ndarray:
    """Cluster ids (N,) int64: the restart (seeds seed..seed+n_init-1) with the lowest inertia. Needs 2 <= k < N."""
    x = to_device(feats, rows, device)[None]  # (1, N, D)
    best_inertia, best = float("inf"), None
    for i in range(n_init):
        km = LowMemoryKMeans(init_method="k-means++", num_init=1, max_iter=MAX_ITER, tol=TOL, n_clusters=k,
                             verbose=False, seed=seed + i)
        res = km(x)
        inertia = float(res.inertia[0])
        if inertia < best_inertia:
            best_inertia, best = inertia, res.labels[0]
    log.info("torch k-means on %s: %d rows, k %d, inertia %.4g", device, x.shape[1], k, best_inertia)
    return best.cpu().numpy().astype(np.int64)
