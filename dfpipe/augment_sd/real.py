"""Real-class widening: degrade real images the way fakes are often degraded, and keep them real.

If only fakes went through JPEG, resizing or blur, a detector could learn "compressed = fake". Widened
copies of real images (label 0) break that shortcut. ``widen_real`` applies a random chain of
operations; the rng is the only randomness, so one seed gives the same bytes.
"""

from __future__ import annotations

import cv2
import numpy as np

from .editing import color_jitter
from .imaging import f32, odd


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode to JPEG at ``quality`` and decode again (RGB in, RGB out)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - cv2 always encodes a valid uint8 image
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


_INTERP = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
           "area": cv2.INTER_AREA}


def _resize_chain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    h, w = img.shape[:2]
    factor = rng.uniform(0.4, 0.85)
    down, up = str(rng.choice(["area", "bilinear", "bicubic"])), str(rng.choice(["bilinear", "bicubic", "nearest"]))
    small = cv2.resize(img, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=_INTERP[down])
    return cv2.resize(small, (w, h), interpolation=_INTERP[up]), {"factor": f32(factor), "down": down, "up": up}


def _blur(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    sigma = rng.uniform(0.3, 1.2)
    k = odd(6 * sigma)
    return cv2.GaussianBlur(img, (k, k), sigma), {"sigma": f32(sigma)}


def _noise(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    sigma = rng.uniform(1.0, 5.0)
    noisy = img.astype(np.float32) + rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8), {"sigma": f32(sigma)}


def _colour(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    x, params = color_jitter(img, rng, strength=0.5)
    return np.round(x).astype(np.uint8), params


# Order matters: photometric changes and resizing first, JPEG last (as on the web: edit, then save).
_OPS = (("colour", _colour, 0.5), ("resize", _resize_chain, 0.5), ("blur", _blur, 0.3), ("noise", _noise, 0.3))


def widen_real(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A degraded copy of a real image (same shape, uint8) and the chain that was applied.

    JPEG re-encoding always runs last (quality 30-95); each other step runs with its own
    probability, so some copies are only re-compressed.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}")
    out = img
    chain: list[dict] = []
    for name, fn, prob in _OPS:
        if rng.random() < prob:
            out, params = fn(out, rng)
            chain.append({"op": name, **params})
    quality = int(rng.integers(30, 96))
    out = jpeg(out, quality)
    chain.append({"op": "jpeg", "quality": quality})
    return np.ascontiguousarray(out, dtype=np.uint8), {"chain": chain}
