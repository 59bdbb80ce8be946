"""Deterministic demo dataset in the competition layout (``python -m dfpipe.demo data/raw``).

Layout written under ``root``::

    trainset/<md5>.jpg   trainset_label.txt           img_name,target (1 = fake)
    valset/<md5>.jpg     valset_label.txt
    testset/<md5>.jpg    (no testset_label.txt, as in the challenge)
    testset_label_private.txt                         the test labels "released after the challenge":
                                                      the pipeline never trains on them, it only uses
                                                      them to report test metrics
    demo_manifest.csv                                 how every image was made (split, kind, source, ...)

Real images are random crops / scales / flips / slight colour changes of the photographs bundled
with scikit-image and matplotlib (only those that load offline) and of procedurally rendered
scenes. Fakes are the same kind of images with ONE local manipulation (an irregular elliptical
region covering 15-40 % of the image, soft edge); the manipulation kinds differ per split so that
generalisation to an unseen kind can be measured:

* train: ``blend`` (region blended with a blurred / colour-shifted copy of itself), ``splice``
  (region pasted from another image with a colour mismatch);
* val: train kinds + ``warp`` (smooth local displacement field, ``cv2.remap``);
* test: val kinds + ``upsample`` (region down-sampled x3-x4 and nearest-neighbour up-sampled:
  blocky, generator-like artefacts); train never contains it.

Sizes, JPEG quality, sources, crops, colour jitter and sensor noise (added before the
manipulation, as a camera would) are drawn the same way for
real and fake images, so only the local manipulation tells the classes apart. File names are the
md5 of the JPEG bytes (they do not leak the label); label rows are sorted by name.

Determinism: every image has its own generator seeded from ``(seed, split, index)``; with the same
seed and the same library versions (numpy, OpenCV, the bundled sample images) every file is
byte-identical. The manipulations here are independent of :mod:`dfpipe.augment_sd` on purpose.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from dfpipe.io import setup_logging, write_csv

log = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "trainset", "val": "valset", "test": "testset"}
LABEL_FILES = {"train": "trainset_label.txt", "val": "valset_label.txt", "test": "testset_label_private.txt"}
MANIFEST = "demo_manifest.csv"
FAKE_KINDS = {
    "train": ("blend", "splice"),
    "val": ("blend", "splice", "warp"),
    "test": ("blend", "splice", "warp", "upsample"),
}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
JPEG_QUALITY = (85, 95)  # inclusive range, drawn per image independently of the label
REGION_FRAC = (0.15, 0.40)  # manipulated area / image area
N_PROCEDURAL = 16
PHOTO_PROB = 0.6
# A fake's mean absolute change inside its region (0-255 scale) must reach MIN_EFFECT, else its
# parameters are re-drawn (at most MAX_REDRAWS draws; the strongest is kept): no invisible "fakes".
MIN_EFFECT = 5.0
MAX_REDRAWS = 6  # chance an image is cut from a photograph rather than a rendered scene

# Natural photographs shipped inside installed packages; each is tried and skipped if it cannot be
# loaded offline (skimage fetches some files with pooch: those are never requested here).
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")
_MPL_PHOTOS = ("grace_hopper.jpg",)


# --------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class Source:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB


def _to_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


def load_photos() -> list[Source]:
    """The bundled photographs that load without a network; sorted by name for determinism."""
    photos: list[Source] = []
    try:
        import skimage.data as skdata
    except Exception as exc:  # pragma: no cover - scikit-image is a dependency
        log.warning("scikit-image sample data unavailable: %s", exc)
        skdata = None
    if skdata is not None:
        for name in _SKIMAGE_PHOTOS:
            try:
                photos.append(Source(f"skimage:{name}", _to_rgb(getattr(skdata, name)())))
            except Exception as exc:  # missing file, pooch not installed, no network, ...
                log.info("skipping skimage.data.%s (%s: %s)", name, type(exc).__name__, exc)
    try:
        from matplotlib import cbook

        for name in _MPL_PHOTOS:
            try:
                path = cbook.get_sample_data(name, asfileobj=False)
                bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if bgr is None:
                    raise OSError(f"cannot decode {path}")
                photos.append(Source(f"matplotlib:{Path(name).stem}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
            except Exception as exc:
                log.info("skipping matplotlib sample %s (%s: %s)", name, type(exc).__name__, exc)
    except Exception as exc:  # pragma: no cover - matplotlib is a dependency
        log.warning("matplotlib sample data unavailable: %s", exc)
    # drop exact duplicates (e.g. skimage's cat is chelsea) so no photo is over-weighted
    seen: set[str] = set()
    unique = []
    for src in sorted(photos, key=lambda s: s.name):
        digest = hashlib.md5(src.image.tobytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            unique.append(src)
    return unique


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
    """Zero-mean, roughly unit-std smooth noise: a random ``cells`` x ``cells`` grid, cubic-upsampled."""
    grid = rng.standard_normal((cells + 3, cells + 3, channels)).astype(np.float32)
    up = cv2.resize(grid, (w + 2 * (w // cells), h + 2 * (h // cells)), interpolation=cv2.INTER_CUBIC)
    up = up.reshape(up.shape[0], up.shape[1], channels)
    return up[h // cells : h // cells + h, w // cells : w // cells + w]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A muted, natural-looking RGB colour (float32, 0-255)."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(25, 160), rng.uniform(60, 230)]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _texture(rng: np.random.Generator, textures: Sequence[np.ndarray], h: int, w: int) -> np.ndarray:
    """(H, W, 1) multiplicative texture around 1: a random crop of a bundled texture, else noise."""
    if textures:
        tex = textures[int(rng.integers(len(textures)))]
        th, tw = tex.shape
        side = int(rng.uniform(0.4, 1.0) * min(th, tw))
        y0, x0 = int(rng.integers(0, th - side + 1)), int(rng.integers(0, tw - side + 1))
        crop = cv2.resize(tex[y0 : y0 + side, x0 : x0 + side], (w, h), interpolation=cv2.INTER_LINEAR)
        crop = crop.astype(np.float32)
        t = (crop - crop.mean()) / (crop.std() + 1e-6)
    else:
        t = _smooth_noise(rng, h, w, 48)[..., 0]
    return (1 + rng.uniform(0.08, 0.25) * t)[..., None]


def render_scene(rng: np.random.Generator, textures: Sequence[np.ndarray] = (), size: int = 448) -> np.ndarray:
    """A procedurally rendered "photo": sky/ground gradients, shaded textured shapes with shadows."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= h
    xx /= w
    sky_top, sky_bottom, ground_top, ground_bottom = (_random_colour(rng) for _ in range(4))
    horizon = rng.uniform(0.3, 0.7) + 0.06 * _smooth_noise(rng, 1, w, 3)[0, :, 0] + rng.uniform(-0.15, 0.15) * (
        xx[0] - 0.5
    )
    t_sky = np.clip(yy / np.maximum(horizon, 1e-3), 0, 1)[..., None]
    t_ground = np.clip((yy - horizon) / np.maximum(1 - horizon, 1e-3), 0, 1)[..., None]
    sky = sky_top * (1 - t_sky) + sky_bottom * t_sky
    ground = (ground_top * (1 - t_ground) + ground_bottom * t_ground) * _texture(rng, textures, h, w)
    img = np.where((yy < horizon)[..., None], sky, ground).astype(np.float32)
    img += 12 * _smooth_noise(rng, h, w, 4, 3)  # large-scale colour variation

    for _ in range(int(rng.integers(5, 12))):
        layer = np.zeros((h, w), np.uint8)
        cx, cy = rng.uniform(0, w), rng.uniform(0.2 * h, h)
        r = rng.uniform(0.05, 0.22) * size
        shape = rng.integers(0, 3)
        if shape == 0:
            axes = (int(r), int(r * rng.uniform(0.4, 1.6)))
            cv2.ellipse(layer, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
        elif shape == 1:
            angle = rng.uniform(-20, 20)
            box = cv2.boxPoints(((cx, cy), (2 * r, 2 * r * rng.uniform(0.3, 2.0)), angle))
            cv2.fillPoly(layer, [np.round(box).astype(np.int32)], 255, cv2.LINE_AA)
        else:
            n = int(rng.integers(3, 8))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = r * rng.uniform(0.5, 1.3, n)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
            cv2.fillPoly(layer, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA)
        alpha = (layer.astype(np.float32) / 255)[..., None]
        # soft cast shadow, offset down-right
        shadow = cv2.GaussianBlur(np.roll(alpha[..., 0], (int(0.1 * r), int(0.15 * r)), axis=(0, 1)), (0, 0), 0.1 * r)
        img *= 1 - rng.uniform(0.2, 0.45) * shadow[..., None]
        # shading: light from the top-left, so the object reads as 3-D
        shade = 1.15 - 0.5 * np.clip(((xx - cx / w) + (yy - cy / h)) * size / (2 * r) + 0.5, 0, 1)
        colour = _random_colour(rng) * shade[..., None]
        if rng.random() < 0.6:
            colour *= _texture(rng, textures, h, w)
        img = img * (1 - alpha) + colour * alpha

    img += rng.uniform(2, 5) * rng.standard_normal((h, w, 1)).astype(np.float32)  # fine grain
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 0.9))  # optics
    return np.clip(img, 0, 255).astype(np.uint8)


