"""Pair parity: a real image and its reconstruction end with one compression and resize history.

A detector trained on (real, reconstruction) pairs learns whatever tells the two apart. If the real is
a JPEG and the reconstruction a lossless PNG, or the two were compressed at different qualities, the
cheapest cue is "compressed differently" (Dual Data Alignment, 2025), not the decoder's trace. So:

* **parity**: the reconstruction is re-encoded with its real's own last compression: the real's JPEG
  quantisation tables and chroma subsampling, read from the stored bytes (:func:`jpeg_history`);
* **post-processing** drawn once per pair (:func:`draw_post`) and applied to both images: an optional
  resize, then JPEG or WebP at a drawn quality; a share of pairs is left clean, so the decoder's traces
  stay learnable (strong JPEG wipes them out);
* **fit**: a real larger than ``max_side`` is downscaled before reconstruction, and the pair's real image
  is that downscaled copy (the resize is in both histories, and the model runs at a bounded size).

Each image ends as encoded bytes (:func:`finish`): JPEG, WebP or, with no lossy step, PNG. Decoding
them with :func:`dfpipe.data.images.decode_image` (the decoder that reads every real) gives the pixels
the stage stores.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from PIL import Image, JpegImagePlugin

from ...config import ReconstructConfig
from ...data.images import decode_image
from ...data.store import encode_png
from ...errors import ConfigError

SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}  # PIL's get_sampling codes
INTERP = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
FORMATS = ("jpeg", "webp")


@dataclass(frozen=True)
class JpegHistory:
    """The last compression of a JPEG file: what a re-encode needs to give the same file structure."""

    qtables: tuple[tuple[int, ...], ...]  # as PIL reads them, in table order (luma first)
    subsampling: int  # PIL code: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0, -1 = other (PIL's default then)
    grey: bool  # a one-component (greyscale) JPEG

    @property
    def quality(self) -> int:
        """The IJG quality whose luma table is closest to this one (an estimate: tables may be custom)."""
        return estimate_quality(self.qtables[0])

    def record(self) -> dict:
        digest = hashlib.sha1(np.asarray(self.qtables, np.int32).tobytes()).hexdigest()[:12]
        return {"format": "jpeg", "quality": self.quality, "subsampling": SUBSAMPLING.get(self.subsampling, "other"),
                "grey": self.grey, "n_tables": len(self.qtables), "qtables_sha1": digest}


def jpeg_history(data: bytes) -> JpegHistory | None:
    """The quantisation tables and subsampling of JPEG bytes; None for any other format."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    with Image.open(io.BytesIO(data)) as im:
        if not isinstance(im, JpegImagePlugin.JpegImageFile) or not im.quantization:
            return None
        tables = tuple(tuple(int(v) for v in im.quantization[k]) for k in sorted(im.quantization))
        grey = im.mode == "L"
        sampling = -1 if grey else JpegImagePlugin.get_sampling(im)
    return JpegHistory(tables, sampling, grey)


@functools.lru_cache(maxsize=1)
def _ijg_luma_tables() -> np.ndarray:
    """(100, 64) luma tables of IJG qualities 1..100, as PIL writes and reads them (same table order)."""
    tiny = Image.new("RGB", (8, 8))
    out = []
    for q in range(1, 101):
        buf = io.BytesIO()
        tiny.save(buf, format="JPEG", quality=q)
        with Image.open(buf) as im:
            out.append(im.quantization[0])
    return np.asarray(out, np.int32)


def estimate_quality(luma: tuple[int, ...]) -> int:
    return int(np.abs(_ijg_luma_tables() - np.asarray(luma, np.int32)).sum(axis=1).argmin()) + 1


