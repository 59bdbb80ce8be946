"""TTA views (``ensemble_predict.tta``): ``identity``, ``hflip``, ``vflip``, ``rot90``, ``rot180``, ``rot270``
(``torch.rot90`` of the model input), ``scale<f>`` (the model input resized to ``round(f * img_size)``
pixels instead of ``img_size``; the backbones pool globally, so any size works), and ``+``-joined
combinations (``hflip+scale1.25``). The 3rd-place team's 6-view TTA is e.g.
``[identity, hflip, scale0.875, hflip+scale0.875, scale1.125, hflip+scale1.125]``.

``crops<N>`` (N = 4, 9 or 16): the mean over N = k x k native-pixel crops spread evenly over the stage-1 image
(:func:`dfpipe.data.preprocess.crop_grid`: corners included, with k = 3 the central crop too) instead of the
one central crop, for experts whose input mode crops (``crop``, ``resize_short_crop``): an expert that reads
128 x 128 native pixels of a 512 x 512 image sees 1/16 of it through one crop. Deterministic. It joins the
others with ``+`` (``crops4+hflip``: each crop mirrored). An expert whose input is the whole resized image
(``resize``) sees that one image for it (N copies would average to the same score). The card's ``tta`` holds
the names, so the CLI, the API and the submission score with the same crops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError

GEOMETRIC = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270")
TTA_VIEWS = GEOMETRIC + ("scale<f>", "crops<N>")
_SCALE = re.compile(r"^scale(\d+(?:\.\d+)?)$")
_CROPS = re.compile(r"^crops(4|9|16)$")


@dataclass(frozen=True)
class View:
    """One TTA view: a geometric transform of the model input at ``scale`` x the expert's size."""

    name: str
    geo: str = "identity"
    scale: float = 1.0
    crops: int = 1  # > 1: the mean over a grid of this many native-pixel crops (crop input modes)

    def size(self, img_size: int) -> int:
        return max(8, int(round(self.scale * img_size)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the same batch seen through this view's flip/rotation."""
        return _GEO[self.geo](x)


# (B, 3, H, W) -> the batch flipped / rotated: a table, so that a batch of views is one call (:func:`view_batch`)
_GEO = {"identity": lambda x: x,
        "hflip": lambda x: torch.flip(x, dims=[3]), "vflip": lambda x: torch.flip(x, dims=[2]),
        "rot90": lambda x: torch.rot90(x, 1, dims=(2, 3)), "rot180": lambda x: torch.rot90(x, 2, dims=(2, 3)),
        "rot270": lambda x: torch.rot90(x, 3, dims=(2, 3))}


def view_batch(views: list[View], x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) model inputs of one size -> (V B, 3, H, W): view v of image b at row v B + b, every view in one
    batch (the model runs once per size, not once per view)."""
    if len(views) == 1:
        return _GEO[views[0].geo](x)
    return torch.cat([_GEO[v.geo](x) for v in views])


def parse_view(name: str) -> View:
    """``identity`` | ``hflip`` | ``vflip`` | ``rot90`` | ``rot180`` | ``rot270`` | ``scale<f>`` | ``crops<N>``,
    or several of them (at most one geometric, one scale, one crops) joined by ``+``; f in [0.25, 4], N in
    {4, 9, 16}."""
    geo, scale, crops = None, None, None
    for part in name.split("+"):
        m = _SCALE.match(part)
        c = _CROPS.match(part)
        if m and scale is None and 0.25 <= float(m.group(1)) <= 4:
            scale = float(m.group(1))
        elif c and crops is None:
            crops = int(c.group(1))
        elif part in GEOMETRIC and geo is None:
            geo = part
        else:
            raise ConfigError(f"unknown TTA view {name!r}; choose from {TTA_VIEWS} or one geometric + one "
                             "scale + one crops joined by '+', with f in [0.25, 4] and N in {4, 9, 16}")
    return View(name, geo or "identity", 1.0 if scale is None else scale, crops or 1)
