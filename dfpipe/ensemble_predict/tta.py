"""TTA views (``ensemble_predict.tta``): ``identity``, ``hflip``, ``vflip``, ``rot90``, ``rot180``, ``rot270``
(``torch.rot90`` of the model input), ``scale<f>`` (the model input resized to ``round(f * img_size)``
pixels instead of ``img_size``; the backbones pool globally, so any size works), and ``+``-joined
combinations (``hflip+scale1.25``). The 3rd-place team's 6-view TTA is e.g.
``[identity, hflip, scale0.875, hflip+scale0.875, scale1.125, hflip+scale1.125]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError

GEOMETRIC = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270")
TTA_VIEWS = GEOMETRIC + ("scale<f>",)
_SCALE = re.compile(r"^scale(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class View:
    """One TTA view: a geometric transform of the model input at ``scale`` x the expert's size."""

    name: str
    geo: str = "identity"
    scale: float = 1.0

    def size(self, img_size: int) -> int:
        return max(8, int(round(self.scale * img_size)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the same batch seen through this view's flip/rotation."""
        if self.geo == "hflip":
            return torch.flip(x, dims=[3])
        if self.geo == "vflip":
            return torch.flip(x, dims=[2])
        if self.geo.startswith("rot"):
            return torch.rot90(x, int(self.geo[3:]) // 90, dims=(2, 3))
        return x


def parse_view(name: str) -> View:
    """``identity`` | ``hflip`` | ``vflip`` | ``rot90`` | ``rot180`` | ``rot270`` | ``scale<f>``, or two
    of them (one geometric, one scale) joined by ``+``; f in [0.25, 4]."""
    geo, scale = None, None
    for part in name.split("+"):
        m = _SCALE.match(part)
        if m and scale is None and 0.25 <= float(m.group(1)) <= 4:
            scale = float(m.group(1))
        elif part in GEOMETRIC and geo is None:
            geo = part
        else:
            raise ConfigError(f"unknown TTA view {name!r}; choose from {TTA_VIEWS} or one geometric + one "
                             "scale joined by '+', with f in [0.25, 4]")
    return View(name, geo or "identity", 1.0 if scale is None else scale)
