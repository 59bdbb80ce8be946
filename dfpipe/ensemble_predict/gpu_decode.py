"""Opt-in decoding on the scoring device: ``Ensemble.score_files(..., decode="device")``.

The default path (``decode="workers"``, :class:`dfpipe.ensemble_predict.ensemble.FileDataset`) decodes every file
with PIL in the DataLoader workers and runs the preprocessing contract (:mod:`dfpipe.data.preprocess`)
there on the CPU. With ``decode="device"`` the workers only read each file's bytes and check its JPEG
header; the main process decodes the batch with ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG,
batched, on CUDA; libjpeg-turbo on the CPU) and runs the contract's geometric steps on the device
tensors: stage 1's ``max_side`` downscale, then each input policy (``crop``: a slice; ``resize`` /
``resize_short_crop``: :func:`area_resize` when shrinking, bicubic when enlarging, as the contract's
cv2 ``INTER_AREA`` / ``INTER_CUBIC``).

**Where it is used.** Only where the device decoder needs nothing of what :func:`dfpipe.data.images.decode`
does besides decoding: :func:`device_decodable` passes a file to the device only if it is a baseline
(SOF0) 8-bit JPEG with 1 (greyscale) or 3 (YCbCr) components, no EXIF / XMP orientation other than 1,
no multi-picture (MPO) index, no Adobe RGB transform, pixels within ``max_pixels``, and ending with its
end-of-image marker. Every other file (progressive, CMYK / YCCK, EXIF-rotated, PNG / WebP / ..., truncated,
unreadable) takes the CPU path in the worker that read it, so it gets exactly the contract's pixels or
its error. A file that passes the header check but fails on the device (nvJPEG refusing a sampling
layout, corrupt entropy data) is retried alone and then goes through the CPU path in the main process:
it scores as the workers path would score it, or comes back NaN with its error; it never fails its batch.
Face crops (``face_crop`` other than ``none``) run a CPU detector on the decoded image, and ``degrade``
functions are numpy functions of it: with either, ``score_files`` decodes in the workers (and logs why).
On a CPU device this path decodes in the main process, one file after another: there it serves to check
parity, and the workers path is the fast one.

**Parity, and why it is opt-in.** The device path's pixels may differ from the contract's:

* decoding: nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's (PIL's), so on CUDA pixels may
  differ by a few levels (not measured here: no GPU). On the CPU, torchvision 0.29's libjpeg-turbo gave
  pixels identical to Pillow 13's on every baseline test file (4:2:0, 4:2:2, 4:4:4, greyscale, quality
  40-100, and three files with corrupt entropy data), so a ``crop`` expert scores identically;
* resizing: :func:`area_resize` is cv2's ``INTER_AREA`` filter (bit-exact for whole factors, where cv2
  sums integers; for fractional boxes float64 against cv2's float32, so a value near .5 may round the
  other way), :func:`cubic_resize` is cv2's ``INTER_CUBIC`` in float against cv2's 11-bit fixed point.
  Measured on the CPU over 60 JPEGs of 20-300 px, every policy, ``max_side`` 0 and 150: resized pixels
  within 1 level of the contract's, 2 where a ``max_side`` shrink is followed by an enlargement; about 1 in
  10^3 pixels differs after a fractional ``max_side`` shrink, 1 in 10^4-10^5 otherwise. Scores of random
  64-px experts (40 JPEGs of 30-600 px, TTA identity + hflip): max abs difference 3.6e-5 (resize),
  9.2e-5 (resize_short_crop), 2.0e-6 (crop, its few enlarged images) without ``max_side``; 3.0e-4, 2.1e-4,
  5.0e-5 with ``max_side`` 256; a crop expert on images no resize touches: 0.

A detector is calibrated on the contract's pixels (stage 5's thresholds), so a path that may move them
by decoder or filter differences is a choice the caller makes, not the default.

On CUDA, :func:`decode_jpegs` drains the current stream before each decode: torchvision's nvJPEG decode
allocates its outputs on the caller's stream but writes them from a private stream that does not wait
for it, so it may overwrite a freed block that queued kernels still read (pytorch/vision#9606, seen on
H100). Scoring synchronises at the end of each batch anyway, so this costs nothing here.
"""

