"""Small pixel helpers the editing methods and their masks share (exact, deterministic, uint8 in and out)."""

from __future__ import annotations

import cv2
import numpy as np

# Mask values below this change no 8-bit pixel; zeroing them keeps the mask tight to the change.
MASK_EPS = 1.0 / 255.0


# --------------------------------------------------------------------------- small helpers
def f32(x: float) -> float:
    """A rounded Python float for the params dict (short, stable JSON)."""
    return round(float(x), 4)


def quantise_mask(mask: np.ndarray) -> np.ndarray:
    """Round to 8-bit levels so the saved PNG equals the mask used for blending."""
    q = np.clip(mask, 0.0, 1.0).astype(np.float32, copy=False)
    q *= 255.0
    np.round(q, out=q)
    q /= 255.0
    return q


Box = tuple[slice, slice]


def bbox(mask: np.ndarray, pad: int = 0) -> Box:
    """(rows, cols) slices of the bounding box of ``mask > 0`` grown by ``pad`` (clipped to the image).

    Everything a method changes lies in this box, so the per-pixel work after the mask is drawn is
    done there only: its cost follows the region, not the whole (possibly 12 MP) image.
    """
    x, y, bw, bh = cv2.boundingRect((mask > 0).view(np.uint8))
    if bw == 0:
        return slice(0, 0), slice(0, 0)
    h, w = mask.shape
    return slice(max(0, y - pad), min(h, y + bh + pad)), slice(max(0, x - pad), min(w, x + bw + pad))


def blend(img: np.ndarray, src: np.ndarray, mask: np.ndarray, box: Box | None = None) -> np.ndarray:
    """``mask * src + (1 - mask) * img``; pixels with mask == 0 are copied, not recomputed.

    ``src`` is of the image's size, or (with ``box``) the crop ``box`` of it; ``box`` must hold every
    pixel with ``mask > 0``.
    """
    if box is None:
        box = bbox(mask)
        src = src[box]
    out = img.copy()
    m, base = mask[box][..., None], img[box]
    # In place, few passes (the box can be most of a 12 MP image). Where m == 0 this is exactly
    # base * 1 + src * 0 = base: the pixel is copied.
    blended = src.astype(np.float32)
    blended *= m
    blended += base * (1.0 - m)
    np.round(blended, out=blended)
    np.clip(blended, 0, 255, out=blended)
    out[box] = blended
    return out


def finish(img: np.ndarray, fake: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Enforce the contract: untouched outside the mask, uint8, contiguous."""
    box = bbox(mask)
    out = img.copy()
    out[box] = np.where(mask[box][..., None] > 0, fake[box], img[box])
    return out, np.ascontiguousarray(mask, dtype=np.float32)


def check_image(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}")


def odd(k: float) -> int:
    k = max(1, int(round(k)))
    return k if k % 2 else k + 1
