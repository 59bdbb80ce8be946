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
from .imaging import Box, bbox, blend, check_image, f32, finish, odd, quantise_mask
from .masks import MASK_GRID, binary_mask, face_hull, landmark_mask, region_mask  # noqa: F401  (MASK_GRID, face_hull: re-exported)

EditFn = Callable[[np.ndarray, np.random.Generator, "np.ndarray | None"], tuple[np.ndarray, np.ndarray, dict]]


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
    params = {"brightness": f32(brightness), "contrast": f32(contrast), "shift": [f32(s) for s in shift],
              "saturation": f32(sat)}
    return x, params


def blur_or_sharpen(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Gaussian blur or unsharp-mask sharpening of a float image (frequency mismatch at the seam)."""
    sigma = rng.uniform(0.5, 1.5)
    k = odd(6 * sigma)
    soft = cv2.GaussianBlur(x, (k, k), sigma)
    if rng.random() < 0.5:
        return soft, {"filter": "blur", "sigma": f32(sigma)}
    amount = rng.uniform(0.5, 1.5)
    sharp = cv2.addWeighted(x, 1.0 + amount, soft, -amount, 0.0)  # x + amount * (x - soft)
    np.clip(sharp, 0, 255, out=sharp)
    return sharp, {"filter": "sharpen", "sigma": f32(sigma), "amount": f32(amount)}


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
    return m, {"scale": f32(s), "rotation": f32(rot), "dx": f32(shift[0]), "dy": f32(shift[1])}


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
    box = bbox(mask)
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
    check_image(donor)
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
    check_image(img)
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
    mask = quantise_mask(mask * ratio)
    box = bbox(mask)
    fake, mask = finish(img, blend(img, _warp(src, m_aff, box), mask, box), mask)
    return fake, mask, {"color": p_col, "filter": p_flt, "affine": p_aff, "mask": p_mask, "blend_ratio": ratio}


def splice(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None
           ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Paste a region of another real image, colour-matched in LAB, by alpha or Poisson blending."""
    check_image(img)
    h, w = img.shape[:2]
    donor = _fit(donor, img.shape, "splice")
    mask, p_mask = region_mask(h, w, rng, face=rng.random() < 0.5)
    # The donor is warped and colour-matched in the mask's box only; the 2 extra pixels are the ring
    # seamlessClone clears around the mask it is given (see below).
    box = bbox(mask, pad=2)
    r0, c0 = box[0].start, box[1].start
    src, p_aff = _affine(donor, rng, max_shift=0.04, scale=(0.9, 1.1), max_rot=8.0, box=box)
    src = lab_transfer(src, img[box], mask[box])
    if rng.random() < 0.5:
        blend = "alpha"
        fake = blend(img, src, mask, box)
    else:
        blend = "seamless"
        binary = (mask >= 0.5).astype(np.uint8) * 255
        # seamlessClone needs the region off the image border.
        binary[:2, :] = binary[-2:, :] = 0
        binary[:, :2] = binary[:, -2:] = 0
        x, y, bw, bh = cv2.boundingRect(binary)
        if bw < 3 or bh < 3:  # nothing left to clone: fall back to alpha blending
            blend, fake = "alpha", blend(img, src, mask, box)
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
    fake, mask = finish(img, fake, mask)
    return fake, mask, {"mask": p_mask, "affine": p_aff, "blend": blend, "color_transfer": "lab_mean_std"}


def copy_move(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Copy a region of the image onto another place of the same image (slight scale/rotation)."""
    check_image(img)
    h, w = img.shape[:2]
    mask, p_mask = region_mask(h, w, rng, scale=(0.12, 0.25))
    # Move by a large enough offset that the copy is not just the same pixels again.
    dist = min(h, w) * rng.uniform(0.2, 0.4)
    theta = rng.uniform(0, 2 * np.pi)
    shift = (float(dist * np.cos(theta)), float(dist * np.sin(theta)))
    cx, cy = p_mask["cx"] * w, p_mask["cy"] * h
    # Warp so that the content at (centre - shift) lands on the masked destination region.
    box = bbox(mask)
    src, p_aff = _affine(img.astype(np.float32), rng, 0.0, (0.9, 1.1), max_rot=10.0,
                         center=(cx - shift[0], cy - shift[1]), shift=shift, box=box)
    fake, mask = finish(img, blend(img, src, mask, box), mask)
    return fake, mask, {"mask": p_mask, "affine": p_aff}


def inpaint(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Remove a region and fill it with classical inpainting (Telea or Navier-Stokes)."""
    check_image(img)
    h, w = img.shape[:2]
    mask, p_mask = region_mask(h, w, rng, scale=(0.1, 0.22), soft=False)
    mask = binary_mask(mask)
    radius = int(rng.integers(2, 6))
    algo = "telea" if rng.random() < 0.5 else "ns"
    flag = cv2.INPAINT_TELEA if algo == "telea" else cv2.INPAINT_NS
    # Inpainting reads known pixels within `radius` of the region: the mask's box grown by more than
    # that gives the same pixels as the whole image, at the cost of the region.
    box = bbox(mask, pad=radius + 2)
    fake = img.copy()
    fake[box] = cv2.inpaint(np.ascontiguousarray(img[box]), (mask[box] * 255).astype(np.uint8), radius, flag)
    fake, mask = finish(img, fake, mask)
    return fake, mask, {"mask": p_mask, "radius": radius, "algorithm": algo}


def upsample(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Down-sample then up-sample (nearest/bilinear) a region: the periodic traces of generators."""
    check_image(img)
    h, w = img.shape[:2]
    factor = float(rng.choice([2.0, 3.0, 4.0]))
    interp = str(rng.choice(["nearest", "bilinear"]))
    small = cv2.resize(img, (max(1, int(round(w / factor))), max(1, int(round(h / factor)))),
                       interpolation=cv2.INTER_AREA)
    up = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST if interp == "nearest" else cv2.INTER_LINEAR)
    mask, p_mask = region_mask(h, w, rng, face=rng.random() < 0.5)
    fake, mask = finish(img, blend(img, up, mask), mask)
    return fake, mask, {"mask": p_mask, "factor": factor, "interpolation": interp}


def jpeg_double(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """A region re-compressed at another JPEG quality (misaligned 8x8 grid when shifted)."""
    check_image(img)
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
    fake, mask = finish(img, blend(img, dec, mask), mask)
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
