"""Pooled backbone features for every image of the pool: batched, L2-normalised, float16.

:func:`embed_to_file` appends them batch by batch to a ``.npy`` file (plus a CSV index row -> uid), and
:class:`~.features.FeatureFile` reads it back row by row on demand (file reads, no memmap), so
embedding and clustering 500k images need memory for a batch, not for all features (500k x 1280
float16 = 1.3 GB on disk). :func:`embed_pool` returns them in memory (small pools, tests, benchmarks).
On CUDA: bf16 autocast and channels_last; always ``torch.inference_mode``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from ..data.decode_pool import store_batches
from ..data.preprocess import InputPolicy
from ..data.transforms import to_model_input
from ..device import autocast, num_workers, pick_device
from ..errors import DataError
from ..io import atomic_open, write_csv
from ..models import create_backbone, normalization
from .features import FeatureWriter

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["row", "uid", "img_name", "label", "origin"]


def load_backbone(backbone: str, pretrained: str, device: torch.device | None = None, seed: int = 0) -> nn.Module:
    """timm ``backbone`` giving pooled (B, D) features, eval mode, on ``device`` (default: pick_device()).

    ``pretrained``: ``bundled`` | ``timm`` | ``none`` | path of a local timm checkpoint (any timm model). Any
    weights the checkpoint does not set (all of them with ``none``) are drawn from ``seed``: the same features,
    hence the same clusters and folds, on every run; the global torch generator is left as it was.
    """
    device = device or pick_device()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_backbone(backbone, pretrained=pretrained, num_classes=0)
    model = model.eval().to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def embed_batches(pool: pd.DataFrame, model: nn.Module, img_size: int, batch_size: int, workers: int = -1
                  ) -> Iterator[np.ndarray]:
    """(B, D) float16 L2-normalised pooled features per batch, in pool order.

    Images are decoded in ``workers`` spawned processes (:mod:`dfpipe.data.decode_pool`; -1 = auto, 0 = in
    this one), not in DataLoader forks of this process, which would each count its torch memory again.
    """
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    mean, std = normalization(model)
    model.eval()
    policy = InputPolicy("resize", img_size)  # the whole image, squashed: clusters are about content
    batches = store_batches(pool.cache_path.to_numpy(), pool.cache_index.to_numpy(), policy, batch_size,
                            num_workers(workers))
    for batch in tqdm(batches, desc="embed", unit="batch", total=-(-len(pool) // batch_size)):
        x = torch.from_numpy(batch)  # uint8 (B, S, S, 3)
        x = x.pin_memory() if cuda else x
        with torch.inference_mode(), autocast(device):  # left before the yield: the caller runs outside it
            x = to_model_input(x.to(device, non_blocking=True), img_size, mean, std, cuda)  # (B, 3, S, S)
            f = torch.nn.functional.normalize(model(x).float(), dim=1)  # (B, D) pooled features
        yield f.cpu().numpy().astype(np.float16)


def embed_pool(pool: pd.DataFrame, backbone: str, pretrained: str, img_size: int, batch_size: int,
               workers: int = -1, model: nn.Module | None = None) -> np.ndarray:
    """(N, D) float16 features in memory, in pool order; ``model`` (if given) replaces backbone/pretrained."""
    model = model if model is not None else load_backbone(backbone, pretrained)
    feats = list(embed_batches(pool, model, img_size, batch_size, workers))
    out = np.concatenate(feats) if feats else np.zeros((0, 0), np.float16)
    log.info("embedded %d images with %s (%s weights): dim %d", len(out), backbone, pretrained, out.shape[1])
    return out


def embed_to_file(pool: pd.DataFrame, model: nn.Module, img_size: int, batch_size: int, path: str | Path,
                  workers: int = -1, index_path: str | Path | None = None) -> tuple[int, int]:
    """Write (N, D) float16 features of ``pool`` (in pool order) to the ``.npy`` file ``path``, and, given
    ``index_path``, the CSV index of its rows (:func:`write_index`).

    Each batch is appended to a temp file renamed onto ``path`` when complete, so a killed run never
    leaves a partial features file. One call writes both, so the index describes the very rows written (a caller
    cannot hand it another pool); it goes first, being the pool's order, known before any feature. Returns (N, D).
    """
    if len(pool) == 0:
        raise DataError("no original images to embed")
    if index_path is not None:
        write_index(pool, index_path)
    with atomic_open(path, "wb") as fh:
        out = FeatureWriter(fh, len(pool), np.float16)
        for f in embed_batches(pool, model, img_size, batch_size, workers):
            out.write(f)
        row, dim = out.close()
    log.info("streamed %d x %d float16 features to %s", row, dim, path)
    return row, dim


def write_index(pool: pd.DataFrame, path: str | Path) -> None:
    """CSV mapping each row of the features file to its image (``row, uid, img_name, label, origin``)."""
    index = pool.reset_index(drop=True).assign(row=np.arange(len(pool)))
    write_csv(path, index[INDEX_COLUMNS])


