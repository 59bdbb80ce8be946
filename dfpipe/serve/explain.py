"""Explanation heatmap by occlusion, scored by the ensemble itself (no second model, no gradients).

The map is made on the *stage-1 image* (:mod:`dfpipe.data.preprocess`): the upload as the experts'
checkpoints prepare it (downscaled to ``max_side``, cropped to the face when the experts were trained
on face crops), before each expert's input policy. Each window of it (a ``grid`` x ``grid`` lattice,
windows two cells wide, one cell apart) is replaced by a blurred copy of itself (``fill="blur"``: its
fine detail, where manipulation traces usually live, is removed) or by the image's mean colour
(``fill="mean"``), and the whole ensemble (all experts, their input policies and TTA views, through
``Ensemble.score_prepared``: stage 1 is not applied a second time) scores every occluded copy. A
window's value is ``score(original) - score(occluded)``, averaged over the windows covering a pixel:
positive = this region pushes the score towards fake, negative = towards real.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import cv2
import numpy as np

FILLS = ("blur", "mean")
BLUR_SIDE = 512  # a larger image is blurred at this side and scaled back (a native-size blur costs seconds)
CHUNK_PIXELS = 32_000_000  # occluded copies scored at once: bounds memory for a large stage-1 image


def occlusion_map(score_prepared: Callable[[list[np.ndarray]], np.ndarray], img: np.ndarray, grid: int = 8,
                  fill: str = "blur") -> tuple[float, np.ndarray]:
    """(score of the image, (H, W) float32 map of score drops) for an (H, W, 3) uint8 stage-1 image.

    ``score_prepared`` scores stage-1 images (``Ensemble.score_prepared``): ``img`` must already be the
    stage-1 image (``Ensemble.stage1_image``), and the map is in its pixels.
    """
    if fill not in FILLS:
        raise ValueError(f"unknown occlusion fill {fill!r}; choose one of {FILLS}")
    if grid < 2:
        raise ValueError(f"occlusion grid must be >= 2, got {grid}")
    h, w = img.shape[:2]
    if fill == "blur":
        filler = _blurred(img)
    else:
        filler = np.broadcast_to(img.reshape(-1, 3).mean(0).astype(np.uint8), img.shape)
    ys = np.linspace(0, h, grid + 1).round().astype(int)
    xs = np.linspace(0, w, grid + 1).round().astype(int)
    windows = [(i, j) for i in range(grid - 1) for j in range(grid - 1)]  # top-left cell of each 2 x 2 window

    def occluded(i: int, j: int) -> np.ndarray:
        y0, y1, x0, x1 = ys[i], ys[i + 2], xs[j], xs[j + 2]
        o = img.copy()
        o[y0:y1, x0:x1] = filler[y0:y1, x0:x1]
        return o

    per_call = max(1, CHUNK_PIXELS // max(1, h * w))
    base = float(np.asarray(score_prepared([img]), dtype=np.float64)[0])
    drops: list[float] = []
    for start in range(0, len(windows), per_call):
        part = windows[start:start + per_call]
        drops += [base - float(s) for s in np.asarray(score_prepared([occluded(i, j) for i, j in part]), np.float64)]
    # per lattice cell: the mean drop of the (up to four) windows covering it, then spread over its pixels
    cell, cover = np.zeros((grid, grid)), np.zeros((grid, grid))
    for (i, j), d in zip(windows, drops):
        cell[i:i + 2, j:j + 2] += d
        cover[i:i + 2, j:j + 2] += 1
    cell /= np.maximum(cover, 1)
    rows, cols = np.diff(ys), np.diff(xs)
    heat = np.repeat(np.repeat(cell.astype(np.float32), rows, axis=0), cols, axis=1)
    return base, heat


def paced(score_fn: Callable[[list[np.ndarray]], np.ndarray], idle: Callable[[], bool], chunk: int,
          deadline: float, pause_s: float = 0.5, poll_s: float = 0.005) -> Callable[[list[np.ndarray]], np.ndarray]:
    """``score_fn`` scoring at most ``chunk`` images per call, each call only once ``idle()`` (the /predict model
    thread has nothing to do) or after ``pause_s`` of waiting for it, so an explanation neither blocks /predict
    nor starves under a steady stream of it. Raises TimeoutError once ``deadline`` (time.monotonic) has passed."""

    def score(images: list[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(images), chunk):
            if time.monotonic() > deadline:
                raise TimeoutError("explanation deadline passed")
            give_way_until = time.monotonic() + pause_s
            while not idle() and time.monotonic() < give_way_until:
                time.sleep(poll_s)
            out.append(np.asarray(score_fn(images[start:start + chunk]), dtype=np.float64))
        return np.concatenate(out) if out else np.zeros(0)

    return score


def _blurred(img: np.ndarray) -> np.ndarray:
    """A copy of ``img`` without its fine detail (Gaussian, sigma = 1/48 of the longer side)."""
    h, w = img.shape[:2]
    if max(h, w) <= BLUR_SIDE:
        return cv2.GaussianBlur(img, (0, 0), sigmaX=max(1.0, max(h, w) / 48))
    f = BLUR_SIDE / max(h, w)
    small = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=BLUR_SIDE / 48)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


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
