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

Methods are registered by name in :data:`METHODS` (:data:`dfpipe.registry.EDITING_METHODS`; a method registered
there is a valid ``augment_sd.methods`` key). The self-blend idea follows Shiohara & Yamasaki,
"Detecting Deepfakes with Self-Blended Images" (CVPR 2022): blending an image with a slightly altered
copy of itself leaves the blending-boundary and statistics traces that real face swaps leave, without
needing a second identity.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from ..registry import EDITING_METHODS

EditFn = Callable[[np.ndarray, np.random.Generator, "np.ndarray | None"], tuple[np.ndarray, np.ndarray, dict]]

# Mask values below this change no 8-bit pixel; zeroing them keeps the mask tight to the change.
_MASK_EPS = 1.0 / 255.0


# --------------------------------------------------------------------------- small helpers
def _f(x: float) -> float:
    """A rounded Python float for the params dict (short, stable JSON)."""
    return round(float(x), 4)


def _quantise_mask(mask: np.ndarray) -> np.ndarray:
    """Round to 8-bit levels so the saved PNG equals the mask used for blending."""
    q = np.clip(mask, 0.0, 1.0).astype(np.float32, copy=False)
    q *= 255.0
    np.round(q, out=q)
    q /= 255.0
    return q


Box = tuple[slice, slice]


def _box(mask: np.ndarray, pad: int = 0) -> Box:
    """(rows, cols) slices of the bounding box of ``mask > 0`` grown by ``pad`` (clipped to the image).

    Everything a method changes lies in this box, so the per-pixel work after the mask is drawn is
    done there only: its cost follows the region, not the whole (possibly 12 MP) image.
    """
    x, y, bw, bh = cv2.boundingRect((mask > 0).view(np.uint8))
    if bw == 0:
        return slice(0, 0), slice(0, 0)
    h, w = mask.shape
    return slice(max(0, y - pad), min(h, y + bh + pad)), slice(max(0, x - pad), min(w, x + bw + pad))


def _blend(img: np.ndarray, src: np.ndarray, mask: np.ndarray, box: Box | None = None) -> np.ndarray:
    """``mask * src + (1 - mask) * img``; pixels with mask == 0 are copied, not recomputed.

    ``src`` is of the image's size, or (with ``box``) the crop ``box`` of it; ``box`` must hold every
    pixel with ``mask > 0``.
    """
    if box is None:
        box = _box(mask)
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