def load_textures() -> list[np.ndarray]:
    """Grey texture photographs bundled with scikit-image (grass, gravel, brick) that load offline."""
    textures = []
    try:
        import skimage.data as skdata

        for name in ("brick", "grass", "gravel"):
            try:
                textures.append(np.asarray(getattr(skdata, name)(), dtype=np.uint8))
            except Exception as exc:
                log.info("skipping texture skimage.data.%s (%s: %s)", name, type(exc).__name__, exc)
    except Exception as exc:  # pragma: no cover
        log.warning("scikit-image textures unavailable: %s", exc)
    return textures


def build_sources(seed: int) -> tuple[list[Source], list[Source]]:
    photos = load_photos()
    textures = load_textures()
    rng = np.random.default_rng([seed, 99])
    scenes = [Source(f"procedural:{i:02d}", render_scene(rng, textures)) for i in range(N_PROCEDURAL)]
    return photos, scenes


# --------------------------------------------------------------------------------------------
# real-style images


def sample_real(
    rng: np.random.Generator,
    photos: Sequence[Source],
    scenes: Sequence[Source],
    w: int,
    h: int,
    source: str | None = None,
) -> tuple[np.ndarray, str]:
    """A random crop of a source (random, or the one named) resized to (h, w), flipped, colour-jittered."""
    if source is None:
        pool = photos if (photos and rng.random() < PHOTO_PROB) else scenes
        src = pool[int(rng.integers(len(pool)))]
    else:
        src = next(s for s in (*photos, *scenes) if s.name == source)
    sh, sw = src.image.shape[:2]
    aspect = w / h
    # crop height: at least 1/1.5 of the output (limits up-scaling blur), at most the source
    ch_max = min(sh, sw / aspect)
    ch_min = min(ch_max, max(h / 1.5, 0.35 * ch_max))
    ch = rng.uniform(ch_min, ch_max)
    cw = min(ch * aspect, sw)
    x0 = rng.uniform(0, sw - cw)
    y0 = rng.uniform(0, sh - ch)
    crop = src.image[int(y0) : int(y0 + ch), int(x0) : int(x0 + cw)]
    interp = cv2.INTER_AREA if crop.shape[0] > h else cv2.INTER_CUBIC
    img = cv2.resize(crop, (w, h), interpolation=interp).astype(np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    # slight colour / brightness / contrast / saturation changes
    gain = rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, 3)
    mean = img.mean(axis=(0, 1), keepdims=True)
    contrast = rng.uniform(0.9, 1.1)
    img = (img - mean) * contrast + mean
    img = img * gain + rng.uniform(-10, 10)
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * rng.uniform(0.85, 1.15)
    # sensor noise of the "camera" (a manipulation made later disturbs it locally)
    img += rng.uniform(0.5, 3.0) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.ascontiguousarray(np.clip(img, 0, 255), dtype=np.float32), src.name


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
    dist = np.sqrt(u * u + v * v) + 0.18 * _smooth_noise(rng, h, w, 5)[..., 0]  # irregular outline
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
    field = _smooth_noise(rng, h, w, int(rng.integers(2, 4)), 2)
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