def encode_jpeg_like(img: np.ndarray, history: JpegHistory) -> bytes:
    """JPEG bytes of (H, W, 3) uint8 RGB ``img`` with ``history``'s quantisation tables and subsampling."""
    pil = Image.fromarray(img)
    if history.grey:
        pil = pil.convert("L")
    kwargs = {"qtables": [list(t) for t in history.qtables]}
    if history.subsampling in SUBSAMPLING:
        kwargs["subsampling"] = history.subsampling
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def encode(img: np.ndarray, fmt: str, quality: int) -> bytes:
    """``img`` as JPEG or WebP bytes at ``quality`` (PIL, 4:2:0 JPEG as most web encoders write)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt.upper(), quality=int(quality))
    return buf.getvalue()


# --------------------------------------------------------------------------- per-pair post-processing
@dataclass(frozen=True)
class Post:
    """What happens to both images of a pair, drawn once per pair (:func:`draw_post`)."""

    fit: tuple[int, int] | None = None  # (h, w): the real is downscaled to this before reconstruction
    resize: float | None = None  # factor of a downscale after reconstruction (both images)
    interp: str = "area"
    compress: str | None = None  # jpeg | webp | None: the last step (both images)
    quality: int = 0

    @property
    def clean(self) -> bool:
        """No post-processing: the pair keeps the real's own history only."""
        return self.resize is None and self.compress is None

    @property
    def new_real(self) -> bool:
        """The pair's real image differs from the stored real: a new real (label 0) image."""
        return self.fit is not None or not self.clean

    def record(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def check_post_config(r: ReconstructConfig) -> None:
    """Reject settings :func:`draw_post` cannot use, naming the key."""
    def bad(key: str, value: object, need: str) -> ConfigError:
        return ConfigError(f"augment_sd.reconstruct.{key}: {need}, got {value}")

    for key in ("clean_share", "resize_prob", "webp_share"):
        if not 0.0 <= getattr(r, key) <= 1.0:
            raise bad(key, getattr(r, key), "need a share in [0, 1]")
    lo, hi = r.resize_range
    if not 0.0 < lo <= hi < 1.0:
        raise bad("resize_range", list(r.resize_range), "need 0 < low <= high < 1 (a downscale)")
    for key in ("jpeg_quality", "webp_quality"):
        lo, hi = getattr(r, key)
        if not 1 <= lo <= hi <= 100:
            raise bad(key, list(getattr(r, key)), "need 1 <= low <= high <= 100")
    if r.max_side < 0:
        raise bad("max_side", r.max_side, "need >= 0 (0 = no limit)")


def draw_post(seed: int, r: ReconstructConfig, h: int, w: int) -> Post:
    """The pair's post-processing from its seed alone (so the real's copy and the fake agree)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    fit = None
    if r.max_side and max(h, w) > r.max_side:
        s = r.max_side / max(h, w)
        fit = (max(1, round(h * s)), max(1, round(w * s)))
    if rng.random() < r.clean_share:
        return Post(fit=fit)
    resize = interp = None
    if rng.random() < r.resize_prob:
        resize = round(float(rng.uniform(*r.resize_range)), 4)
        interp = str(rng.choice(list(INTERP)))
    fmt = "webp" if rng.random() < r.webp_share else "jpeg"
    lo, hi = r.webp_quality if fmt == "webp" else r.jpeg_quality
    return Post(fit=fit, resize=resize, interp=interp or "area", compress=fmt, quality=int(rng.integers(lo, hi + 1)))


def fit(img: np.ndarray, post: Post) -> np.ndarray:
    """The pair's starting image: ``img``, or its downscale to ``post.fit``."""
    if post.fit is None or img.shape[:2] == post.fit:
        return img
    h, w = post.fit
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def finish(img: np.ndarray, post: Post, history: JpegHistory | None = None) -> bytes:
    """Encoded bytes of one image of a pair after its shared history.

    ``history``: for the reconstruction, its real's last JPEG compression, re-applied first (None for the
    real itself, which already has it, for a real that is not a JPEG, and after a fit, which resampled it).
    Then the pair's resize and compression. With no lossy step at all, a lossless PNG.
    """
    data = None
    if history is not None and post.fit is None:
        data = encode_jpeg_like(img, history)
        img = decode_image(data)
    if post.resize is not None:
        h, w = img.shape[:2]
        size = (max(1, round(w * post.resize)), max(1, round(h * post.resize)))
        img, data = cv2.resize(img, size, interpolation=INTERP[post.interp]), None
    if post.compress is not None:
        data = encode(img, post.compress, post.quality)
    return data if data is not None else encode_png(img)


def real_bytes(raw: bytes, img: np.ndarray, post: Post) -> bytes:
    """The encoded real image of a pair: the stored real's own bytes (``raw``, decoding to ``img``) when
    nothing changes it, else ``img`` after the pair's fit, resize and compression."""
    return finish(fit(img, post), post) if post.new_real else raw


def fake_bytes(made: np.ndarray, raw: bytes, post: Post) -> tuple[bytes, JpegHistory | None]:
    """The encoded reconstruction of a pair (``made``: the model's output on the pair's fitted real) and the
    real's JPEG history when it was re-applied (None: the real is not a JPEG, or a fit resampled it away)."""
    history = jpeg_history(raw) if post.fit is None else None
    return finish(made, post, history), history
