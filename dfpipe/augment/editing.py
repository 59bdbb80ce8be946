"""Image-editing forgeries: each makes a fake from a real image plus a mask of what it changed.

Every method has the signature ``fn(img, rng, donor) -> (fake, mask, params)``:

* ``img``    (H, W, 3) uint8 RGB, the real image (never modified in place);
* ``rng``    ``np.random.Generator``: the *only* source of randomness, so one seed gives the same
             bytes every time (the stage records one seed per generated image);
* ``donor``  another real image (same size or resized here) for methods that need one, else None;
* ``fake``   (H, W, 3) uint8; every pixel where ``mask == 0`` is exactly the input pixel;
* ``mask``   (H, W) float32 in [0, 1], quantised to multiples of 1/255 so that the 8-bit PNG the
             stage saves is the exact same mask;
* ``params`` JSON-serialisable dict of what was sampled (for reports, not needed to regenerate).

Methods are registered by name in :data:`METHODS`. The self-blend idea follows Shiohara & Yamasaki,
"Detecting Deepfakes with Self-Blended Images" (CVPR 2022): blending an image with a slightly altered
copy of itself leaves the blending-boundary and statistics traces that real face swaps leave, without
needing a second identity.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from ..errors import ConfigError

EditFn = Callable[[np.ndarray, np.random.Generator, "np.ndarray | None"], tuple[np.ndarray, np.ndarray, dict]]

# Mask values below this change no 8-bit pixel; zeroing them keeps the mask tight to the change.
_MASK_EPS = 1.0 / 255.0


# --------------------------------------------------------------------------- small helpers
def _f(x: float) -> float:
    """A rounded Python float for the params dict (short, stable JSON)."""
    return round(float(x), 4)


def _quantise_mask(mask: np.ndarray) -> np.ndarray:
    """Round to 8-bit levels so the saved PNG equals the mask used for blending."""
    return (np.round(np.clip(mask, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _blend(img: np.ndarray, src: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mask * src + (1 - mask) * img``; pixels with mask == 0 are copied, not recomputed."""
    m = mask[..., None]
    out = np.clip(np.round(src.astype(np.float32) * m + img.astype(np.float32) * (1.0 - m)), 0, 255)
    return np.where(m > 0, out.astype(np.uint8), img)