# --------------------------------------------------------------------------------------------
# dataset


def _encode_jpeg(img_rgb: np.ndarray, quality: int) -> bytes:
    bgr = cv2.cvtColor(np.clip(np.rint(img_rgb), 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(
        ".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_OPTIMIZE, 0]
    )
    if not ok:  # pragma: no cover
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _plan_split(rng: np.random.Generator, split: str, n: int, fake_kinds: dict | None = None) -> list[str]:
    """Per-image kinds: half fake (rounded down), fakes spread evenly over the split's kinds."""
    n_fake = n // 2
    kinds = (fake_kinds or FAKE_KINDS)[split]
    fake = [kinds[i % len(kinds)] for i in range(n_fake)]
    plan = ["real"] * (n - n_fake) + fake
    return [plan[i] for i in rng.permutation(n)]


def make_image(
    seed: int,
    split: str,
    index: int,
    kind: str,
    photos: Sequence[Source],
    scenes: Sequence[Source],
    size_range: tuple[int, int],
    attempt: int = 0,
) -> tuple[bytes, dict]:
    """Render one image; the draws for size, quality, source, crop and noise do not depend on ``kind``."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, attempt])
    lo, hi = size_range
    w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    img, source = sample_real(rng, photos, scenes, w, h)
    region = 0.0
    if kind != "real":
        fake_rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, attempt, 1])
        ctx = {
            "source": source,
            "sample_real": lambda r, ww, hh, src=None: sample_real(r, photos, scenes, ww, hh, src),
        }
        best = None
        for _ in range(MAX_REDRAWS):  # re-draw the parameters of a manipulation too faint to see
            out, mask, extra = MANIPULATIONS[kind](fake_rng, img, ctx)
            inside = mask > 0.5
            effect = float(np.abs(out - img).mean(axis=2)[inside].mean()) if inside.any() else 0.0
            if best is None or effect > best[0]:
                best = (effect, out, mask, extra)
            if effect >= MIN_EFFECT:
                break
        _, img, mask, extra = best
        region = float((mask > 0.5).mean())
        if extra:
            source = f"{source}+{extra}"
    data = _encode_jpeg(img, quality)
    meta = {
        "split": split,
        "target": int(kind != "real"),
        "kind": kind,
        "source": source,
        "width": w,
        "height": h,
        "jpeg_quality": quality,
        "region_frac": round(region, 4),
    }
    return data, meta


def _check_overwritable(root: Path) -> None:
    """Refuse to replace split folders / label files that were not written by this module."""
    if (root / MANIFEST).is_file():
        return
    existing = [root / d for d in SPLIT_DIRS.values() if (root / d).exists() and any((root / d).iterdir())]
    existing += [root / f for f in [*LABEL_FILES.values(), "testset_label.txt"] if (root / f).exists()]
    if existing:
        raise FileExistsError(
            f"{root} already holds data not made by dfpipe.demo ({', '.join(p.name for p in existing)}; "
            f"no {MANIFEST}); refusing to overwrite it - pick an empty folder"
        )


def make_demo_dataset(
    root: str | Path,
    seed: int = 0,
    n_train: int = 240,
    n_val: int = 80,
    n_test: int = 80,
    size_range: tuple[int, int] = (128, 256),
    fake_kinds: dict[str, Sequence[str]] | None = None,
) -> dict:
    """Write the demo dataset under ``root`` (always regenerates) and return a summary dict.

    ``fake_kinds``: split -> manipulation kinds (of :data:`MANIPULATIONS`) instead of :data:`FAKE_KINDS`
    (tests use one easy kind everywhere to check that the pipeline learns end to end)."""
    unknown = {k for kinds in (fake_kinds or {}).values() for k in kinds} - set(MANIPULATIONS)
    if unknown or (fake_kinds is not None and set(fake_kinds) != set(SPLIT_DIRS)):
        raise ValueError(f"fake_kinds: one list of {sorted(MANIPULATIONS)} per split {sorted(SPLIT_DIRS)}, "
                         f"got {fake_kinds}")
    root = Path(root)
    lo, hi = (int(v) for v in size_range)
    if not 16 <= lo <= hi:
        raise ValueError(f"size_range must satisfy 16 <= min <= max, got {size_range}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    for split, n in counts.items():
        if n < 2:
            raise ValueError(f"n_{split} must be >= 2 (one real and one fake), got {n}")
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    _check_overwritable(root)
    photos, scenes = build_sources(seed)
    log.info(
        "sources: %d photos (%s) + %d procedural scenes",
        len(photos),
        ", ".join(s.name for s in photos),
        len(scenes),
    )

    plan_rng = np.random.default_rng([seed, 7])
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    try:
        with tqdm(total=sum(counts.values()), desc="demo images", unit="img", disable=None) as bar:
            for split, n in counts.items():
                out_dir = tmp / SPLIT_DIRS[split]
                out_dir.mkdir()
                names: set[str] = set()
                for index, kind in enumerate(_plan_split(plan_rng, split, n, fake_kinds)):
                    attempt = 0
                    while True:  # identical bytes are astronomically unlikely; re-draw if it happens
                        data, meta = make_image(seed, split, index, kind, photos, scenes, (lo, hi), attempt)
                        name = hashlib.md5(data).hexdigest() + ".jpg"
                        if name not in names:
                            break
                        attempt += 1
                    names.add(name)
                    (out_dir / name).write_bytes(data)
                    rows.append({"img_name": name, **meta})
                    bar.update()
        manifest = pd.DataFrame(rows)
        # swap the new split folders in (old demo output, if any, is replaced)
        for split, d in SPLIT_DIRS.items():
            dest = root / d
            if dest.exists():
                shutil.rmtree(dest)
            (tmp / d).rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for split, fname in LABEL_FILES.items():
        part = manifest[manifest["split"] == split].sort_values("img_name")
        write_csv(root / fname, part[["img_name", "target"]])
    (root / "testset_label.txt").unlink(missing_ok=True)  # the public layout has no test labels
    write_csv(
        root / MANIFEST,
        manifest.sort_values(["split", "img_name"], key=lambda s: s.map(_SPLIT_IDS) if s.name == "split" else s),
    )

    summary = {
        "root": str(root),
        "seed": int(seed),
        "size_range": [lo, hi],
        "sources": [s.name for s in photos] + [f"procedural x{len(scenes)}"],
        "splits": {
            split: {
                "n": int((manifest["split"] == split).sum()),
                "n_fake": int(manifest.loc[manifest["split"] == split, "target"].sum()),
                "kinds": {
                    k: int(v)
                    for k, v in manifest.loc[manifest["split"] == split, "kind"].value_counts().sort_index().items()
                },
            }
            for split in SPLIT_DIRS
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info(
        "wrote %d images to %s in %.1fs (%s)",
        len(manifest),
        root,
        summary["seconds"],
        "; ".join(f"{s}: {v['n']} ({v['n_fake']} fake)" for s, v in summary["splits"].items()),
    )
    return summary


def auc_by_kind(root: str | Path, prediction_csv: str | Path, split: str = "test") -> dict[str, float]:
    """ROC AUC of a submission on the demo's ``split``: all fakes, then real vs each fake kind.

    Uses ``demo_manifest.csv`` (the kind of every image) so one can see how a model does on the kind
    it never trained on (``upsample`` in test). Names missing from the submission are an error.
    """
    from .metrics import roc_auc

    man = pd.read_csv(Path(root) / "demo_manifest.csv", dtype={"img_name": str})
    man = man[man.split == split]
    sub = pd.read_csv(prediction_csv, dtype={"img_name": str}).set_index("img_name").y_pred
    missing = sorted(set(man.img_name) - set(sub.index))
    if missing:
        raise ValueError(f"{prediction_csv}: {len(missing)} {split} images have no score, e.g. {missing[:3]}")
    man = man.assign(score=sub.loc[man.img_name].to_numpy())
    real = man[man.target == 0]
    out = {"all": roc_auc(man.target, man.score)}
    for kind, fakes in man[man.target == 1].groupby("kind"):
        both = pd.concat([real, fakes])
        out[str(kind)] = roc_auc(both.target, both.score)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dfpipe.demo",
        description="Write a small deterministic deepfake-detection demo dataset in the competition layout.",
    )
    p.add_argument("root", type=Path, help="output folder, e.g. data/raw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=240)
    p.add_argument("--n-val", type=int, default=80)
    p.add_argument("--n-test", type=int, default=80)
    p.add_argument("--size-min", type=int, default=128)
    p.add_argument("--size-max", type=int, default=256)
    args = p.parse_args(argv)
    setup_logging()
    try:
        summary = make_demo_dataset(
            args.root,
            seed=args.seed,
            n_train=args.n_train,
            n_val=args.n_val,
            n_test=args.n_test,
            size_range=(args.size_min, args.size_max),
        )
    except (ValueError, FileExistsError) as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
