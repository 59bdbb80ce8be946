"""Stage 4 learns: ``train_expert`` on a small separable set reaches val AUC > 0.9, and the check can fail.

The set: smooth random "photos"; every fake carries a high-contrast checkerboard patch at a random place
(it survives the cache -> model resize). The stage-1 / stage-3 outputs the loop reads (cache .npy +
manifest, an empty stage-2 manifest, the split table) are written directly, as in test_train.py.

Controls, each through the real loop: train labels flipped relative to val -> val AUC < 0.5 (a label
swap anywhere in the data path would show up as that); the expert's probability column swapped
(softmax[:, 0], P(real), reported as P(fake)) -> val AUC < 0.5 (the loop evaluates on ``prob``, which
no loss term reads, so only an AUC check catches it). Bundled tf_efficientnet_lite0 at 48 px, 2 epochs of
128 images, the default loss weights (CE + EMA-teacher KL + NCE): about 5 s a run on one busy CPU core.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import layout_in, write_cache_pool
from dfpipe.config import ExpertConfig, LossWeights, TrainConfig
from dfpipe.models.registry import Expert
from dfpipe.train_experts.loop import train_expert

CACHE, IMG = 64, 48
N_TRAIN, N_VAL = 128, 48
PATCH, CELL = 16, 4  # fake marker: a PATCH x PATCH checkerboard of CELL-pixel squares (CACHE pixels)

# tiny steps: one intra-op thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """(n, CACHE, CACHE, 3) uint8: smooth colour fields + noise; fakes get the checkerboard patch."""
    out = np.empty((len(labels), CACHE, CACHE, 3), np.uint8)
    yy, xx = np.mgrid[0:PATCH, 0:PATCH]
    board = (((yy // CELL) + (xx // CELL)) % 2 * 255).astype(np.uint8)[..., None]  # 0 / 255
    for i, y in enumerate(labels):
        low = rng.uniform(40, 215, (4, 4, 3)).astype(np.float32)
        img = cv2.resize(low, (CACHE, CACHE), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 8, (CACHE, CACHE, 3))
        img = np.clip(img, 0, 255).astype(np.uint8)
        if y == 1:
            r, c = rng.integers(0, CACHE - PATCH + 1, 2)
            img[r:r + PATCH, c:c + PATCH] = board
        out[i] = img
    return out


def _write_pool(root: Path, flip_train: bool = False) -> None:
    """prepared/{train,val}.npy + manifest.csv, aug/manifest.csv (empty), splits.csv (train / val)."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        labels = rng.permutation(np.arange(n) % 2)  # balanced, shuffled
        imgs = _images(rng, labels)
        splits[split] = (imgs, 1 - labels if (flip_train and split == "train") else labels)  # same pixels
    write_cache_pool(root, splits, n_clusters=4)


def _train(root: Path) -> tuple[dict, pd.DataFrame]:
    expert = ExpertConfig(pretrained="bundled", img_size=IMG, epochs=2, batch_size=16, lr=2e-3, lr_ref_batch=16,
                          ema_epochs=1.0, warmup_epochs=0.25, augment="light",
                          loss=LossWeights(ce=1.0, kl=0.5, nce=0.1))
    layout = layout_in(root, splits=root / "splits.csv", prepared=root / "prepared", augmented=root / "aug",
                       models=root / "models")
    return train_expert(TrainConfig(workers=0, experts={"e": expert}), layout, "e")


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> tuple[dict, pd.DataFrame]:
    root = tmp_path_factory.mktemp("learns")
    _write_pool(root)
    return _train(root)


def test_a_separable_set_is_learned(learned):
    best, hist = learned
    assert best["auc"] > 0.9, hist[["epoch", "ce", "val_auc"]].to_string()
    assert hist.val_auc.iloc[-1] > 0.9  # and it stays learned: the last epoch too
    assert hist.ce.iloc[-1] < hist.ce.iloc[0]


def test_train_labels_flipped_against_val_gives_auc_below_chance(tmp_path):
    """The control: the same pixels, train labels swapped. Had the loop learned nothing from labels (or
    swapped them itself), this would not flip the result."""
    _write_pool(tmp_path, flip_train=True)
    best, hist = _train(tmp_path)
    assert best["auc"] < 0.5 and hist.val_auc.iloc[-1] < 0.5, hist[["epoch", "ce", "val_auc"]].to_string()


def test_a_swapped_probability_column_is_caught(tmp_path, monkeypatch):
    """An expert that reports softmax[:, 0] (P(real)) as P(fake): training is unchanged (the losses read the
    logits), but the val AUC the loop reports falls below chance, so the check above would fail."""
    real_forward = Expert.forward

    def swapped(self, x):
        out = real_forward(self, x)
        return {**out, "prob": torch.softmax(out["logits"].float(), dim=1)[:, 0]}

    monkeypatch.setattr(Expert, "forward", swapped)
    _write_pool(tmp_path)
    best, hist = _train(tmp_path)
    assert best["auc"] < 0.5 and hist.val_auc.iloc[-1] < 0.5, hist[["epoch", "ce", "val_auc"]].to_string()