def _finish(img: np.ndarray, fake: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Enforce the contract: untouched outside the mask, uint8, contiguous."""
    fake = np.where(mask[..., None] > 0, fake, img)
    return np.ascontiguousarray(fake, dtype=np.uint8), np.ascontiguousarray(mask, dtype=np.float32)


def _check_image(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}")


def _odd(k: float) -> int:
    k = max(1, int(round(k)))
    return k if k % 2 else k + 1


# --------------------------------------------------------------------------- masks
def _elastic(mask: np.ndarray, rng: np.random.Generator, amplitude: float, smooth: float) -> np.ndarray:
    """Deform ``mask`` by a smooth random displacement field (amplitude in pixels)."""
    h, w = mask.shape
    field = rng.uniform(-1.0, 1.0, size=(2, h, w)).astype(np.float32)
    k = _odd(6 * smooth)
    dx = cv2.GaussianBlur(field[0], (k, k), smooth)
    dy = cv2.GaussianBlur(field[1], (k, k), smooth)
    # Normalise the blurred noise (its scale shrinks with the blur) so amplitude means pixels.
    dx *= amplitude / (np.abs(dx).max() + 1e-6)
    dy *= amplitude / (np.abs(dy).max() + 1e-6)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return cv2.remap(mask, xx + dx, yy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def region_mask(
    h: int,
    w: int,
    rng: np.random.Generator,
    *,
    face: bool = False,
    scale: tuple[float, float] = (0.15, 0.35),
    soft: bool = True,
) -> tuple[np.ndarray, dict]:
    """A random blob (ellipse or convex hull), elastic-deformed and (if ``soft``) Gaussian-blurred.

    ``face=True`` gives a face-shaped vertical ellipse near the centre: cached images are face crops
    and no face box is known, so the centre is the best guess for where a swap would land.
    Returns the float32 mask (max 1) and what was sampled.
    """
    side = float(min(h, w))
    if face:
        cx = w * (0.5 + rng.uniform(-0.04, 0.04))
        cy = h * (0.52 + rng.uniform(-0.04, 0.04))
        ax, ay = w * rng.uniform(0.26, 0.38), h * rng.uniform(0.34, 0.46)
        shape = "face_ellipse"
    else:
        r = side * rng.uniform(*scale)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        aspect = rng.uniform(0.7, 1.4)
        ax, ay = r * aspect, r / aspect
        shape = "ellipse" if rng.random() < 0.6 else "hull"
    angle = rng.uniform(-15, 15) if face else rng.uniform(0, 180)
    canvas = np.zeros((h, w), np.float32)
    if shape == "hull":
        # Random points in the ellipse's box; their hull is an irregular convex polygon.
        pts = np.stack([cx + ax * rng.uniform(-1, 1, 12), cy + ay * rng.uniform(-1, 1, 12)], axis=1)
        hull = cv2.convexHull(np.round(pts).astype(np.int32))
        cv2.fillConvexPoly(canvas, hull, 1.0, lineType=cv2.LINE_AA)
    else:
        cv2.ellipse(canvas, (int(round(cx)), int(round(cy))), (max(1, int(round(ax))), max(1, int(round(ay)))),
                    angle, 0, 360, 1.0, -1, lineType=cv2.LINE_AA)
    amp = side * rng.uniform(0.02, 0.06)
    canvas = _elastic(canvas, rng, amplitude=amp, smooth=side * rng.uniform(0.05, 0.12))
    params = {"shape": shape, "cx": _f(cx / w), "cy": _f(cy / h), "ax": _f(ax / w), "ay": _f(ay / h),
              "angle": _f(angle), "elastic_px": _f(amp)}
    if soft:
        sigma = side * rng.uniform(0.02, 0.06)
        k = _odd(6 * sigma)
        canvas = cv2.GaussianBlur(canvas, (k, k), sigma)
        canvas /= max(float(canvas.max()), 1e-6)
        params["blur_sigma_px"] = _f(sigma)
    canvas[canvas < _MASK_EPS] = 0.0
    return _quantise_mask(canvas), params


def _binary(mask: np.ndarray) -> np.ndarray:
    return (mask >= 0.5).astype(np.float32)


# --------------------------------------------------------------------------- photometric helpers
def color_jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> tuple[np.ndarray, dict]:
    """Brightness/contrast, per-channel shift and saturation change (float32 result, 0-255)."""
    x = img.astype(np.float32)
    sign = rng.choice([-1.0, 1.0])
    brightness = sign * rng.uniform(0.03, 0.12) * strength  # never 0: the copy must differ
    contrast = rng.uniform(-0.12, 0.12) * strength
    shift = rng.uniform(-12, 12, size=3).astype(np.float32) * strength
    sat = rng.uniform(-0.2, 0.2) * strength
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = (x - mean) * (1.0 + contrast) + mean + 255.0 * brightness + shift
    gray = x.mean(axis=2, keepdims=True)
    x = gray + (x - gray) * (1.0 + sat)
    params = {"brightness": _f(brightness), "contrast": _f(contrast), "shift": [_f(s) for s in shift],
              "saturation": _f(sat)}
    return np.clip(x, 0, 255), params


def blur_or_sharpen(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Gaussian blur or unsharp-mask sharpening of a float image (frequency mismatch at the seam)."""
    sigma = rng.uniform(0.5, 1.5)
    k = _odd(6 * sigma)
    soft = cv2.GaussianBlur(x, (k, k), sigma)
    if rng.random() < 0.5:
        return soft, {"filter": "blur", "sigma": _f(sigma)}
    amount = rng.uniform(0.5, 1.5)
    return np.clip(x + amount * (x - soft), 0, 255), {"filter": "sharpen", "sigma": _f(sigma), "amount": _f(amount)}


def _affine(x: np.ndarray, rng: np.random.Generator, max_shift: float, scale: tuple[float, float],
            max_rot: float = 0.0, center: tuple[float, float] | None = None,
            shift: tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """Slight scale/rotation about ``center`` plus a translation; borders reflect."""
    h, w = x.shape[:2]
    s = rng.uniform(*scale)
    rot = rng.uniform(-max_rot, max_rot) if max_rot else 0.0
    if shift is None:
        shift = (rng.uniform(-max_shift, max_shift) * w, rng.uniform(-max_shift, max_shift) * h)
    c = center if center is not None else (w / 2.0, h / 2.0)
    m = cv2.getRotationMatrix2D((float(c[0]), float(c[1])), rot, s)
    m[:, 2] += np.asarray(shift, dtype=np.float64)
    out = cv2.warpAffine(x, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return out, {"scale": _f(s), "rotation": _f(rot), "dx": _f(shift[0]), "dy": _f(shift[1])}


def lab_transfer(src: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Match the LAB mean/std of ``src`` to ``ref`` inside ``mask`` (Reinhard colour transfer)."""
    sel = mask > 0
    src_lab = cv2.cvtColor(src, cv2.COLOR_RGB2LAB).astype(np.float32)
    ref_lab = cv2.cvtColor(ref, cv2.COLOR_RGB2LAB).astype(np.float32)
    s_mu, s_sd = src_lab[sel].mean(axis=0), src_lab[sel].std(axis=0) + 1e-3
    r_mu, r_sd = ref_lab[sel].mean(axis=0), ref_lab[sel].std(axis=0) + 1e-3
    out = (src_lab - s_mu) * (r_sd / s_sd) + r_mu
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def _fit(donor: np.ndarray | None, shape: tuple[int, ...], method: str) -> np.ndarray:
    if donor is None:
        raise ValueError(f"{method} needs a donor image (another real image), got None")
    _check_image(donor)
    if donor.shape != shape:
        donor = cv2.resize(donor, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return donor


# --------------------------------------------------------------------------- methods
def self_blend(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """SBI: blend a colour-jittered, filtered, slightly shifted copy of the image into itself."""
    _check_image(img)
    h, w = img.shape[:2]
    src, p_col = color_jitter(img, rng)
    src, p_flt = blur_or_sharpen(src, rng)
    src, p_aff = _affine(src, rng, max_shift=0.03, scale=(0.95, 1.05))
    mask, p_mask = region_mask(h, w, rng, face=True)
    # SBI samples the blend ratio with a bias towards full replacement.
    ratio = float(rng.choice([0.25, 0.5, 0.75, 1.0, 1.0, 1.0]))
    mask = _quantise_mask(mask * ratio)
    fake, mask = _finish(img, _blend(img, src, mask), mask)
    return fake, mask, {"color": p_col, "filter": p_flt, "affine": p_aff, "mask": p_mask, "blend_ratio": ratio}


def splice(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None
           ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Paste a region of another real image, colour-matched in LAB, by alpha or Poisson blending."""
    _check_image(img)
    h, w = img.shape[:2]
    donor = _fit(donor, img.shape, "splice")
    mask, p_mask = region_mask(h, w, rng, face=rng.random() < 0.5)
    src, p_aff = _affine(donor, rng, max_shift=0.04, scale=(0.9, 1.1), max_rot=8.0)
    src = lab_transfer(src, img, mask)
    if rng.random() < 0.5:
        blend = "alpha"
        fake = _blend(img, src, mask)
    else:
        blend = "seamless"
        binary = (mask >= 0.5).astype(np.uint8) * 255
        # seamlessClone needs the region off the image border.
        binary[:2, :] = binary[-2:, :] = 0
        binary[:, :2] = binary[:, -2:] = 0
        x, y, bw, bh = cv2.boundingRect(binary)
        if bw < 3 or bh < 3:  # nothing left to clone: fall back to alpha blending
            blend, fake = "alpha", _blend(img, src, mask)
        else:
            center = (x + bw // 2, y + bh // 2)  # OpenCV places the ROI at center - size // 2
            # seamlessClone writes into the mask it is given: pass a copy.
            fake = cv2.seamlessClone(src, img, binary.copy(), center, cv2.NORMAL_CLONE)
            mask = binary.astype(np.float32) / 255.0
    fake, mask = _finish(img, fake, mask)
    return fake, mask, {"mask": p_mask, "affine": p_aff, "blend": blend, "color_transfer": "lab_mean_std"}


def copy_move(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Copy a region of the image onto another place of the same image (slight scale/rotation)."""
    _check_image(img)
    h, w = img.shape[:2]
    mask, p_mask = region_mask(h, w, rng, scale=(0.12, 0.25))
    # Move by a large enough offset that the copy is not just the same pixels again.
    dist = min(h, w) * rng.uniform(0.2, 0.4)
    theta = rng.uniform(0, 2 * np.pi)
    shift = (float(dist * np.cos(theta)), float(dist * np.sin(theta)))
    cx, cy = p_mask["cx"] * w, p_mask["cy"] * h
    # Warp so that the content at (centre - shift) lands on the masked destination region.
    src, p_aff = _affine(img.astype(np.float32), rng, 0.0, (0.9, 1.1), max_rot=10.0,
                         center=(cx - shift[0], cy - shift[1]), shift=shift)
    fake, mask = _finish(img, _blend(img, src, mask), mask)
    return fake, mask, {"mask": p_mask, "affine": p_aff}


def inpaint(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Remove a region and fill it with classical inpainting (Telea or Navier-Stokes)."""
    _check_image(img)
    h, w = img.shape[:2]
    mask, p_mask = region_mask(h, w, rng, scale=(0.1, 0.22), soft=False)
    mask = _binary(mask)
    radius = int(rng.integers(2, 6))
    algo = "telea" if rng.random() < 0.5 else "ns"
    flag = cv2.INPAINT_TELEA if algo == "telea" else cv2.INPAINT_NS
    fake = cv2.inpaint(img, (mask * 255).astype(np.uint8), radius, flag)
    fake, mask = _finish(img, fake, mask)
    return fake, mask, {"mask": p_mask, "radius": radius, "algorithm": algo}


def upsample(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Down-sample then up-sample (nearest/bilinear) a region: the periodic traces of generators."""
    _check_image(img)
    h, w = img.shape[:2]
    factor = float(rng.choice([2.0, 3.0, 4.0]))
    interp = str(rng.choice(["nearest", "bilinear"]))
    small = cv2.resize(img, (max(1, int(round(w / factor))), max(1, int(round(h / factor)))),
                       interpolation=cv2.INTER_AREA)
    up = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST if interp == "nearest" else cv2.INTER_LINEAR)
    mask, p_mask = region_mask(h, w, rng, face=rng.random() < 0.5)
    fake, mask = _finish(img, _blend(img, up, mask), mask)
    return fake, mask, {"mask": p_mask, "factor": factor, "interpolation": interp}


def jpeg_double(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """A region re-compressed at another JPEG quality (misaligned 8x8 grid when shifted)."""
    _check_image(img)
    h, w = img.shape[:2]
    quality = int(rng.integers(20, 76))
    # Shift the JPEG grid so block boundaries inside the region do not match the rest.
    ox, oy = int(rng.integers(0, 8)), int(rng.integers(0, 8))
    padded = cv2.copyMakeBorder(img, oy, 0, ox, 0, cv2.BORDER_REFLECT_101)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(padded, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - cv2 always encodes a valid uint8 image
        raise RuntimeError("JPEG encoding failed")
    dec = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)[oy:, ox:]
    mask, p_mask = region_mask(h, w, rng, face=rng.random() < 0.5)
    fake, mask = _finish(img, _blend(img, dec, mask), mask)
    return fake, mask, {"mask": p_mask, "quality": quality, "grid_offset": [ox, oy]}


METHODS: dict[str, EditFn] = {
    "self_blend": self_blend,
    "splice": splice,
    "copy_move": copy_move,
    "inpaint": inpaint,
    "upsample": upsample,
    "jpeg_double": jpeg_double,
}
# Methods whose third argument must be another real image.
NEEDS_DONOR = frozenset({"splice"})


def get_method(name: str) -> EditFn:
    """The editing function called ``name``; a clear error lists the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown editing method {name!r}; valid: {sorted(METHODS)}") from None
