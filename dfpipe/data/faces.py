"""Optional face crop for stage 1: a pluggable detector interface, OpenCV's Haar cascade by default.

A detector is any object with ``detect(img) -> list[Box]`` taking an (H, W, 3) uint8 RGB array and
returning boxes in that image's pixel coordinates. Register another one (e.g. a DNN detector) with
:func:`register_detector` (or ``@FACE_DETECTORS.register("name")`` on its class): ``prepare_data.face_crop``
then accepts its name, with no other edit (the config's choices come from :data:`FACE_DETECTORS`).

Policy (``prepare_data.face_policy``) for an image with no face: ``whole`` keeps the whole image,
``skip`` drops it (reported like a bad input), ``largest`` keeps the whole image too (there is no
face to choose from); with several faces the largest one is cropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, get_args

import cv2
import numpy as np

from ..config import FacePolicy
from ..errors import ConfigError
from ..registry import FACE_DETECTORS

log = logging.getLogger(__name__)

FACE_POLICIES = get_args(FacePolicy)  # ("whole", "largest", "skip")


class Box(NamedTuple):
    """A detection in pixel coordinates of the image given to ``detect``."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0


class FaceDetector(Protocol):
    def detect(self, img: np.ndarray) -> list[Box]:
        """Faces of an (H, W, 3) uint8 RGB image."""


@FACE_DETECTORS.register("haar")
class HaarDetector:
    """OpenCV 4's bundled frontal-face Haar cascade (no download, CPU, deterministic).

    Large images are searched at ``max_side`` pixels (the boxes are mapped back); the smallest face
    searched for is ``min_face`` of the image's shorter side.
    """

    def __init__(self, cascade: str = "haarcascade_frontalface_default.xml", max_side: int = 640,
                 min_face: float = 0.08, min_neighbors: int = 5, scale_factor: float = 1.1) -> None:
        path = cv2.data.haarcascades + cascade
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise RuntimeError(f"cannot load the Haar cascade {path} (is opencv installed with its data?)")
        self.max_side, self.min_face = max_side, min_face
        self.min_neighbors, self.scale_factor = min_neighbors, scale_factor

    def detect(self, img: np.ndarray) -> list[Box]:
        h, w = img.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))),
                              interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(grey)
        min_px = max(20, int(self.min_face * min(grey.shape)))
        rects, _, weights = self.cascade.detectMultiScale3(
            grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(min_px, min_px),
            outputRejectLevels=True)
        boxes = []
        for (x, y, bw, bh), score in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1)):
            boxes.append(Box(round(x / scale), round(y / scale), round(bw / scale), round(bh / scale),
                             float(score)))
        return boxes


def register_detector(name: str, factory: Callable[[], FaceDetector]) -> None:
    """Make ``prepare_data.face_crop: <name>`` valid and use ``factory()`` (called once per worker process)."""
    FACE_DETECTORS.register(name, factory)


def get_detector(name: str) -> FaceDetector:
    """The detector called ``name``, built once per process (cascades cannot be pickled)."""
    return FACE_DETECTORS.build(name)


def crop_face(img: np.ndarray, box: Box | tuple, margin: float = 1.3) -> np.ndarray:
    """A square crop of side ``margin * max(w, h)`` centred on the box, moved/shrunk to fit the image."""
    x0, y0, side = crop_window(img.shape[:2], box, margin)
    return img[y0:y0 + side, x0:x0 + side]


def crop_window(shape: tuple[int, int], box: Box | tuple, margin: float) -> tuple[int, int, int]:
    """(x0, y0, side) of :func:`crop_face`'s square inside an image of ``shape`` (H, W)."""
    if margin <= 0:
        raise ConfigError(f"face margin must be > 0, got {margin}")
    h, w = shape
    bx, by, bw, bh = box[:4]
    side = int(round(max(bw, bh) * margin))
    side = max(1, min(side, h, w))
    cx, cy = bx + bw / 2.0, by + bh / 2.0
    x0 = int(np.clip(round(cx - side / 2.0), 0, w - side))
    y0 = int(np.clip(round(cy - side / 2.0), 0, h - side))
    return x0, y0, side


@dataclass(frozen=True)
class FaceResult:
    """What the face step did to one image: ``status`` is off / found / largest_of_N / none / skipped."""

    status: str
    box: tuple[int, int, int, int] = (-1, -1, -1, -1)
    score: float = float("nan")


def apply_face_crop(img: np.ndarray, detector_name: str, margin: float,
                    policy: str) -> tuple[np.ndarray | None, FaceResult]:
    """Crop ``img`` to its (largest) face per the config. Returns (image or None if skipped, result)."""
    if detector_name == "none":
        return img, FaceResult("off")
    boxes = get_detector(detector_name).detect(img)
    if not boxes:
        if policy == "skip":
            return None, FaceResult("skipped")
        return img, FaceResult("none")
    best = max(boxes, key=lambda b: (b.w * b.h, b.score))
    status = "found" if len(boxes) == 1 else f"largest_of_{len(boxes)}"
    return crop_face(img, best, margin), FaceResult(status, tuple(int(v) for v in best[:4]), float(best.score))
