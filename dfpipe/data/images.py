"""Decode any image file to RGB uint8 safely; resize to the cache size.

Every failure is an :class:`ImageError` whose message says what is wrong, so a caller scanning a
500k folder can report and skip the file instead of dying on a traceback from inside PIL.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats we accept by content (the extension is not trusted).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEFAULT_MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    """An image that cannot be used; the message is the reason shown in reports."""


def decode_image(
    data: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    background: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array from a file path or raw bytes.

    EXIF orientation is applied; greyscale, palette, CMYK and 16-bit inputs are converted to RGB;
    alpha is flattened on ``background``; an animated image gives its first frame.
    """
    if isinstance(data, (str, Path)):
        path = Path(data)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    else:
        raw = data
    if not raw:
        raise ImageError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw))
        except UnidentifiedImageError:
            raise ImageError("not an image (unrecognised format)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError("decompression bomb (too many pixels)") from None
        except (OSError, SyntaxError, ValueError) as exc:  # e.g. a header cut short
            raise ImageError(f"corrupt or truncated image: {exc}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(f"too many pixels ({w}x{h} > {max_pixels})")
        if min(w, h) < min_side:
            raise ImageError(f"too small ({w}x{h}, min side {min_side})")
        try:
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"corrupt or truncated image: {exc}") from None
    return _to_rgb(img, background)


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the actual range of the data type
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr / (257.0 if arr.max() > 255 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        img = canvas
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


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
    return sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.relative_to(root).as_posix(),
    )
