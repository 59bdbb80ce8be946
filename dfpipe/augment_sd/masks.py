"""Where an editing forgery changes the image: random face-shaped regions and landmark hulls (SBI), as float32
masks quantised to 1/255 so the 8-bit PNG the stage saves is the same mask."""

from __future__ import annotations

import cv2
import numpy as np

from .imaging import MASK_EPS, f32, odd, quantise_mask

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
    k = odd(6 * smooth)
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
    params = {"shape": shape, "cx": f32(cx / w), "cy": f32(cy / h), "ax": f32(ax / w), "ay": f32(ay / h),
              "angle": f32(angle), "elastic_px": f32(amp)}
    if soft:
        sigma = side * rng.uniform(0.02, 0.06)
        k = odd(6 * sigma * s)
        canvas = cv2.GaussianBlur(canvas, (k, k), sigma * s)
        canvas /= max(float(canvas.max()), 1e-6)
        params["blur_sigma_px"] = f32(sigma)
    if (gh, gw) != (h, w):
        canvas = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LINEAR)
        if not soft:
            # Bilinear resizing spreads the grid's one-pixel anti-aliased edge over 1/s image pixels:
            # steepen it back to about one image pixel (a hard mask stays hard).
            canvas -= 0.5
            canvas *= 1.0 / s
            canvas += 0.5
    canvas[canvas < MASK_EPS] = 0.0
    return quantise_mask(canvas), params


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
    mask[mask < MASK_EPS] = 0.0
    if not mask.any():
        return None
    params = {"shape": "landmark_hull", "hull": hull.tolist(), "grid_px": [f32(gx * face), f32(gy * face)],
              "erode_k": k_erode, "blur_k": k_blur, "blur_sigma": sigma, "elastic_px": f32(amp / min(gx, gy))}
    return quantise_mask(mask), params


def binary_mask(mask: np.ndarray) -> np.ndarray:
    return (mask >= 0.5).astype(np.float32)
