"""Fixed residual fronts of the artifact expert: high-pass views of the input that keep a generator's pixel traces.

Each front is a parameter-free function of a batch, on its device, computed in fp32 whatever autocast says
(:func:`apply_front`): the traces are differences of neighbouring pixels, often a few 1/255ths, which bf16
(8 significant bits) would round away next to the image content. They work on the *normalised* input, so a
residual is the pixel residual divided by the expert's std.

* ``dwt`` (SAFE, Li et al. KDD 2025): one level of the orthonormal Haar wavelet transform, keeping the three
  detail bands and dropping the approximation (LL). ``(B, C, H, W) -> (B, 3C, H // 2, W // 2)``: for each input
  channel c, channels ``3c, 3c+1, 3c+2`` are LH, HL, HH (pywt's ``dwt2(x, "haar")`` cH, cV, cD, signs included).
  A fixed 2x2 depthwise convolution of stride 2; an odd last row / column is dropped. SAFE itself keeps HH of a
  bior1.3 transform and resizes it back to H x W; here all three Haar bands stay at half resolution (no resize,
  the transform is orthonormal: nothing of the high-pass content is lost, nothing is interpolated).
* ``median`` (FerretNet, NeurIPS 2025): x minus the median of its 8 neighbours, the centre excluded (the median
  of 8 values: the mean of the 4th and 5th smallest), reflect-padded borders. ``(B, C, H, W) -> (B, C, H, W)``.
  A median follows edges, so straight edges and flat areas give 0; isolated deviations (sensor noise,
  up-sampling patterns, checkerboards) stay.
* ``npr`` (Tan et al., CVPR 2024): :func:`dfpipe.models.registry.npr`, x minus its nearest-neighbour down-up
  sampled copy. ``(B, C, H, W) -> (B, C, H, W)``.
* ``none``: the input itself.
"""

from __future__ import annotations

import typing
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import ExpertConfig
from ..errors import ConfigError
from .registry import npr

FRONTS: tuple[str, ...] = typing.get_args(typing.get_type_hints(ExpertConfig)["front"])  # none, dwt, median, npr

# pywt's orthonormal Haar detail filters of a 2x2 cell [[a, b], [c, d]] (rows, columns): (3, 2, 2)
_HAAR_DETAIL = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]],  # LH (pywt cH): top row minus bottom row
                             [[1.0, -1.0], [1.0, -1.0]],  # HL (pywt cV): left column minus right column
                             [[1.0, -1.0], [-1.0, 1.0]]]) / 2.0  # HH (pywt cD): the diagonals' difference


def haar_highpass(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 3C, H // 2, W // 2): the Haar LH, HL, HH bands of each channel (module docstring)."""
    c = x.shape[1]
    w = _HAAR_DETAIL.to(device=x.device, dtype=x.dtype).repeat(c, 1, 1).unsqueeze(1)  # (3C, 1, 2, 2)
    return F.conv2d(x, w, stride=2, groups=c)


# Batcher's odd-even merge sort of 8 values, less the two comparators that touch neither the 4th nor the 5th
# smallest: 17 compare-exchanges (elementwise min / max of whole tensors) leave them at positions 3 and 4.
# 12x faster on the CPU than torch.sort over a stacked dimension, and exact (tests: the 0-1 principle)
_MIDDLE_OF_8 = ((0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (1, 2), (5, 6),
                (0, 4), (1, 5), (2, 6), (3, 7), (2, 4), (3, 5), (3, 4))


def middle_of_8(v: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4th and 5th smallest of 8 same-shaped tensors, elementwise."""
    v = list(v)
    for i, j in _MIDDLE_OF_8:
        v[i], v[j] = torch.minimum(v[i], v[j]), torch.maximum(v[i], v[j])
    return v[3], v[4]


def median_residual(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): x minus the median of its 8 neighbours (centre excluded; H, W >= 2)."""
    h, w = x.shape[-2], x.shape[-1]
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, C, H + 2, W + 2)
    nb = [p[..., dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]  # 8 shifts
    lo, hi = middle_of_8(nb)
    return x - 0.5 * (lo + hi)  # the median of an even count: the mean of the two middle values


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


_FUNCS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": identity, "dwt": haar_highpass, "median": median_residual, "npr": npr}


def front_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The front called ``name`` (one of :data:`FRONTS`)."""
    if name not in _FUNCS:
        raise ConfigError(f"unknown residual front {name!r}; choose one of {list(FRONTS)}")
    return _FUNCS[name]


def front_channels(name: str, in_channels: int = 3) -> int:
    """How many channels the front ``name`` gives for ``in_channels`` (dwt: three bands per channel)."""
    front_fn(name)
    return 3 * in_channels if name == "dwt" else in_channels


def apply_front(name: str, x: torch.Tensor) -> torch.Tensor:
    """``front_fn(name)(x)`` in fp32 with autocast off on both device types (named as constants so that
    torch.fx can trace an expert holding it, for BatchNorm folding)."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        return _FUNCS[name](x.float())

