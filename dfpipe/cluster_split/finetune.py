"""An embedder fine-tuned on the real/fake labels before clustering (the winners' way).

The winners embedded with an EfficientNet-B0 first trained a few epochs on the labels, so that the
clusters group images by what matters for forgery detection rather than by ImageNet content. Caveat:
this net sees the labels of the images it then clusters (and of those that end up in the val fold),
so clusters follow the labels more than a pretrained embedder's would. The experts of stage 4 never
see its weights; only the fold assignment depends on it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.dataset import StoreDataset
from ..data.preprocess import InputPolicy
from ..data.transforms import to_model_input
from ..device import autocast, num_workers, pick_device
from ..errors import DataError
from ..losses import ce_loss
from ..models import create_backbone, normalization

log = logging.getLogger(__name__)

WEIGHT_DECAY = 1e-4


def balanced_class_weights(labels: np.ndarray) -> np.ndarray:
    """(2,) weights n / (2 n_c): each class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=2)
    if (counts == 0).any():
        raise DataError(f"fine-tuning the embedder needs real and fake images; class counts {counts.tolist()}")
    return len(labels) / (2.0 * counts)


def finetune_embedder(train: pd.DataFrame, backbone: str, pretrained: str, img_size: int, batch_size: int,
                      epochs: int, lr: float, seed: int, workers: int = -1) -> tuple[nn.Module, list[dict]]:
    """Train ``backbone`` (weights from ``pretrained``) with a 2-way head and class-balanced CE on
    ``train`` (pool rows with label 0/1) for ``epochs``; return it as a pooled-feature extractor
    (head removed, eval mode) and the per-epoch history (loss, accuracy, seconds).

    AdamW with a cosine schedule; random horizontal flips come from a seeded generator of their own in
    the main process, so the result does not depend on the number of DataLoader workers.
    """
    device = pick_device()
    cuda = device.type == "cuda"
    torch.manual_seed(seed)  # the new head's initialisation
    model = create_backbone(backbone, pretrained=pretrained, num_classes=2).to(device)
    head = model.get_classifier()
    # timm draws this head with std ~ 1/sqrt(2): on 1280 features the first losses are ~4 and their large
    # gradients knock the pretrained features about; a zero head starts at log(2) and learns gently
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    mean, std = normalization(model)
    labels = train.label.to_numpy(dtype=np.int64)
    weights = torch.as_tensor(balanced_class_weights(labels), dtype=torch.float32, device=device)
    order = torch.Generator().manual_seed(seed)  # shuffle order (and worker seeds)
    flips = torch.Generator().manual_seed(seed + 1)  # its own stream: no coupling to the loader's draws
    loader = DataLoader(StoreDataset(train, [InputPolicy("resize", img_size)]), batch_size=batch_size, shuffle=True, generator=order,
                        drop_last=len(train) > batch_size,  # a batch of 1 would break BatchNorm
                        num_workers=num_workers(workers), pin_memory=cuda)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    history = []
    for epoch in range(epochs):
        history.append({"epoch": epoch, **_train_epoch(model, loader, opt, sched, weights, flips,
                                                        (img_size, mean, std), device)})
        log.info("embedder fine-tune epoch %d/%d: %s", epoch + 1, epochs, history[-1])
    model.reset_classifier(0)  # (B, D) pooled features from now on
    return model.eval(), history


def _train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, weights: torch.Tensor, gen: torch.Generator,
                 input_cfg: tuple[int, tuple, tuple], device: torch.device) -> dict:
    img_size, mean, std = input_cfg  # model input side and normalisation
    cuda = device.type == "cuda"
    model.train()
    t0, loss_sum, correct, n = time.perf_counter(), 0.0, 0, 0
    for xs, y, _ in tqdm(loader, desc="fine-tune embedder", unit="batch", leave=False):
        (x,) = xs.values()  # uint8 (B, S, S, 3)
        flip = torch.rand(len(x), generator=gen) < 0.5  # (B,) drawn in the main process
        x = torch.where(flip[:, None, None, None], x.flip(2), x)  # uint8 (B, H, W, 3): flip along W
        x = to_model_input(x.to(device, non_blocking=True), img_size, mean, std, cuda)
        y = y.to(device)
        with autocast(device):
            logits = model(x)  # (B, 2)
        loss = ce_loss(logits.float(), y, class_weights=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return {"loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1),
            "seconds": round(time.perf_counter() - t0, 2)}
