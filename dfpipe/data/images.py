"""Decode any image file to RGB uint8 safely.

Every failure is an :class:`ImageError` whose message says what is wrong and whose ``kind`` is a short
reason code (counted in the prepare report), so a caller scanning a 500k folder can report and skip
the file instead of dying on a traceback from inside PIL. Inputs that are unusual but usable are
converted and the conversion is named in :attr:`Decoded.notes` (never silent).

The size rules (:func:`check_dimensions`: at least ``min_side`` px a side, at most ``max_pixels``) are the one
input rule of stage 1, the CLI and the API: each reads its limits from the same stage-1 record
(:class:`dfpipe.data.preprocess.Stage1`) and refuses an image with the same message, read from the header before
any pixel is decoded. Pillow's own decompression-bomb error never reaches a user.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

# Files listed from a folder must have one of these extensions; the content decides the format.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# The only decoders PIL may try: plain raster formats (no EPS/PDF, which would run external programs).
FORMAT_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"), "MPO": (".jpg", ".jpeg", ".mpo"), "PNG": (".png",),
    "WEBP": (".webp",), "BMP": (".bmp", ".dib"), "TIFF": (".tif", ".tiff"), "GIF": (".gif",),
}
OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # PIL's JPEG opener also returns MPO files
# The stage-1 defaults (prepare_data.min_side, max_pixels in params.yaml): what a checkpoint records and every
# scoring path then applies (dfpipe.data.preprocess.Stage1).
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MIN_SIDE = 16

# Reason codes (ImageError.kind) and conversion notes (Decoded.notes), as they appear in reports.
ERROR_KINDS = ("unreadable", "empty_file", "not_an_image", "decompression_bomb", "too_small", "corrupt",
               "unsupported_mode")
NOTE_KINDS = ("extension_mismatch", "animated_first_frame", "exif_rotated", "exif_unreadable", "cmyk",
              "16bit", "float", "palette", "alpha_flattened", "greyscale")


class ImageError(DataError):  # a UserError and a ValueError
    """An image that cannot be used; the message is the reason shown in reports, ``kind`` its code."""

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Decoded:
    img: np.ndarray  # (H, W, 3) uint8 RGB
    notes: tuple[str, ...] = ()  # conversions applied, in NOTE_KINDS order
    format: str = ""  # what the content is (JPEG, PNG, ...)


def decode_image(
    data: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    background: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array from a file path or raw bytes (see :func:`decode`)."""
    return decode(data, max_pixels=max_pixels, min_side=min_side, background=background).img


def decode(
    data: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Decoded:
    """Decode a file path or raw bytes to RGB uint8, saying which conversions were needed.

    EXIF orientation is applied; greyscale, palette, CMYK and 16-bit inputs are converted to RGB;
    alpha is flattened on ``background``; an animated image gives its first frame. The pixel count
    is checked from the header, before any pixel is decoded (decompression bombs stay cheap).
    """
    raw, suffix = _read(data)
    return _decode(raw, suffix, max_pixels, min_side, background)


def decode_file(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1,
    background: tuple[int, int, int] = (255, 255, 255),
) -> tuple[bytes, Decoded]:
    """(the file's bytes, :func:`decode` of them): stage 1 keeps the bytes of a clean file as they are."""
    raw, suffix = _read(path)
    return raw, _decode(raw, suffix, max_pixels, min_side, background)


def _decode(raw: bytes, suffix: str, max_pixels: int, min_side: int, background: tuple[int, int, int]) -> Decoded:
    img = _open(raw)
    fmt = img.format or ""  # before any transpose (which returns an image without a format)
    notes = set()
    if suffix and suffix not in FORMAT_EXTENSIONS.get(fmt, ()):
        notes.add("extension_mismatch")
    check_dimensions(*img.size, max_pixels=max_pixels, min_side=min_side)
    if getattr(img, "is_animated", False):
        notes.add("animated_first_frame")
    try:
        img.seek(0)
        img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on broken data; one file must not stop a run
        raise ImageError(f"corrupt or truncated image: {exc or type(exc).__name__}", "corrupt") from None
    img = _exif_upright(img, notes)
    try:
        arr = _to_rgb(img, background, notes)
    except (OSError, ValueError) as exc:  # a mode PIL cannot convert (e.g. LAB)
        raise ImageError(f"unsupported image mode {img.mode}: {exc}", "unsupported_mode") from None
    return Decoded(arr, tuple(k for k in NOTE_KINDS if k in notes), fmt)


def check_dimensions(w: int, h: int, *, max_pixels: int, min_side: int) -> None:
    """The size rule of every input (stage 1, CLI, API), from the header: an :class:`ImageError` (kind
    ``decompression_bomb`` or ``too_small``) in the words all three show."""
    if w * h > max_pixels:
        size, limit = _megapixels(w * h), _megapixels(max_pixels)
        if size == limit:  # just over: rounded, both would read the same
            size, limit = f"{w * h:,} pixels", f"{max_pixels:,} pixels"
        raise ImageError(f"too large: {w}x{h} = {size}, the limit is {limit}", "decompression_bomb")
    if min(w, h) < min_side:
        raise ImageError(f"too small: {w}x{h}, the shorter side must be at least {min_side} px", "too_small")


def _megapixels(n: int) -> str:
    """``400 MP``, ``12.3 MP`` (one decimal at most) from 1 MP up; ``4,032 pixels`` below."""
    return f"{round(n / 1e6, 1):g} MP" if n >= 1_000_000 else f"{n:,} pixels"


def _read(data: bytes | str | Path) -> tuple[bytes, str]:
    """(bytes, lower-case extension or "" for raw bytes)."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read file: {exc.strerror or exc}", "unreadable") from None
        suffix = path.suffix.lower()
    else:
        raw, suffix = data, ""
    if not raw:
        raise ImageError("empty file (0 bytes)", "empty_file")
    return raw, suffix


def _open(raw: bytes) -> Image.Image:
    """PIL image from bytes (header only), restricted to plain raster formats."""
    with warnings.catch_warnings():
        # our max_pixels check replaces PIL's bomb warning; PIL's hard limit (2x) still raises below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(raw), formats=OPEN_FORMATS)
        except UnidentifiedImageError:
            raise ImageError("not an image (unrecognised format)", "not_an_image") from None
        except Image.DecompressionBombError:  # past PIL's hard limit: our own check names the size and limit
            return _open_unchecked(raw)
        except Exception as exc:  # noqa: BLE001 - e.g. a header cut short; never fatal
            raise ImageError(f"corrupt or truncated image: {exc or type(exc).__name__}", "corrupt") from None


def _open_unchecked(raw: bytes) -> Image.Image:
    """What :func:`_open` does, without PIL's decompression-bomb check (which raises before the size is known, in
    its own words): the format's opener reads the header only; :func:`check_dimensions` then applies our limit."""
    Image.init()
    for fmt in OPEN_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        ok = accept(raw[:16]) if accept is not None else True
        if factory is None or not ok or isinstance(ok, str):  # a str is PIL's "maybe" warning: not this format
            continue
        try:
            return factory(io.BytesIO(raw), "")
        except Exception:  # noqa: BLE001 - not this format after all (PIL's own loop does the same)
            continue
    raise ImageError("corrupt or truncated image: its header could not be read", "corrupt")


