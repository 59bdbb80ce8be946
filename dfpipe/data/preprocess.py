"""One preprocessing contract from stage 1 to the API: what is done to an image before a model sees it.

An image goes through the same steps wherever it comes from (training, validation, stage 5, the
evaluation, ``dfpipe predict`` / ``scan``, the HTTP API):

1. **decode** (:func:`dfpipe.data.images.decode`): RGB uint8, EXIF rotation applied, alpha flattened...;
2. **stage 1** (:class:`Stage1`, :func:`stage1_image`): downscale so the longer side is at most
   ``max_side`` (0 = never; only ever down), then the optional face crop (detector, margin, policy).
   The result is the *stage-1 image*: what the image store holds (:mod:`dfpipe.data.store`);
3. **input policy** (:class:`InputPolicy`, :func:`fit`), per expert: ``resize`` squashes to
   ``size`` x ``size``; ``resize_short_crop`` resizes the shorter side to ``size`` (aspect kept) and
   crops a square; ``crop`` crops ``size`` x ``size`` at native resolution (every pixel as it came). The
   crop is random in training and central at test time. An image whose shorter side is below ``size``
   is first enlarged (bicubic) so its shorter side is ``size``: nothing is padded;
4. **normalise** (on the device, in batches: :func:`dfpipe.data.transforms.to_model_input`) with the
   expert's ``mean`` / ``std``.

Steps 3 and 4 are the expert's *input contract*, :class:`InputSpec` (size, mode, mean, std; timm's
``PretrainedCfg`` plays this part for a timm model): the expert carries it (``expert.input``), its checkpoint
stores it once (in ``description["input"]``) and it is rebuilt from there; the input policy of step 3 is a view
of it (``spec.policy``), not a second copy. :class:`Preprocess` is stage 1's record (step 2) with that contract:
what a model was trained with travels with its checkpoint, so nothing is retyped on a command line, and a
model trained on face crops is served face-cropped.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, fields

import cv2
import numpy as np

from ..config import FaceCrop, FacePolicy, InputMode
from ..errors import ConfigError, DataError
from .faces import FaceResult, apply_face_crop
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, resize_square

INPUT_MODES = typing.get_args(InputMode)  # resize, resize_short_crop, crop


@dataclass(frozen=True)
class Stage1:
    """How stage 1 turns a decoded image into the stored one (``store.json`` of the prepared folder)."""

    max_side: int = 0  # longer side above this is downscaled (INTER_AREA, aspect kept); 0 = never
    face_crop: FaceCrop = "none"
    face_margin: float = 1.3
    face_policy: FacePolicy = "whole"
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard, checked from the header
    # shorter side below this = refused: stage 1 drops it, the CLI and API refuse it (one rule:
    # images.check_dimensions); a record written before it existed reads as the default, which stage 1 then applied
    min_side: int = DEFAULT_MIN_SIDE


MAX_GRID = 4  # crops: at most a 4 x 4 grid


@dataclass(frozen=True)
class InputPolicy:
    """How a ``size`` x ``size`` input is taken from a stage-1 image: the geometric part of an expert's
    :class:`InputSpec` (``spec.policy``), or alone where no expert is fed (stage 3's embedding).

    ``crops`` > 1 (scoring only: the TTA view ``crops<N>``, :mod:`dfpipe.ensemble_predict.tta`) takes N = k x k
    crops on a grid (:func:`crop_grid`) instead of the central one, ``(N, size, size, 3)``; a crop mode only. An
    expert's input contract never holds it (:attr:`InputSpec.policy` is single-crop).
    """

    mode: InputMode = "resize"
    size: int = 128
    crops: int = 1

    def __post_init__(self) -> None:
        if self.mode not in INPUT_MODES:
            raise ConfigError(f"input mode {self.mode!r}: choose one of {list(INPUT_MODES)}")
        if self.size < 8:
            raise ConfigError(f"input size {self.size}: must be >= 8")
        k = round(self.crops ** 0.5)
        if self.crops != 1 and (k * k != self.crops or not 2 <= k <= MAX_GRID or self.mode == "resize"):
            raise ConfigError(f"input crops {self.crops}: a k x k grid (4, 9 or 16) of a crop mode "
                              f"(crop, resize_short_crop), not of {self.mode!r}")

    @property
    def key(self) -> str:
        """A short name (``resize128``, ``crop256x4``): experts with the same policy share one decoded batch."""
        return f"{self.mode}{self.size}" + (f"x{self.crops}" if self.crops > 1 else "")

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape :func:`fit` gives: (size, size, 3), or (crops, size, size, 3)."""
        return ((self.crops,) if self.crops > 1 else ()) + (self.size, self.size, 3)


def _rgb(values, what: str) -> tuple[float, float, float]:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ConfigError(f"input {what} {list(out)}: needs one value per RGB channel")
    return out


@dataclass(frozen=True)
class InputSpec:
    """An expert's input contract: a ``size`` x ``size`` RGB input taken from the stage-1 image by ``mode``
    (:class:`InputPolicy`), normalised per channel as ``(x / 255 - mean) / std``.

    Built once, from the expert's config (size, mode) and its backbone's pretrained normalisation, and then only
    carried: by the expert (``expert.input``), its checkpoint (``description["input"]``) and whatever feeds it.
    """

    size: int
    mode: InputMode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", int(self.size))  # JSON and numpy ints alike
        object.__setattr__(self, "mean", _rgb(self.mean, "mean"))
        object.__setattr__(self, "std", _rgb(self.std, "std"))
        if min(self.std) <= 0:
            raise ConfigError(f"input std {list(self.std)}: must be > 0")
        InputPolicy(self.mode, self.size)  # checks mode and size

    @property
    def policy(self) -> InputPolicy:
        """How the input is cut from a stage-1 image (what a decoding worker needs: no normalisation)."""
        return InputPolicy(self.mode, self.size)

    @property
    def key(self) -> str:
        return self.policy.key

    def to_dict(self) -> dict:
        return {"size": self.size, "mode": self.mode, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "input record") -> InputSpec:
        return _build(cls, d, where)


@dataclass(frozen=True)
class Preprocess:
    """Everything between the file and the model's input tensor: stage 1's record and the expert's input
    contract (``input.size``, ``input.mean``...). A checkpoint stores ``stage1`` beside the expert's description,
    which holds ``input``."""

    stage1: Stage1
    input: InputSpec


def stage1_from_dict(d: dict, where: str = "stage-1 record") -> Stage1:
    """The :class:`Stage1` of a stored record (a checkpoint's, ``store.json``'s); a DataError naming ``where``."""
    return _build(Stage1, d, where)


def _build(cls, d: dict, where: str):
    """``cls(**d)``, or a DataError naming ``where`` when ``d`` is not a record of ``cls``."""
    if not isinstance(d, dict):
        raise DataError(f"{where}: {cls.__name__} record {d!r} is not a mapping")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in d)
    if unknown or missing:
        raise DataError(f"{where}: {cls.__name__} record with " + ", ".join(
            [*([f"unknown keys {unknown}"] if unknown else []), *([f"missing keys {missing}"] if missing else [])]))
    try:
        return cls(**d)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: bad {cls.__name__} record {d!r}: {exc}") from None