from __future__ import annotations

import logging
import struct
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data.preprocess import InputPolicy, Stage1, crop_grid, crop_origin
from ..device import num_workers

log = logging.getLogger(__name__)

DECODE_MODES = ("workers", "device")

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_SOF_NAMES = {0xC1: "extended sequential", 0xC2: "progressive", 0xC3: "lossless", 0xC5: "hierarchical",
              0xC6: "hierarchical progressive", 0xC7: "hierarchical lossless", 0xC9: "arithmetic",
              0xCA: "arithmetic progressive", 0xCB: "arithmetic lossless", 0xCD: "arithmetic hierarchical",
              0xCE: "arithmetic hierarchical progressive", 0xCF: "arithmetic hierarchical lossless"}


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int  # 1 (greyscale) or 3 (YCbCr)


def device_refusal(stage1: Stage1, degrade) -> str:
    """Why an ensemble's files cannot be decoded on the device at all ("" = they can)."""
    if stage1.face_crop != "none":
        return f"the experts' stage 1 crops faces (face_crop: {stage1.face_crop}), which runs on the CPU"
    if degrade is not None:
        return "a degrade function changes the decoded image on the CPU"
    return ""


def device_decodable(raw: bytes, max_pixels: int, min_side: int = 1) -> JpegHeader | str:
    """The JPEG header of ``raw`` if the device decoder gives the pixels :func:`dfpipe.data.images.decode`
    would (see the module docstring), else the reason it goes through the CPU path. Reads markers up to
    the first scan only: microseconds per file."""
    if not raw.startswith(_SOI):
        return "not a JPEG"
    if not raw.endswith(_EOI):
        return "no end-of-image marker at the end (truncated, or data appended)"
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS:  # past PIL's own bomb limit: left to the CPU path (dfpipe.data.images)
        limit = min(limit, 2 * Image.MAX_IMAGE_PIXELS)
    header: JpegHeader | None = None
    adobe_transform = None
    pos, n = 2, len(raw)
    try:
        while pos < n:
            if raw[pos] != 0xFF:
                return "malformed marker structure"
            while pos < n and raw[pos] == 0xFF:  # fill bytes
                pos += 1
            marker = raw[pos]
            pos += 1
            if marker == 0xD9:
                return "no image data"
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
                continue
            (length,) = struct.unpack(">H", raw[pos:pos + 2])
            seg = raw[pos + 2:pos + length]
            if length < 2 or len(seg) != length - 2:
                return "truncated header"
            pos += length
            if marker == 0xDA:  # start of scan: the header is all read
                break
            if marker == 0xE1 and seg.startswith(b"Exif\x00\x00"):
                orientation = _exif_orientation(seg[6:])
                if orientation in range(2, 9):
                    return f"EXIF orientation {orientation}"
            elif marker == 0xE1 and seg.startswith(b"http://ns.adobe.com/xap/1.0/") and b"Orientation" in seg:
                return "XMP orientation"  # PIL reads it when EXIF has none
            elif marker == 0xE2 and seg.startswith(b"MPF\x00"):
                return "multi-picture (MPO) file"
            elif marker == 0xEE and seg.startswith(b"Adobe") and len(seg) >= 12:
                adobe_transform = seg[11]
            elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if marker != 0xC0:
                    return f"not a baseline JPEG ({_SOF_NAMES.get(marker, hex(marker))})"
                if header is not None:
                    return "several frame headers"
                precision, h, w, nf = struct.unpack(">BHHB", seg[:6])
                if precision != 8:
                    return f"{precision}-bit samples"
                if nf not in (1, 3):
                    return f"{nf} colour components (CMYK / YCCK)" if nf == 4 else f"{nf} colour components"
                ids = bytes(seg[6 + 3 * k] for k in range(nf))
                if nf == 3 and ids == b"RGB":
                    return "RGB-coded JPEG"
                if h == 0 or w == 0:
                    return "no size in the frame header"
                header = JpegHeader(w, h, nf)
    except (struct.error, IndexError, KeyError, ValueError):
        return "unreadable header"  # the reasons are counted by kind (device_batches' stats): no details
    if header is None:
        return "no baseline frame header"
    if header.components == 3 and adobe_transform == 0:
        return "RGB-coded JPEG (Adobe transform 0)"
    if header.width * header.height > limit:
        return "too many pixels"
    if min(header.width, header.height) < min_side:
        return "too small"  # the CPU path refuses it, in the words of every input path
    return header