def _finish(img: np.ndarray, fake: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Enforce the contract: untouched outside the mask, uint8, contiguous."""
    box = _box(mask)
    out = img.copy()
    out[box] = np.where(mask[box][..., None] > 0, fake[box], img[box])
    return out, np.ascontiguousarray(mask, dtype=np.float32)


def _check_image(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}")


def _odd(k: float) -> int:
    k = max(1, int(round(k)))
    return k if k % 2 else k + 1


# --------------------------------------------------------------------------- masks
# Region masks are drawn on a grid whose longer side is at most this many pixels, then resized to the
# image (bilinear): the mask is smooth (elastic warp and blur scale with the image side), so a 3-4k
# image gets the same shape as a 256 px one at a cost linear in its pixels instead of growing with the
# blur kernels. Images no larger than the grid are drawn directly at their own size.
MASK_GRID = 256
# Fractional bits of the coordinates the shapes are drawn with on a reduced grid (sub-pixel accuracy).
_SHIFT = 4
# Shapes on a reduced grid are filled at this many times its resolution, then area-averaged (see below).
_SUPERSAMPLE = 4


def _field(rng: np.random.Generator, h: int, w: int, smooth: float, amplitude: float) -> np.ndarray:
    """(2, h, w) smooth random displacement field (x, y) whose largest magnitude is ``amplitude``."""
    field = rng.uniform(-1.0, 1.0, size=(2, h, w)).astype(np.float32)
    k = _odd(6 * smooth)
    out = np.empty_like(field)
    for c in range(2):
        out[c] = cv2.GaussianBlur(field[c], (k, k), smooth)
        # Normalise the blurred noise (its scale shrinks with the blur) so the amplitude means pixels.
        out[c] *= amplitude / (np.abs(out[c]).max() + 1e-6)
    return out


def _grid_shape(h: int, w: int, side: int | None) -> tuple[int, int, float]:
    """(rows, cols, scale) of the grid with longer side at most ``side`` (None: the image itself)."""
    if side is None or max(h, w) <= side:
        return h, w, 1.0
    s = side / max(h, w)
    return max(1, int(round(h * s))), max(1, int(round(w * s))), s


def region_mask(
    h: int,
    w: int,
    rng: np.random.Generator,
    *,
    face: bool = False,
    scale: tuple[float, float] = (0.15, 0.35),
    soft: bool = True,
    grid: int | None = MASK_GRID,
) -> tuple[np.ndarray, dict]:
    """A random blob (ellipse or convex hull), elastic-deformed and (if ``soft``) Gaussian-blurred.

    ``face=True`` gives a face-shaped vertical ellipse near the centre: cached images are face crops
    and no face box is known, so the centre is the best guess for where a swap would land.
    Returns the (h, w) float32 mask (max 1) and what was sampled (positions relative to the image,
    lengths in pixels of the image).

    The shape, the elastic warp and the blur are drawn on a grid whose longer side is at most ``grid``
    pixels (:data:`MASK_GRID`) and the result is resized to (h, w); ``grid=None`` draws at (h, w)
    itself (slow for large images: the blur kernels grow with the side; used to test the reduced
    grid). The random numbers drawn, and so the region, do not depend on ``grid``: the displacement
    field's noise is always drawn on the :data:`MASK_GRID` grid. Images whose longer side is at most
    :data:`MASK_GRID` are drawn at their own size either way.
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
    # Draw on the (gh, gw) grid. A pixel centre x of the image is at (x + 0.5) * gw / w - 0.5 on the
    # grid (the mapping cv2.resize uses to bring the grid back to the image). On a reduced grid the
    # shape is filled without anti-aliasing at _SUPERSAMPLE times the grid's resolution and
    # area-averaged down: OpenCV's anti-aliased fill grows a shape by about half a pixel, which would be
    # half a *grid* pixel (several image pixels) here. Images no larger than the grid are drawn as they
    # always were (anti-aliased, integer coordinates).
    gh, gw, s = _grid_shape(h, w, grid)
    reduced = s != 1.0
    sup = _SUPERSAMPLE if reduced else 1
    bits = _SHIFT if reduced else 0
    one = float(sup << bits)
    to_grid = np.array([gw / w, gh / h])

    def point(v: np.ndarray) -> np.ndarray:
        """Image (x, y) points -> fixed-point points of the (supersampled) drawing canvas."""
        v = np.asarray(v, np.float64)
        if reduced:  # pixel centres of the supersampled canvas: (x_grid + 0.5) * sup - 0.5
            v = (((v + 0.5) * to_grid - 0.5) + 0.5) * sup - 0.5
        return np.round(v * (1 << bits)).astype(np.int32)

    def length(v: float) -> int:
        return max(1, int(round(v * s * one)))

    canvas = np.zeros((gh * sup, gw * sup), np.float32)
    line = cv2.LINE_8 if reduced else cv2.LINE_AA
    if shape == "hull":
        # Random points in the ellipse's box; their hull is an irregular convex polygon.
        pts = np.stack([cx + ax * rng.uniform(-1, 1, 12), cy + ay * rng.uniform(-1, 1, 12)], axis=1)
        hull = cv2.convexHull(point(pts))
        cv2.fillConvexPoly(canvas, hull, 1.0, lineType=line, shift=bits)
    else:
        c = point([cx, cy])
        cv2.ellipse(canvas, (int(c[0]), int(c[1])), (length(ax), length(ay)), angle, 0, 360, 1.0, -1,
                    lineType=line, shift=bits)
    if reduced:
        canvas = cv2.resize(canvas, (gw, gh), interpolation=cv2.INTER_AREA)
    amp = side * rng.uniform(0.02, 0.06)
    smooth = side * rng.uniform(0.05, 0.12)
    # The noise always lives on the MASK_GRID grid (random draws independent of `grid`); it is blurred
    # there and resized to the drawing grid when that differs (it is smooth: sigma >= 5 % of the side).
    fh, fw, fs = _grid_shape(h, w, MASK_GRID)
    field = _field(rng, fh, fw, smooth * fs, amplitude=amp * s)  # displacements in drawing-grid pixels
    if (fh, fw) != (gh, gw):
        field = np.stack([cv2.resize(f, (gw, gh), interpolation=cv2.INTER_LINEAR) for f in field])
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    canvas = cv2.remap(canvas, xx + field[0], yy + field[1], cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    params = {"shape": shape, "cx": _f(cx / w), "cy": _f(cy / h), "ax": _f(ax / w), "ay": _f(ay / h),
              "angle": _f(angle), "elastic_px": _f(amp)}
    if soft:
        sigma = side * rng.uniform(0.02, 0.06)
        k = _odd(6 * sigma * s)
        canvas = cv2.GaussianBlur(canvas, (k, k), sigma * s)
        canvas /= max(float(canvas.max()), 1e-6)
        params["blur_sigma_px"] = _f(sigma)
    if (gh, gw) != (h, w):
        canvas = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LINEAR)
        if not soft:
            # Bilinear resizing spreads the grid's one-pixel anti-aliased edge over 1/s image pixels:
            # steepen it back to about one image pixel (a hard mask stays hard).
            canvas -= 0.5
            canvas *= 1.0 / s
            canvas += 0.5
    canvas[canvas < _MASK_EPS] = 0.0
    return _quantise_mask(canvas), params


# --------------------------------------------------------------------------- landmark masks (SBI)
# SBI (Shiohara & Yamasaki 2022, its get_blend_mask) resizes the hull mask to a random 192-256 px per axis,
# erodes it (a Gaussian blur with an odd 5-25 px kernel, keeping only the pixels still at 1), blurs it again
# (5-25 px kernel, sigma 5-45) and resizes it back: the kernels are pixels of that grid, so their size
# relative to the face, and their aspect, vary. Its 380 px crops hold the face at about 80 % of the side;
# here the grid is set by the face itself: the hull's longer side spans _SBI_FACE * U(192, 256) grid pixels,
# drawn per axis, whatever the image size (the cost follows the face box, not the image).
_SBI_GRID = (192.0, 256.0)
_SBI_FACE = 0.8
_SBI_KERNEL = (5, 25)  # odd kernel sizes of the erosion and of the blur, grid pixels
_SBI_SIGMA = (5, 45)  # sigma of the blur, grid pixels (the 25 px kernel cuts the widest ones short, as in SBI)
_SBI_PAD = 20  # grid pixels around the hull's box: the blur (<= 12) plus the elastic warp (<= 4) and margin
_MIN_HULL_AREA = 16.0  # px^2: a smaller hull is no face


def face_hull(points: np.ndarray) -> np.ndarray | None:
    """(K, 2) int32 convex hull of landmark points rounded to pixels (None: fewer than 3, or no area).

    The hull of a hull is itself: a manifest row records this hull, and :func:`self_blend` given it again
    draws the same mask (so :func:`dfpipe.augment_sd.generate.regenerate` needs no landmark detector).
    """
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) < 3:
        return None
    hull = cv2.convexHull(np.round(pts).astype(np.int32)).reshape(-1, 2)
    if len(hull) < 3 or cv2.contourArea(hull) < _MIN_HULL_AREA:
        return None
    return hull


