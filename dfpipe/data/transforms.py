"""Image transforms: albumentations presets (CPU, uint8) and the on-device model input step."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # never phone home on import

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PRESETS = ("none", "light", "strong")


def train_augment(preset: str, seed: int) -> A.Compose | None:
    """Albumentations pipeline on uint8 HWC images. 'light' keeps forgery traces mostly intact."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {PRESETS}")
    if preset == "none":
        return None
    ops: list = [A.HorizontalFlip(p=0.5)]
    if preset == "light":
        ops += [
            A.ImageCompression(quality_range=(70, 100), p=0.3),
            A.RandomBrightnessContrast(0.1, 0.1, p=0.3),
        ]
    else:
        ops += [
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), p=0.5),
            A.ImageCompression(quality_range=(50, 100), p=0.5),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.06))], p=0.3),
            A.ColorJitter(0.2, 0.2, 0.2, 0.05, p=0.4),
            A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.25),
                            hole_width_range=(0.1, 0.25), p=0.3),
        ]
    return A.Compose(ops, seed=seed)


def as_callable(aug: A.Compose | None):
    """Adapt an albumentations pipeline to ``img -> img`` (None stays None)."""
    if aug is None:
        return None
    return lambda img: aug(image=img)["image"]


def to_model_input(
    x: torch.Tensor, img_size: int, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool = False
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, img_size, img_size) on x's device.

    Used at train and test time alike, so the model always sees the same resize and normalisation.
    """
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive numpy's seed from torch's per-worker seed."""
    np.random.seed(torch.initial_seed() % 2**32)