def _exif_orientation(tiff: bytes) -> int:
    """Orientation (tag 0x0112 of IFD0) of a TIFF-structured EXIF block; 1 if absent; raises if malformed."""
    order = {b"II": "<", b"MM": ">"}[tiff[:2]]
    magic, offset = struct.unpack(order + "HI", tiff[2:8])
    if magic != 42:
        raise ValueError("not a TIFF header")
    (count,) = struct.unpack(order + "H", tiff[offset:offset + 2])
    for k in range(count):
        entry = tiff[offset + 2 + 12 * k:offset + 14 + 12 * k]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag == 0x0112:
            if kind != 3:  # SHORT
                raise ValueError("orientation is not a SHORT")
            return struct.unpack(order + "H", entry[8:10])[0]
    return 1


# ----------------------------------------------------------------------------- workers: bytes or the CPU path
class BytesOrFitted(Dataset):
    """Items of ``fallback`` (a :class:`~dfpipe.ensemble_predict.ensemble.FileDataset`), or just the file's bytes
    when the device can decode it (:func:`device_decodable`). Items: ``(kind, payload, index, error,
    reason)`` with kind ``"bytes"`` (payload: 1-D uint8 tensor) or ``"fitted"`` (payload: the fallback's
    ``{policy key: uint8 (S, S, 3)}``; reason: why it is not on the device)."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __len__(self) -> int:
        return len(self.fallback)

    def __getitem__(self, i: int):
        try:
            raw = Path(self.fallback.paths[i]).read_bytes()
            got = device_decodable(raw, self.fallback.stage1.max_pixels, self.fallback.stage1.min_side)
        except OSError:
            got = "unreadable"
        if isinstance(got, JpegHeader):
            return "bytes", torch.frombuffer(bytearray(raw), dtype=torch.uint8), i, "", ""
        x, _, err = self.fallback[i]
        return "fitted", x, i, err, got


def collate_mixed(items: list) -> dict:
    """A batch of :class:`BytesOrFitted` items: the bytes as a list, the fitted inputs stacked."""
    raw = [it for it in items if it[0] == "bytes"]
    fit = [it for it in items if it[0] == "fitted"]
    return {"raw_index": [it[2] for it in raw], "raw": [it[1] for it in raw],
            "fit_index": [it[2] for it in fit], "fit_error": [it[3] for it in fit], "fit_reason": [it[4] for it in fit],
            "fit": {k: torch.stack([it[1][k] for it in fit]) for k in fit[0][1]} if fit else {}}


# ----------------------------------------------------------------------------- the device steps
def decode_jpegs(raws: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 (3, H, W) tensors on ``device`` (None for a file the decoder refuses): one batched call
    (nvJPEG on CUDA), then one call per file if the batch fails (a batched decode returns nothing when
    one image is bad)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not raws:
        return []
    on = device if device.type in ("cuda", "cpu") else torch.device("cpu")  # decode_jpeg knows these two
    if on.type == "cuda":
        torch.cuda.current_stream(on).synchronize()  # see the module docstring (pytorch/vision#9606)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        try:
            out: list = list(decode_jpeg(raws, mode=ImageReadMode.RGB, device=on))
        except Exception:  # noqa: BLE001 - find the bad file(s); the others still decode
            out = []
            for r in raws:
                try:
                    out.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=on))
                except Exception:  # noqa: BLE001 - this file goes through the CPU path
                    out.append(None)
    return [None if x is None else x.to(device) for x in out]


def _accum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # mps has no float64


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x + 0.5).floor_().clamp_(0, 255).to(torch.uint8)  # round half up, as cv2's integer paths


def _area_axis(x: torch.Tensor, n_out: int, dim: int) -> torch.Tensor:
    """Mean of each of ``n_out`` equal boxes along ``dim`` (fractional pixels at their edges), from the
    running sum: O(pixels) whatever the factor."""
    n = x.shape[dim]
    if n == n_out:
        return x
    scale = n / n_out
    edges = torch.arange(n_out + 1, dtype=x.dtype, device=x.device) * scale
    edges[-1] = n
    shape = [1] * x.dim()
    shape[dim] = n_out + 1
    first = edges.floor().long().clamp_(max=n - 1)  # the pixel each edge falls in
    frac = (edges - first).view(shape)
    csum = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.cumsum(dim)], dim)  # csum[i] = sum of x[:i]
    integral = csum.index_select(dim, first) + frac * x.index_select(dim, first)
    return (integral.narrow(dim, 1, n_out) - integral.narrow(dim, 0, n_out)) / scale


def area_resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, h, w), shrinking: each output pixel is the mean of the input area it covers,
    partly covered pixels weighted by their fraction: the filter of cv2's ``INTER_AREA`` (which the
    contract uses to shrink), computed in float64 and rounded once."""
    c, hi, wi = img.shape
    if (h, w) == (hi, wi):
        return img
    x = img.to(_accum_dtype(img.device))
    if hi % h == 0 and wi % w == 0:  # whole factors: cv2's fast path, rounded as it does (bit-exact)
        fy, fx = hi // h, wi // w
        total = x.reshape(c, h, fy, w, fx).sum((2, 4))
        if (fy, fx) == (2, 2):
            return _to_uint8(total / 4)  # (sum + 2) >> 2: half up
        return (total.float() * (1.0 / (fy * fx))).round_().clamp_(0, 255).to(torch.uint8)  # float, half even
    return _to_uint8(_area_axis(_area_axis(x, h, 1), w, 2))