def _exif_upright(img: Image.Image, notes: set[str]) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the pixels as stored (noted)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
        if orientation in range(2, 9):
            notes.add("exif_rotated")
            return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - EXIF is metadata: the photo itself is still usable
        notes.add("exif_unreadable")
    return img


def _to_rgb(img: Image.Image, background: tuple[int, int, int], notes: set[str]) -> np.ndarray:
    if img.mode.startswith("I;16"):
        notes.update(("16bit", "greyscale"))
        # 0..65535 -> 0..255 by table: (v + 128) // 257 without a uint32 copy of the image (4 bytes a pixel)
        return np.repeat(_LUT16[np.asarray(img)][..., None], 3, axis=2)
    if img.mode in ("I", "F"):
        # 32-bit int / float greyscale: 16-bit range when above 255 (PIL's usual reading of 16-bit data)
        notes.update(("16bit" if img.mode == "I" else "float", "greyscale"))
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr / (257.0 if arr.max() > 255 else 1.0)), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "CMYK":
        notes.add("cmyk")
    if img.mode in ("1", "L", "LA", "La"):
        notes.add("greyscale")
    if img.mode in ("P", "PA"):
        notes.add("palette")
        has_alpha = img.mode == "PA" or "transparency" in img.info or getattr(img.palette, "mode", "") == "RGBA"
        img = img.convert("RGBA") if has_alpha else img.convert("RGB")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        notes.add("alpha_flattened")
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        img = canvas
    return _rgb_array(img if img.mode == "RGB" else img.convert("RGB"))


_LUT16 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)
STRIPE_ROWS = 256  # rows copied out of PIL at a time (see _rgb_array)


def _rgb_array(img: Image.Image) -> np.ndarray:
    """A writable (H, W, 3) uint8 copy of an RGB PIL image.

    ``np.asarray(img)`` goes through ``img.tobytes()`` (its chunks, then their join) and peaks near three
    copies of the image; stripes of :data:`STRIPE_ROWS` rows keep the peak at PIL's image plus the array
    (measured on a 49 MP JPEG: 670 -> 360 MB over the process, at the same speed). Same pixels either way.
    """
    w, h = img.size
    if h <= STRIPE_ROWS:
        return np.array(img, dtype=np.uint8)
    out = np.empty((h, w, 3), np.uint8)
    for y in range(0, h, STRIPE_ROWS):  # stripes of rows, not pixels: 28 copies for a 7000-row image
        out[y:y + STRIPE_ROWS] = np.asarray(img.crop((0, y, w, min(h, y + STRIPE_ROWS))))
    return out


def image_pixels(raw: bytes) -> int:
    """Width x height from the header (no pixel decoded); 0 when the bytes are not an image PIL opens. Lets a
    server reserve memory for a decode before it starts."""
    try:
        return int(np.prod(_open(raw).size))
    except ImageError:
        return 0


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W, 3) uint8 to (size, size, 3); area filter when shrinking, cubic when growing."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive), sorted by relative path."""
    root = Path(root)
    return [root / n for n in scan_folder(root)[0]]


def scan_folder(root: str | Path) -> tuple[list[str], list[str]]:
    """(image files, other files) under ``root`` as sorted relative POSIX paths, recursive.

    Hidden files and folders (``.DS_Store``, ...) are left out of both. ``os.scandir`` rather than
    ``rglob``: one stat per entry matters at 500k files.
    """
    root = Path(root)
    images: list[str] = []
    others: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir():
                    stack.append(name)
                elif entry.is_file():
                    ext = os.path.splitext(entry.name)[1].lower()
                    (images if ext in IMAGE_EXTENSIONS else others).append(name)
    return sorted(images), sorted(others)
