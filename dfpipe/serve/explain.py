"""Explanation heatmap by occlusion, scored by the ensemble itself (no second model, no gradients).

Each window of the image (a ``grid`` x ``grid`` lattice, windows two cells wide, one cell apart) is
replaced by a blurred copy of itself (``fill="blur"``: its fine detail, where manipulation traces
usually live, is removed) or by the image's mean colour (``fill="mean"``), and the whole ensemble
(all experts and TTA views, through ``Ensemble.score_images``) scores every occluded copy in one
batch. A window's value is ``score(original) - score(occluded)``, averaged over the windows covering
a pixel: positive = this region pushes the score towards fake, negative = towards real.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from ..data.images import resize_square

FILLS = ("blur", "mean")


def occlusion_map(score_images: Callable[[list[np.ndarray]], np.ndarray], img: np.ndarray, size: int,
                  grid: int = 8, fill: str = "blur") -> tuple[float, np.ndarray]:
    """(score of the image, (size, size) float map of score drops) for an (H, W, 3) uint8 image.

    The image is first resized as stage 1 does (``size`` = the ensemble's cache size), so the map is
    in the pixels the experts see.
    """
    if fill not in FILLS:
        raise ValueError(f"unknown occlusion fill {fill!r}; choose one of {FILLS}")
    if grid < 2:
        raise ValueError(f"occlusion grid must be >= 2, got {grid}")
    sq = resize_square(img, size)
    filler = (cv2.GaussianBlur(sq, (0, 0), sigmaX=max(1.0, size / 48)) if fill == "blur"
              else np.broadcast_to(sq.reshape(-1, 3).mean(0).astype(np.uint8), sq.shape))
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    windows = [(edges[i], edges[i + 2], edges[j], edges[j + 2]) for i in range(grid - 1) for j in range(grid - 1)]
    occluded = []
    for y0, y1, x0, x1 in windows:
        o = sq.copy()
        o[y0:y1, x0:x1] = filler[y0:y1, x0:x1]
        occluded.append(o)
    scores = np.asarray(score_images([sq, *occluded]), dtype=np.float64)
    heat, cover = np.zeros((size, size)), np.zeros((size, size))
    for (y0, y1, x0, x1), s in zip(windows, scores[1:]):
        heat[y0:y1, x0:x1] += scores[0] - s
        cover[y0:y1, x0:x1] += 1
    return float(scores[0]), heat / np.maximum(cover, 1)


def overlay(img: np.ndarray, heat: np.ndarray, max_side: int = 512, alpha: float = 0.65) -> tuple[np.ndarray, float]:
    """The image (at most ``max_side`` px, aspect kept) with the map over it: red where the region
    pushes towards fake, blue towards real, transparent where it does not matter. Returns the RGB
    uint8 overlay and the map's scale (largest absolute score change)."""
    h, w = img.shape[:2]
    f = min(1.0, max_side / max(h, w))
    disp = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else img
    hm = cv2.resize(heat.astype(np.float32), (disp.shape[1], disp.shape[0]), interpolation=cv2.INTER_CUBIC)
    hm = cv2.GaussianBlur(hm, (0, 0), sigmaX=max(disp.shape[:2]) / 48)  # soften the window grid's steps
    scale = float(np.abs(heat).max())
    rel = np.clip(hm / scale, -1, 1) if scale > 0 else np.zeros_like(hm)
    colour = cv2.applyColorMap(((rel + 1) * 127.5).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
    a = (alpha * np.abs(rel))[..., None]
    return (disp * (1 - a) + colour * a).round().astype(np.uint8), scale


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - cv2 encodes any uint8 RGB array
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