def cubic_resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, h, w) bicubic (a = -0.75, half-pixel centres, edge pixels repeated, no
    antialiasing): cv2's ``INTER_CUBIC``, in float instead of its fixed point."""
    if (h, w) == tuple(img.shape[1:]):
        return img
    x = F.interpolate(img[None].float(), size=(h, w), mode="bicubic", align_corners=False)[0]
    return _to_uint8(x)


def stage1_on_device(img: torch.Tensor, s1: Stage1) -> torch.Tensor:
    """:func:`dfpipe.data.preprocess.downscale` of a (3, H, W) uint8 tensor (no face crop: see
    :func:`device_refusal`)."""
    h, w = img.shape[1:]
    if s1.max_side <= 0 or max(h, w) <= s1.max_side:
        return img
    s = s1.max_side / max(h, w)
    return area_resize(img, max(1, round(h * s)), max(1, round(w * s)))


def fit_on_device(img: torch.Tensor, policy: InputPolicy) -> torch.Tensor:
    """:func:`dfpipe.data.preprocess.fit` (test time: central crop) of a (3, H, W) uint8 tensor ->
    (size, size, 3) uint8, the same sizes and filters as the contract's cv2 calls."""
    size = policy.size
    h, w = img.shape[1:]
    if policy.mode == "resize":
        if (h, w) != (size, size):
            img = (area_resize if size < min(h, w) else cubic_resize)(img, size, size)
    else:
        short = min(h, w)
        if short != size and (policy.mode == "resize_short_crop" or short < size):
            s = size / short
            resize = area_resize if s < 1 else cubic_resize  # crop only ever enlarges (bicubic)
            img = resize(img, max(size, round(h * s)), max(size, round(w * s)))
        if policy.crops > 1:  # a grid of crops (TTA crops<N>): (N, size, size, 3)
            return torch.stack([img[:, y:y + size, x:x + size].permute(1, 2, 0)
                                for y, x in crop_grid(tuple(img.shape[1:]), size, policy.crops)])
        y0, x0 = crop_origin(tuple(img.shape[1:]), size, None)
        img = img[:, y0:y0 + size, x0:x0 + size]
    return img.permute(1, 2, 0).contiguous()


