"""Pooled backbone features for every image of the pool, batched, cached as float16."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.dataset import CacheDataset
from ..data.transforms import to_model_input
from ..device import autocast, num_workers, pick_device
from ..models import create_backbone, normalization

log = logging.getLogger(__name__)


@torch.inference_mode()
def embed_pool(pool: pd.DataFrame, backbone: str, pretrained: str, img_size: int, batch_size: int,
               workers: int = -1) -> np.ndarray:
    """(N, D) float16 L2-normalised pooled features, in pool order."""
    device = pick_device()
    model = create_backbone(backbone, pretrained=pretrained, num_classes=0).eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    mean, std = normalization(model)
    loader = DataLoader(CacheDataset(pool), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers(workers), pin_memory=device.type == "cuda")
    feats: list[np.ndarray] = []
    for x, _, _ in tqdm(loader, desc="embed", unit="batch"):
        x = to_model_input(x.to(device, non_blocking=True), img_size, mean, std, device.type == "cuda")
        with autocast(device):
            f = model(x).float()  # (B, D) pooled features
        feats.append(torch.nn.functional.normalize(f, dim=1).cpu().numpy().astype(np.float16))
    out = np.concatenate(feats) if feats else np.zeros((0, 0), np.float16)
    log.info("embedded %d images with %s (%s weights): dim %d", len(out), backbone, pretrained, out.shape[1])
    return out