# ----------------------------------------------------------------------------- step 2: stage 1
def downscale(img: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink (area filter, aspect kept) so the longer side is ``max_side``; never enlarges; 0 = as is."""
    h, w = img.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return img
    s = max_side / max(h, w)
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def stage1_image(img: np.ndarray, s1: Stage1) -> tuple[np.ndarray | None, FaceResult]:
    """The stage-1 image of a decoded one: (image, or None when ``face_policy: skip`` finds no face; the
    face step's result). Stage 1 stores exactly this; every scoring path computes it the same way."""
    return apply_face_crop(downscale(img, s1.max_side), s1.face_crop, s1.face_margin, s1.face_policy)


def scoring_image(img: np.ndarray, s1: Stage1) -> np.ndarray:
    """The stage-1 image of a decoded image, for scoring: an image without a face under
    ``face_policy: skip`` is scored whole (a user's upload always gets a score)."""
    out, _ = stage1_image(img, s1)
    return downscale(img, s1.max_side) if out is None else out


# ----------------------------------------------------------------------------- step 3: input policy
def _enlarge_short(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if min(h, w) >= size:
        return img
    s = size / min(h, w)
    return cv2.resize(img, (max(size, round(w * s)), max(size, round(h * s))), interpolation=cv2.INTER_CUBIC)


def _resize_short(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if min(h, w) == size:
        return img
    s = size / min(h, w)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    return cv2.resize(img, (max(size, round(w * s)), max(size, round(h * s))), interpolation=interp)


def crop_origin(shape: tuple[int, int], size: int, rng: np.random.Generator | None) -> tuple[int, int]:
    """(y0, x0) of a ``size`` square inside ``shape``: uniform with ``rng``, central without."""
    h, w = shape
    if rng is None:
        return (h - size) // 2, (w - size) // 2
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def crop_grid(shape: tuple[int, int], size: int, crops: int) -> list[tuple[int, int]]:
    """(y0, x0) of ``crops`` = k x k ``size`` squares spread evenly over ``shape``, row by row: the first at the
    top-left corner, the last at the bottom-right one (with k = 3 the middle one is the central crop)."""
    h, w = shape
    k = round(crops ** 0.5)
    ys = [(h - size) * i // (k - 1) for i in range(k)]
    xs = [(w - size) * j // (k - 1) for j in range(k)]
    return [(y, x) for y in ys for x in xs]


def fit(img: np.ndarray, policy: InputPolicy, rng: np.random.Generator | None = None) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 per ``policy`` (``policy.shape``: (crops, size, size, 3) for a
    grid of crops); ``rng`` given = training (random crop)."""
    size = policy.size
    if policy.mode == "resize":
        out = resize_square(img, size)
    else:
        img = _resize_short(img, size) if policy.mode == "resize_short_crop" else _enlarge_short(img, size)
        if policy.crops > 1:
            if rng is not None:
                raise ValueError("a grid of crops is a test-time input: training crops one at random")
            return np.stack([img[y:y + size, x:x + size] for y, x in crop_grid(img.shape[:2], size, policy.crops)])
        y0, x0 = crop_origin(img.shape[:2], size, rng)
        out = img[y0:y0 + size, x0:x0 + size]
    return np.require(out, requirements=["C", "W"])  # a writable contiguous array (a copy when needed)
