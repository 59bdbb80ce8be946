"""Face landmarks from an offline detector, for landmark-shaped forgery masks (stage 2's ``self_blend``).

A landmarker is any object with ``detect(img) -> (N, 2) float32 array or None`` taking an (H, W, 3)
uint8 RGB array and returning the (x, y) pixel coordinates of one face's landmarks in that image (None:
no face). Select one with ``augment_sd.landmarks`` (``none`` = no detector); register another with
:func:`register_landmarker` (or ``@LANDMARKERS.register("name")``): the config then accepts its name.

``mediapipe``: MediaPipe's Face Mesh (468 points, forehead to chin, cheek to cheek), the "legacy
solutions" API of ``mediapipe==0.10.21``, whose wheel holds the TFLite models (face detector and mesh):
nothing is downloaded at run time. Later releases dropped that API and ship no models (their Tasks API
reads a separately downloaded ``.task`` file), and 0.10.21 declares ``numpy<2`` although it runs, with
the same landmarks to the bit, on numpy 2: the Makefile installs it with ``--no-deps`` (its run-time
needs, ``protobuf<5`` and ``attrs``, come with the ``landmarks`` extra).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import cv2
import numpy as np

from ..errors import ConfigError, did_you_mean
from ..registry import LANDMARKERS

log = logging.getLogger(__name__)

MEDIAPIPE_PIN = "mediapipe==0.10.21"
MEDIAPIPE_INSTALL = (f"pip install --no-deps {MEDIAPIPE_PIN} && pip install 'protobuf>=4.25.3,<5' attrs "
                     "(or `make setup`)")


class FaceLandmarker(Protocol):
    def detect(self, img: np.ndarray) -> np.ndarray | None:
        """(N, 2) float32 (x, y) pixel landmarks of one face of an (H, W, 3) uint8 RGB image, or None."""


def _import_face_mesh():
    """MediaPipe's legacy Face Mesh module, or a ConfigError saying what to install."""
    try:
        import mediapipe
    except ImportError as exc:
        raise ConfigError(f"augment_sd.landmarks: mediapipe: the package 'mediapipe' is not installed ({exc}); "
                          f"install it with `{MEDIAPIPE_INSTALL}`, or set augment_sd.landmarks: none") from None
    try:
        from mediapipe.python.solutions import face_mesh
    except ImportError as exc:  # 0.10.30 and later: no legacy solutions, no models in the wheel
        version = getattr(mediapipe, "__version__", "?")
        raise ConfigError(f"augment_sd.landmarks: mediapipe {version} has no Face Mesh solution with its model "
                          f"inside the wheel ({exc}); install `{MEDIAPIPE_PIN}` with `{MEDIAPIPE_INSTALL}`"
                          ) from None
    return face_mesh


@LANDMARKERS.register("mediapipe")
class MediaPipeFaceMesh:
    """MediaPipe Face Mesh in static-image mode: 468 landmarks of the most confident face (CPU, no download).

    Images whose longer side exceeds ``max_side`` are searched downscaled (INTER_AREA) and the points
    mapped back: the models run at 128 px (detector) and 192 px (mesh) anyway. MediaPipe's detector is
    its short-range one: faces that fill a good part of the image (face crops, portraits); a small face in
    a wide photo is not found (``detect`` returns None).
    """

    name = "mediapipe"

    def __init__(self, max_side: int = 640, min_confidence: float = 0.5) -> None:
        face_mesh = _import_face_mesh()
        self.max_side = max_side
        self._mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False,
                                        min_detection_confidence=min_confidence)

    def detect(self, img: np.ndarray) -> np.ndarray | None:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        small = img if scale == 1.0 else cv2.resize(
            img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        res = self._mesh.process(np.ascontiguousarray(small))
        if not res.multi_face_landmarks:
            return None
        lm = res.multi_face_landmarks[0].landmark
        # Normalised to the image given (x by its width, y by its height): back to pixels of `img`.
        xy = np.array([(p.x, p.y) for p in lm], np.float32)
        xy *= np.array([w, h], np.float32)
        return xy

    def close(self) -> None:
        self._mesh.close()


def register_landmarker(name: str, factory: Callable[[], FaceLandmarker]) -> None:
    """Make ``augment_sd.landmarks: <name>`` valid and use ``factory()`` (called once per process)."""
    LANDMARKERS.register(name, factory)


def get_landmarker(name: str) -> FaceLandmarker:
    """The landmarker called ``name``, built once per process (MediaPipe graphs cannot be pickled).

    Raises a ConfigError for an unknown name or a detector whose package is not installed.
    """
    return LANDMARKERS.build(name)


def check_landmarker(name: str) -> None:
    """Fail fast (ConfigError) on an unknown name or a missing package; ``none`` always passes."""
    if name == "none":
        return
    if name not in LANDMARKERS:
        raise ConfigError(f"augment_sd.landmarks={name!r}: choose one of {['none', *LANDMARKERS.names()]}"
                          f"{did_you_mean(name, LANDMARKERS.names())}")
    if name == "mediapipe":
        _import_face_mesh()  # cheap: the graph itself is built in the workers


def face_landmarks(img: np.ndarray, name: str) -> np.ndarray | None:
    """(N, 2) float32 pixel landmarks of one face of ``img`` by detector ``name`` (None: no face, or ``none``)."""
    if name == "none":
        return None
    return get_landmarker(name).detect(img)


def face_landmarks_batch(images: Sequence[np.ndarray], name: str) -> list[np.ndarray | None]:
    """:func:`face_landmarks` of each image (images may differ in size)."""
    if name == "none":
        return [None] * len(images)
    det = get_landmarker(name)
    batch = getattr(det, "detect_batch", None)
    return list(batch(images)) if batch is not None else [det.detect(im) for im in images]
