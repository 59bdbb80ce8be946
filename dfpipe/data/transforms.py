"""Image transforms: albumentations presets (CPU, uint8) and the on-device model input step."""

from __future__ import annotations

import typing

import albumentations as A  # never phones home: importing dfpipe set NO_ALBUMENTATIONS_UPDATE (OFFLINE_ENV)
import cv2
import numpy as np
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ..config import AugmentPreset  # noqa: E402
from ..errors import ConfigError  # noqa: E402

PRESETS = typing.get_args(AugmentPreset)  # none, light, strong, randaugment, blur_jpeg, light_blur_jpeg, safe(_post)

# safe_post's post-processing, one distribution for every training image whatever its label or source: the dev
# sources' real and fake images come with different compression histories, and a detector must not learn those
SAFE_POST_DOWNSCALE = (0.2, (0.5, 0.9))  # (probability, scale range): area down, bilinear back up to the same size
SAFE_POST_JPEG = (0.5, (60, 100))  # (probability, quality range), after the downscale as a re-upload would


def _randaugment() -> list:
    """RandAugment (Cubuk et al. 2020) as the seed systems used it: 2 ops drawn uniformly from a list
    of photometric and geometric ops at a fixed moderate magnitude (about 9 of 30)."""
    ops = [
        A.NoOp(),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
        A.Affine(rotate=(-30, 30), p=1.0),
        A.Solarize(threshold_range=(0.6, 0.9), p=1.0),
        A.Posterize(num_bits=(5, 7), p=1.0),
        A.ColorJitter(brightness=0.3, contrast=0, saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=0.3, saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=0, saturation=0.3, hue=0, p=1.0),
        A.Sharpen(alpha=(0.2, 0.5), p=1.0),
        A.Affine(shear={"x": (-15, 15), "y": (0, 0)}, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-15, 15)}, p=1.0),
        A.Affine(translate_percent={"x": (-0.15, 0.15), "y": (0, 0)}, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.15, 0.15)}, p=1.0),
    ]
    return [A.SomeOf(ops, n=2, replace=False, p=1.0)]


def _blur_jpeg(p: float = 0.5) -> list:
    """Wang et al. (CVPR 2020), "Blur+JPEG (0.5)": Gaussian blur sigma ~ U[0, 3] with probability p,
    then JPEG quality ~ U[30, 100] with probability p. Trained so, a detector cannot lean on the
    finest pixels alone, which online re-encoding and resizing destroy; it transfers across generators."""
    return [A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, 3.0), p=p),
            A.ImageCompression(quality_range=(30, 100), p=p)]


class PatchMask(A.ImageOnlyTransform):
    """SAFE's random patch masking: a share ~ U[0, ``max_ratio``] of the ``patch`` x ``patch`` grid cells, drawn
    without replacement, set to 0 (black). A border narrower than a patch is never masked. Seeded by the
    pipeline's ``set_random_seed`` like every albumentations transform."""

    def __init__(self, max_ratio: float = 0.75, patch: int = 16, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.max_ratio, self.patch = float(max_ratio), int(patch)

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        h, w = params["shape"][:2]
        gh, gw = h // self.patch, w // self.patch
        n = gh * gw
        k = int(n * self.random_generator.uniform(0.0, self.max_ratio))
        keep = np.ones(n, dtype=np.uint8)
        keep[self.random_generator.choice(n, size=k, replace=False)] = 0
        return {"keep": keep.reshape(gh, gw)}

    def apply(self, img: np.ndarray, keep: np.ndarray, **params) -> np.ndarray:
        mask = np.ones(img.shape[:2], dtype=img.dtype)  # (H, W)
        cells = np.kron(keep, np.ones((self.patch, self.patch), dtype=np.uint8))  # (gh * patch, gw * patch)
        mask[:cells.shape[0], :cells.shape[1]] = cells
        return img * (mask[..., None] if img.ndim == 3 else mask)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_ratio", "patch")


def _safe(post: bool) -> list:
    """SAFE's training augmentation (Li et al., KDD 2025) on a native-pixel crop (the input policy ``crop`` cuts
    it at random; nothing here resamples the crop), after the horizontal flip every preset has:

    * a random multiple of 90 degrees: SAFE rotates by any angle with nearest-neighbour sampling, which
      duplicates and drops pixels and blacks the corners; the four right angles move pixels without changing one;
    * colour jitter (brightness, contrast, saturation 0.5, as SAFE);
    * random patch masking (:class:`PatchMask`: up to 75% of the 16 x 16 cells with probability 0.5, as SAFE).

    ``post`` (preset ``safe_post``) first applies one post-processing distribution to every image, whatever its
    label: a downscale and back (:data:`SAFE_POST_DOWNSCALE`), then a JPEG re-encode (:data:`SAFE_POST_JPEG`), so
    a compression or resampling history no longer tells one class from the other. The downscale is the only
    resampling step of the preset, and an opt-in one.
    """
    ops: list = []
    if post:
        (p_down, scales), (p_jpeg, qualities) = SAFE_POST_DOWNSCALE, SAFE_POST_JPEG
        ops += [A.Downscale(scale_range=scales, interpolation_pair={"downscale": cv2.INTER_AREA,
                                                                    "upscale": cv2.INTER_LINEAR}, p=p_down),
                A.ImageCompression(quality_range=qualities, p=p_jpeg)]
    return ops + [A.RandomRotate90(p=1.0), A.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.0, p=1.0),
                  PatchMask(max_ratio=0.75, patch=16, p=0.5)]


def train_augment(preset: str, seed: int) -> A.Compose | None:
    """Albumentations pipeline on uint8 HWC images (every preset but 'none' flips horizontally).

    'light' keeps forgery traces mostly intact; 'strong' adds geometry, noise, colour and dropout;
    'randaugment' is the seed-style baseline's; 'blur_jpeg' is Wang et al.'s blur + JPEG;
    'light_blur_jpeg' is 'light' then blur + JPEG; 'safe' is SAFE's rotation, colour jitter and patch masking
    for native-pixel crops, 'safe_post' the same after one shared post-processing distribution (:func:`_safe`).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown augmentation preset {preset!r}; choose one of {PRESETS}")
    if preset == "none":
        return None
    ops: list = [A.HorizontalFlip(p=0.5)]
    if preset == "randaugment":
        ops += _randaugment()
    elif preset == "blur_jpeg":
        ops += _blur_jpeg()
    elif preset == "light_blur_jpeg":
        ops += [A.RandomBrightnessContrast(0.1, 0.1, p=0.3), *_blur_jpeg()]
    elif preset in ("safe", "safe_post"):
        ops += _safe(post=preset == "safe_post")
    elif preset == "light":
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