def _odd_between(rng: np.random.Generator, lo: int, hi: int) -> int:
    """An odd integer in [lo, hi] (both odd), uniformly (random.randrange(lo, hi + 1, 2) in SBI)."""
    return lo + 2 * int(rng.integers(0, (hi - lo) // 2 + 1))


def landmark_mask(h: int, w: int, hull: np.ndarray, rng: np.random.Generator,
                  m_aff: np.ndarray | None = None) -> tuple[np.ndarray, dict] | None:
    """SBI's blending mask from a face hull (:func:`face_hull`): (h, w) float32 mask (max 1) and params.

    The hull is moved by ``m_aff`` (the affine that moves the blended copy, so that mask and source face
    stay together, as SBI warps both), drawn on a face-sized grid (see :data:`_SBI_GRID`), elastic-warped,
    eroded by a random 5-25 px square, blurred (5-25 px kernel, sigma 5-45) and brought back to the
    image. Returns None when the moved hull misses the image (before drawing any random number) or when
    nothing of the mask is left inside it.
    """
    pts = np.asarray(hull, np.float64).reshape(-1, 2)
    if m_aff is not None:
        pts = pts @ m_aff[:, :2].T + m_aff[:, 2]
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    if x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1:
        return None
    face = max(x1 - x0, y1 - y0, 1.0)
    gx, gy = rng.uniform(*_SBI_GRID, size=2) * _SBI_FACE / face  # grid pixels per image pixel, per axis
    k_erode = _odd_between(rng, *_SBI_KERNEL)
    k_blur = _odd_between(rng, *_SBI_KERNEL)
    sigma = float(rng.integers(_SBI_SIGMA[0], _SBI_SIGMA[1] + 1))
    # The window: the hull's box grown by _SBI_PAD grid pixels, not clipped to the image: a face that the
    # image border cuts is eroded and blurred as the whole face (its landmarks go on beyond the border) and
    # cut afterwards, so the border neither erodes it nor leaves a stub of it.
    c0, c1 = int(np.floor(x0 - _SBI_PAD / gx)), int(np.ceil(x1 + _SBI_PAD / gx)) + 1
    r0, r1 = int(np.floor(y0 - _SBI_PAD / gy)), int(np.ceil(y1 + _SBI_PAD / gy)) + 1
    gw, gh = max(1, int(round((c1 - c0) * gx))), max(1, int(round((r1 - r0) * gy)))
    sx, sy = gw / (c1 - c0), gh / (r1 - r0)
    # Image pixel centre x lies at (x - c0 + 0.5) * sx - 0.5 on the grid (cv2.resize's mapping back).
    grid_pts = np.stack([(pts[:, 0] - c0 + 0.5) * sx - 0.5, (pts[:, 1] - r0 + 0.5) * sy - 0.5], axis=1)
    canvas = np.zeros((gh, gw), np.float32)
    cv2.fillConvexPoly(canvas, np.round(grid_pts * (1 << _SHIFT)).astype(np.int32), 1.0,
                       lineType=cv2.LINE_8, shift=_SHIFT)
    # Elastic warp of the outline: SBI's ElasticTransform(alpha=50, sigma=7) on its 380 px crop moves the
    # edge by about 1 % of the face, smoothly.
    face_grid = face * min(gx, gy)
    amp = face_grid * rng.uniform(0.005, 0.02)
    field = _field(rng, gh, gw, smooth=0.025 * face_grid, amplitude=amp)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    canvas = cv2.remap(canvas, xx + field[0], yy + field[1], cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    binary = (canvas >= 0.5).astype(np.uint8)
    eroded = cv2.erode(binary, np.ones((k_erode, k_erode), np.uint8))
    if not eroded.any():  # a sliver of a hull: keep it uneroded rather than lose it
        eroded, k_erode = binary, 1
    if not eroded.any():
        return None
    soft = cv2.GaussianBlur(eroded.astype(np.float32), (k_blur, k_blur), sigma)
    soft /= float(soft.max())
    # Back to image pixels (the window is about the face's size), then the part inside the image.
    full = cv2.resize(soft, (c1 - c0, r1 - r0), interpolation=cv2.INTER_LINEAR)
    mask = np.zeros((h, w), np.float32)
    i0, i1, j0, j1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    mask[i0:i1, j0:j1] = full[i0 - r0:i1 - r0, j0 - c0:j1 - c0]
    mask[mask < _MASK_EPS] = 0.0
    if not mask.any():
        return None
    params = {"shape": "landmark_hull", "hull": hull.tolist(), "grid_px": [_f(gx * face), _f(gy * face)],
              "erode_k": k_erode, "blur_k": k_blur, "blur_sigma": sigma, "elastic_px": _f(amp / min(gx, gy))}
    return _quantise_mask(mask), params


def _binary(mask: np.ndarray) -> np.ndarray:
    return (mask >= 0.5).astype(np.float32)


# --------------------------------------------------------------------------- photometric helpers
def color_jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> tuple[np.ndarray, dict]:
    """Brightness/contrast, per-channel shift and saturation change (float32 result, 0-255)."""
    sign = rng.choice([-1.0, 1.0])
    brightness = float(sign * rng.uniform(0.03, 0.12) * strength)  # never 0: the copy must differ
    contrast = float(rng.uniform(-0.12, 0.12) * strength)
    shift = rng.uniform(-12, 12, size=3).astype(np.float32) * strength
    sat = float(rng.uniform(-0.2, 0.2) * strength)
    # y = (x - mean) * (1 + contrast) + mean + 255 * brightness + shift, then the saturation change
    # z = gray(y) + (y - gray(y)) * (1 + sat): both linear in the pixel, so one 3x4 colour matrix.
    mean = np.asarray(cv2.mean(img)[:3], np.float64)
    t = mean * -contrast + 255.0 * brightness + shift.astype(np.float64)
    ones = np.full((3, 3), 1.0 / 3.0)
    m = np.empty((3, 4))
    m[:, :3] = (1.0 + contrast) * ((1.0 + sat) * np.eye(3) - sat * ones)
    m[:, 3] = (1.0 + sat) * t - sat * t.mean()
    x = cv2.transform(img.astype(np.float32), m)
    np.clip(x, 0, 255, out=x)
    params = {"brightness": _f(brightness), "contrast": _f(contrast), "shift": [_f(s) for s in shift],
              "saturation": _f(sat)}
    return x, params


def blur_or_sharpen(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Gaussian blur or unsharp-mask sharpening of a float image (frequency mismatch at the seam)."""
    sigma = rng.uniform(0.5, 1.5)
    k = _odd(6 * sigma)
    soft = cv2.GaussianBlur(x, (k, k), sigma)
    if rng.random() < 0.5:
        return soft, {"filter": "blur", "sigma": _f(sigma)}
    amount = rng.uniform(0.5, 1.5)
    sharp = cv2.addWeighted(x, 1.0 + amount, soft, -amount, 0.0)  # x + amount * (x - soft)
    np.clip(sharp, 0, 255, out=sharp)
    return sharp, {"filter": "sharpen", "sigma": _f(sigma), "amount": _f(amount)}


def _affine_matrix(h: int, w: int, rng: np.random.Generator, max_shift: float, scale: tuple[float, float],
                   max_rot: float = 0.0, center: tuple[float, float] | None = None,
                   shift: tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """A slight scale/rotation about ``center`` plus a translation, as a 2x3 matrix, and its params."""
    s = rng.uniform(*scale)
    rot = rng.uniform(-max_rot, max_rot) if max_rot else 0.0
    if shift is None:
        shift = (rng.uniform(-max_shift, max_shift) * w, rng.uniform(-max_shift, max_shift) * h)
    c = center if center is not None else (w / 2.0, h / 2.0)
    m = cv2.getRotationMatrix2D((float(c[0]), float(c[1])), rot, s)
    m[:, 2] += np.asarray(shift, dtype=np.float64)
    return m, {"scale": _f(s), "rotation": _f(rot), "dx": _f(shift[0]), "dy": _f(shift[1])}


def _warp(x: np.ndarray, m: np.ndarray, box: Box | None = None) -> np.ndarray:
    """``x`` warped by the affine ``m`` (borders reflect); with ``box``, only that crop of the result."""
    h, w = x.shape[:2]
    if box is None:
        box = slice(0, h), slice(0, w)
    rows, cols = box
    if rows.stop <= rows.start or cols.stop <= cols.start:
        return x[box]
    m = m.copy()
    m[:, 2] -= (cols.start, rows.start)  # output pixel (0, 0) is the box's corner
    return cv2.warpAffine(x, m, (cols.stop - cols.start, rows.stop - rows.start), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def _affine(x: np.ndarray, rng: np.random.Generator, max_shift: float, scale: tuple[float, float],
            max_rot: float = 0.0, center: tuple[float, float] | None = None,
            shift: tuple[float, float] | None = None, box: Box | None = None) -> tuple[np.ndarray, dict]:
    """Slight scale/rotation about ``center`` plus a translation; borders reflect (only ``box`` if given)."""
    m, params = _affine_matrix(x.shape[0], x.shape[1], rng, max_shift, scale, max_rot, center, shift)
    return _warp(x, m, box), params


def lab_transfer(src: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Match the LAB mean/std of ``src`` to ``ref`` inside ``mask`` (Reinhard colour transfer).

    Only the bounding box of ``mask > 0`` is converted; ``src`` is returned as it was outside it.
    """
    box = _box(mask)
    out = src.copy()
    sel = (mask[box] > 0).view(np.uint8)
    if not sel.any():
        return out
    src_lab = cv2.cvtColor(np.ascontiguousarray(src[box]), cv2.COLOR_RGB2LAB)
    ref_lab = cv2.cvtColor(np.ascontiguousarray(ref[box]), cv2.COLOR_RGB2LAB)
    s_mu, s_sd = (v.ravel() for v in cv2.meanStdDev(src_lab, mask=sel))
    r_mu, r_sd = (v.ravel() for v in cv2.meanStdDev(ref_lab, mask=sel))
    gain = (r_sd + 1e-3) / (s_sd + 1e-3)
    lab = src_lab.astype(np.float32) * gain.astype(np.float32) + (r_mu - s_mu * gain).astype(np.float32)
    np.clip(lab, 0, 255, out=lab)
    out[box] = cv2.cvtColor(lab.astype(np.uint8), cv2.COLOR_LAB2RGB)
    return out


def _fit(donor: np.ndarray | None, shape: tuple[int, ...], method: str) -> np.ndarray:
    if donor is None:
        raise ValueError(f"{method} needs a donor image (another real image), got None")
    _check_image(donor)
    if donor.shape != shape:
        donor = cv2.resize(donor, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return donor


# --------------------------------------------------------------------------- methods
def self_blend(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None,
               landmarks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """SBI: blend a colour-jittered, filtered, slightly shifted copy of the image into itself.

    ``landmarks``: (N, 2) (x, y) face landmarks in pixels of ``img`` (:mod:`dfpipe.data.landmarks`). With
    them the mask is SBI's, drawn from their convex hull (:func:`landmark_mask`); without them, or when
    their hull is degenerate or off the image, it is a random face-shaped region near the centre
    (:func:`region_mask`). ``params["mask"]["shape"]`` says which: ``landmark_hull`` or ``face_ellipse``.
    """
    _check_image(img)
    h, w = img.shape[:2]
    src, p_col = color_jitter(img, rng)
    src, p_flt = blur_or_sharpen(src, rng)
    m_aff, p_aff = _affine_matrix(h, w, rng, max_shift=0.03, scale=(0.95, 1.05))
    hull = None if landmarks is None else face_hull(landmarks)
    made = None if hull is None else landmark_mask(h, w, hull, rng, m_aff)
    if made is None:
        mask, p_mask = region_mask(h, w, rng, face=True)
        if landmarks is not None:  # a hull too small, or off the image
            p_mask["landmarks"] = "unusable"
            if hull is not None:  # landmark_mask may have drawn numbers: regenerate must replay it
                p_mask["hull"] = hull.tolist()
    else:
        mask, p_mask = made
    # SBI samples the blend ratio with a bias towards full replacement.
    ratio = float(rng.choice([0.25, 0.5, 0.75, 1.0, 1.0, 1.0]))
    mask = _quantise_mask(mask * ratio)
    box = _box(mask)
    fake, mask = _finish(img, _blend(img, _warp(src, m_aff, box), mask, box), mask)
    return fake, mask, {"color": p_col, "filter": p_flt, "affine": p_aff, "mask": p_mask, "blend_ratio": ratio}


def splice(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None
           ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Paste a region of another real image, colour-matched in LAB, by alpha or Poisson blending."""
    _check_image(img)
    h, w = img.shape[:2]
    donor = _fit(donor, img.shape, "splice")
    mask, p_mask = region_mask(h, w, rng, face=rng.random() < 0.5)
    # The donor is warped and colour-matched in the mask's box only; the 2 extra pixels are the ring
    # seamlessClone clears around the mask it is given (see below).
    box = _box(mask, pad=2)
    r0, c0 = box[0].start, box[1].start
    src, p_aff = _affine(donor, rng, max_shift=0.04, scale=(0.9, 1.1), max_rot=8.0, box=box)
    src = lab_transfer(src, img[box], mask[box])
    if rng.random() < 0.5:
        blend = "alpha"
        fake = _blend(img, src, mask, box)
    else:
        blend = "seamless"
        binary = (mask >= 0.5).astype(np.uint8) * 255
        # seamlessClone needs the region off the image border.
        binary[:2, :] = binary[-2:, :] = 0
        binary[:, :2] = binary[:, -2:] = 0
        x, y, bw, bh = cv2.boundingRect(binary)
        if bw < 3 or bh < 3:  # nothing left to clone: fall back to alpha blending
            blend, fake = "alpha", _blend(img, src, mask, box)
        else:
            center = (x + bw // 2, y + bh // 2)  # OpenCV places the ROI at center - size // 2
            # seamlessClone reads only the mask's bounding rectangle of the source, after clearing the
            # outermost pixel ring of the mask: pass that rectangle grown by 2, which lies inside the
            # image and the box (the binary mask is 0 within 2 pixels of the border and inside mask > 0).
            # The result is the same as with the whole source. It writes into the mask: pass a copy.
            ys, xs = slice(y - 2, y + bh + 2), slice(x - 2, x + bw + 2)
            part = np.ascontiguousarray(src[ys.start - r0:ys.stop - r0, xs.start - c0:xs.stop - c0])
            fake = cv2.seamlessClone(part, img, binary[ys, xs].copy(), center, cv2.NORMAL_CLONE)
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
    box = _box(mask)
    src, p_aff = _affine(img.astype(np.float32), rng, 0.0, (0.9, 1.1), max_rot=10.0,
                         center=(cx - shift[0], cy - shift[1]), shift=shift, box=box)
    fake, mask = _finish(img, _blend(img, src, mask, box), mask)
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
    # Inpainting reads known pixels within `radius` of the region: the mask's box grown by more than
    # that gives the same pixels as the whole image, at the cost of the region.
    box = _box(mask, pad=radius + 2)
    fake = img.copy()
    fake[box] = cv2.inpaint(np.ascontiguousarray(img[box]), (mask[box] * 255).astype(np.uint8), radius, flag)
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


METHODS = EDITING_METHODS  # name -> EditFn, read like a dict (METHODS[name], sorted(METHODS), METHODS.items())
METHODS.register("self_blend", self_blend)
METHODS.register("splice", splice)
METHODS.register("copy_move", copy_move)
METHODS.register("inpaint", inpaint)
METHODS.register("upsample", upsample)
METHODS.register("jpeg_double", jpeg_double)
# Methods whose third argument must be another real image.
NEEDS_DONOR = frozenset({"splice"})
# Methods that take face landmarks (keyword ``landmarks``, (N, 2) pixels or None) for their mask.
USES_LANDMARKS = frozenset({"self_blend"})


def get_method(name: str) -> EditFn:
    """The editing function called ``name``; an unknown name is an UnknownNameError listing the valid ones."""
    return METHODS.get(name)