def inputs_on_device(img: torch.Tensor, s1: Stage1, policies) -> dict[str, torch.Tensor]:
    """A decoded (3, H, W) uint8 tensor -> ``{policy key: (S, S, 3) uint8}`` on its device."""
    img = stage1_on_device(img, s1)
    return {p.key: fit_on_device(img, p) for p in policies}


# ----------------------------------------------------------------------------- batches
def device_batches(ds, device: torch.device, batch_size: int, workers: int,
                   stats: Counter | None = None) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor],
                                                                    list[tuple[int, str]]]]:
    """``(indices, {policy key: uint8 (B, S, S, 3) on device}, [(index, error)])`` per batch of ``ds`` (a
    :class:`~dfpipe.ensemble_predict.ensemble.FileDataset`), decoding on ``device`` what it can (module docstring).

    ``stats`` (optional) counts ``"device"`` (decoded there), ``"cpu: <reason>"`` (sent to the CPU path
    by the header check) and ``"cpu: failed on the device"``; the counts are also logged at the end.
    """
    stats = Counter() if stats is None else stats
    loader = DataLoader(BytesOrFitted(ds), batch_size=batch_size, shuffle=False, num_workers=num_workers(workers),
                        collate_fn=collate_mixed, pin_memory=device.type == "cuda")
    keys = [p.key for p in ds.policies]
    for b in loader:
        index: list[int] = []
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        errors: list[tuple[int, str]] = []

        def add(i: int, x: dict[str, torch.Tensor]) -> None:
            index.append(i)
            for k in keys:
                parts[k].append(x[k].to(device, non_blocking=True))

        for i, img in zip(b["raw_index"], decode_jpegs(b["raw"], device)):
            x = None
            if img is not None:
                try:
                    x = inputs_on_device(img, ds.stage1, ds.policies)
                    stats["device"] += 1
                except Exception:  # noqa: BLE001 - e.g. out of device memory: the CPU path takes this file
                    x = None
            if x is None:  # the CPU path, here in the main process: the contract's pixels or its error
                stats["cpu: failed on the device"] += 1
                x, _, err = ds[i]
                if err:
                    errors.append((i, err))
                    continue
            add(i, x)
        for j, (i, err, why) in enumerate(zip(b["fit_index"], b["fit_error"], b["fit_reason"])):
            stats[f"cpu: {why}"] += 1
            if err:
                errors.append((i, err))
            else:
                add(i, {k: v[j] for k, v in b["fit"].items()})
        order = np.argsort(index, kind="stable")
        xs = {k: torch.stack([v[o] for o in order]) if v else torch.zeros((0, *p.shape), dtype=torch.uint8,
                                                                           device=device)
              for (k, v), p in zip(parts.items(), ds.policies)}
        yield np.asarray(index, dtype=np.int64)[order], xs, sorted(errors)
    on_cpu = sum(v for k, v in stats.items() if k != "device")
    if on_cpu:
        log.info("decode on %s: %d file(s) there, %d on the CPU path (%s)", device, stats["device"], on_cpu,
                 ", ".join(f"{k[5:]}: {v}" for k, v in sorted(stats.items()) if k != "device"))
