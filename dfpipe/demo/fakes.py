"""The demo's manipulations: one local edit per fake (blend, splice, warp, upsample)."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from .sources import REGION_FRAC, smooth_noise

# --------------------------------------------------------------------------------------------
# local manipulations (all vectorised; float32 HxWx3 in [0, 255] in and out)


def region_mask(rng: np.random.Generator, h: int, w: int, feather: float) -> np.ndarray:
    """Soft (H, W) float32 mask of an irregular ellipse covering ~15-40 % of the image."""
    frac = rng.uniform(*REGION_FRAC)
    ratio = rng.uniform(0.6, 1.6)
    area = frac * h * w
    a = np.sqrt(area / np.pi * ratio)  # semi-axis along the rotated x
    b = np.sqrt(area / np.pi / ratio)
    theta = rng.uniform(0, np.pi)
    ext_x = np.sqrt((a * np.cos(theta)) ** 2 + (b * np.sin(theta)) ** 2)
    ext_y = np.sqrt((a * np.sin(theta)) ** 2 + (b * np.cos(theta)) ** 2)
    lo_x, hi_x = min(ext_x, w / 2), max(w - ext_x, w / 2)
    lo_y, hi_y = min(ext_y, h / 2), max(h - ext_y, h / 2)
    cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
    dist = np.sqrt(u * u + v * v) + 0.18 * smooth_noise(rng, h, w, 5)[..., 0]  # irregular outline
    mask = (dist < 1).astype(np.float32)
    if feather > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), feather)
    return mask


def _composite(base: np.ndarray, other: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None]
    return base * (1 - m) + other * m


def _colour_shift(rng: np.random.Generator, img: np.ndarray, strength: float) -> np.ndarray:
    """Per-channel gain/offset plus a saturation change; zero-mean in expectation."""
    gain = 1 + strength * rng.uniform(-1, 1, 3)
    offset = 40 * strength * rng.uniform(-1, 1, 3)
    out = img * gain + offset
    grey = out.mean(axis=2, keepdims=True)
    return grey + (out - grey) * (1 + 2 * strength * rng.uniform(-1, 1))


def fake_blend(rng, img, ctx):
    """Region alpha-blended with a blurred and/or colour-shifted copy of itself."""
    h, w = img.shape[:2]
    mask = region_mask(rng, h, w, feather=rng.uniform(0.01, 0.03) * min(h, w))
    mode = rng.integers(0, 4)  # 0 blur, 1 colour, 2-3 both
    other = img
    if mode != 1:
        other = cv2.GaussianBlur(other, (0, 0), rng.uniform(2.0, 4.0))
    if mode != 0:
        other = _colour_shift(rng, other, rng.uniform(0.08, 0.16))
    mask *= rng.uniform(0.8, 1.0)
    return _composite(img, other, mask), mask, ""


def fake_splice(rng, img, ctx):
    """Region replaced by a patch of another image with a colour mismatch and a slightly soft edge.

    Half the time the donor is another crop of the same source (copy-move like, subtler), else a
    crop of a random source.
    """
    h, w = img.shape[:2]
    donor, donor_name = ctx["sample_real"](rng, w, h, ctx["source"] if rng.random() < 0.5 else None)
    mask = region_mask(rng, h, w, feather=rng.uniform(1.0, 3.0))
    # a forger roughly matches the colour: move the donor's mean in the region onto the host's,
    # then leave a small mismatch (keeps the image's overall brightness distribution unchanged)
    inside = mask > 0.5
    if inside.any():
        donor = donor + (img[inside].mean(axis=0) - donor[inside].mean(axis=0)) * rng.uniform(0.7, 1.0)
    donor = _colour_shift(rng, donor, rng.uniform(0.04, 0.10))
    if rng.random() < 0.5:  # donor of a different sharpness, as if resampled before pasting
        donor = cv2.GaussianBlur(donor, (0, 0), rng.uniform(0.6, 1.2))
    return _composite(img, donor, mask), mask, donor_name


def fake_warp(rng, img, ctx):
    """Region geometrically warped by a smooth random displacement field (``cv2.remap``)."""
    h, w = img.shape[:2]
    mask = region_mask(rng, h, w, feather=rng.uniform(0.05, 0.08) * min(h, w))
    amp = rng.uniform(0.05, 0.10) * min(h, w)
    field = smooth_noise(rng, h, w, int(rng.integers(2, 4)), 2)
    field /= np.abs(field).max() + 1e-6
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    map_x = xx + amp * field[..., 0] * mask
    map_y = yy + amp * field[..., 1] * mask
    warped = cv2.remap(img, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return warped, mask, ""


def fake_upsample(rng, img, ctx):
    """Region down-sampled x3-x4 then nearest-neighbour up-sampled (blocky generator artefacts)."""
    h, w = img.shape[:2]
    factor = int(rng.integers(3, 5))
    small = cv2.resize(img, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
    blocky = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    mask = region_mask(rng, h, w, feather=rng.uniform(0.5, 1.5))
    return _composite(img, blocky, mask), mask, f"x{factor}"


MANIPULATIONS: dict[str, Callable] = {
    "blend": fake_blend,
    "splice": fake_splice,
    "warp": fake_warp,
    "upsample": fake_upsample,
}
