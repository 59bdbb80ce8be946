"""The demo's real images: photographs bundled in installed packages, rendered scenes, random crops of them."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

REGION_FRAC = (0.15, 0.40)  # manipulated area / image area
N_PROCEDURAL = 16
PHOTO_PROB = 0.6  # chance an image is cut from a photograph rather than a rendered scene

# Natural photographs shipped inside installed packages; each is tried and skipped if it cannot be
# loaded offline (skimage fetches some files with pooch: those are never requested here).
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")
_MPL_PHOTOS = ("grace_hopper.jpg",)


# --------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class BaseImage:
    """A named real image (a bundled photo or a procedural scene) that the demo's reals and fakes are drawn from."""

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


def load_photos() -> list[BaseImage]:
    """The bundled photographs that load without a network; sorted by name for determinism."""
    photos: list[BaseImage] = []
    try:
        import skimage.data as skdata
    except Exception as exc:  # pragma: no cover - scikit-image is a dependency
        log.warning("scikit-image sample data unavailable: %s", exc)
        skdata = None
    if skdata is not None:
        for name in _SKIMAGE_PHOTOS:
            try:
                photos.append(BaseImage(f"skimage:{name}", _to_rgb(getattr(skdata, name)())))
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
                photos.append(BaseImage(f"matplotlib:{Path(name).stem}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
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


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
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
        t = smooth_noise(rng, h, w, 48)[..., 0]
    return (1 + rng.uniform(0.08, 0.25) * t)[..., None]


def render_scene(rng: np.random.Generator, textures: Sequence[np.ndarray] = (), size: int = 448) -> np.ndarray:
    """A procedurally rendered "photo": sky/ground gradients, shaded textured shapes with shadows."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= h
    xx /= w
    sky_top, sky_bottom, ground_top, ground_bottom = (_random_colour(rng) for _ in range(4))
    horizon = rng.uniform(0.3, 0.7) + 0.06 * smooth_noise(rng, 1, w, 3)[0, :, 0] + rng.uniform(-0.15, 0.15) * (
        xx[0] - 0.5
    )
    t_sky = np.clip(yy / np.maximum(horizon, 1e-3), 0, 1)[..., None]
    t_ground = np.clip((yy - horizon) / np.maximum(1 - horizon, 1e-3), 0, 1)[..., None]
    sky = sky_top * (1 - t_sky) + sky_bottom * t_sky
    ground = (ground_top * (1 - t_ground) + ground_bottom * t_ground) * _texture(rng, textures, h, w)
    img = np.where((yy < horizon)[..., None], sky, ground).astype(np.float32)
    img += 12 * smooth_noise(rng, h, w, 4, 3)  # large-scale colour variation

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


def build_sources(seed: int) -> tuple[list[BaseImage], list[BaseImage]]:
    photos = load_photos()
    textures = load_textures()
    rng = np.random.default_rng([seed, 99])
    scenes = [BaseImage(f"procedural:{i:02d}", render_scene(rng, textures)) for i in range(N_PROCEDURAL)]
    return photos, scenes


# --------------------------------------------------------------------------------------------
# real-style images


def sample_real(
    rng: np.random.Generator,
    photos: Sequence[BaseImage],
    scenes: Sequence[BaseImage],
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
