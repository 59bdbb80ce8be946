"""The artifact expert (``arch: artifact``): a fixed residual front, then a backbone cut after its first stages.

SAFE (Li et al., KDD 2025) and FerretNet (NeurIPS 2025) detect generated images from a generator's pixel traces
with small networks (1.44 M, 1.06 M parameters): a fixed high-pass front (SAFE: wavelet detail bands; FerretNet:
a masked median residual) on native-pixel crops, then only the first stages of a CNN (SAFE: a ResNet-18 cut
after ``layer2``, from scratch). The shallow stages see local pixel statistics; the deep ones learn content, which
is what does not transfer to unseen generators.

Here: ``front`` (:mod:`dfpipe.models.residual`: ``dwt`` | ``median`` | ``npr`` | ``none``) -> the first ``stages``
stages of an EfficientNet-family timm backbone (``conv_stem``, ``bn1``, ``blocks[:stages]``: tf_efficientnet_lite*,
mobilenetv2_*; ``stages: 0`` keeps the whole backbone) -> global average pool -> the heads of
:class:`~dfpipe.models.registry.Expert` (same forward contract, same description round trip). ``pretrained:
bundled`` loads the ImageNet weights of those first stages; ``pretrained: none`` trains the same layers from
scratch, as SAFE does. With the ``dwt`` front (3 bands per channel, half resolution) the stem convolution takes
9 channels: its pretrained 3-channel weights are repeated over the bands and scaled by 3/9 (timm's
``adapt_input_conv``), so a flat band response starts where the RGB one did.

The expert reads native pixels: with a front or a cut its training config must use ``input_mode: crop`` (the
builder refuses ``resize`` / ``resize_short_crop``, which interpolate the traces away).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
from timm.models import adapt_input_conv
from torch import nn

from ..data.preprocess import InputPolicy, InputSpec
from ..errors import ConfigError
from .info import InfoHeads
from .registry import ARCH_OPTIONS, EXPERTS, NUM_CLASSES, Expert, freeze_backbone_weights
from .residual import apply_front, front_channels

log = logging.getLogger(__name__)

# torch.fx records the front as one call (the median / npr fronts slice and pool by the input's size): an
# artifact expert can then still be traced to fold its BatchNorms at load time (ensemble_predict.experts)
torch.fx.wrap("apply_front")


class StagesBackbone(nn.Module):
    """The stem and the first ``stages`` stages of a timm EfficientNet-family model, pooled.

    ``forward_features(x)``: (B, C_in, H, W) -> (B, D, H / r, W / r), r = the cut's reduction (4 after 2 stages of
    Lite0); ``forward(x)``: (B, D) average over positions. ``num_features`` = D, ``pretrained_cfg`` the source
    model's (its normalisation).
    """

    def __init__(self, model: nn.Module, stages: int) -> None:
        super().__init__()
        if not all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks")):
            raise ConfigError(f"stages: {stages} needs an EfficientNet-family backbone (conv_stem, bn1, blocks: "
                              f"tf_efficientnet_lite*, mobilenetv2_*), not {type(model).__name__}")
        if not 1 <= stages <= len(model.blocks):
            raise ConfigError(f"stages: {stages}: this backbone has {len(model.blocks)} stages")
        self.conv_stem, self.bn1 = model.conv_stem, model.bn1
        self.blocks = nn.Sequential(*list(model.blocks)[:stages])
        self.pretrained_cfg = model.pretrained_cfg
        self.num_features = _out_channels(self.blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))  # (B, D)


def _out_channels(blocks: nn.Module) -> int:
    """Output width of a stack of timm blocks: that of its last convolution."""
    convs = [m for m in blocks.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


def _widen_stem(conv: nn.Conv2d, in_channels: int, pretrained: str) -> None:
    """Let the stem convolution take ``in_channels`` inputs (in place, its type kept: timm's Conv2dSame too)."""
    if conv.in_channels == in_channels:
        return
    with torch.no_grad():
        if pretrained == "none":  # the init timm's EfficientNet uses (fan-out normal), for the new shape
            weight = torch.empty(conv.out_channels, in_channels, *conv.kernel_size)
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            weight.normal_(0.0, (2.0 / fan_out) ** 0.5)
        else:
            weight = adapt_input_conv(in_channels, conv.weight.detach().clone())
    conv.weight = nn.Parameter(weight)
    conv.in_channels = in_channels


class ArtifactExpert(Expert):
    """:class:`Expert` with a fixed residual front and (``stages`` > 0) a backbone cut after its first stages."""

    OPTIONS = ARCH_OPTIONS  # front, stages

    def __init__(self, backbone: str, input: InputSpec | InputPolicy, *, pretrained: str = "bundled",  # noqa: A002
                 dropout: float = 0.2, arch: str = "artifact", proj_dim: int = 0, info_heads: int = 0,
                 freeze_backbone: bool = False, front: str = "none", stages: int = 0) -> None:
        check_native(front, int(stages), input.mode)
        super().__init__(backbone, input, pretrained=pretrained, dropout=dropout, arch=arch, proj_dim=proj_dim,
                         info_heads=info_heads, freeze_backbone=False)
        self.front, self.stages = front, int(stages)
        if self.stages:
            self.backbone = StagesBackbone(self.backbone, self.stages)
        _widen_stem(self.backbone.conv_stem, front_channels(front), pretrained)
        self.freeze_backbone = bool(freeze_backbone)
        if self.backbone.num_features != self.feat_dim:  # a cut backbone is narrower: heads for its width
            self.feat_dim = int(self.backbone.num_features)
            self._make_heads()
        if self.freeze_backbone:
            freeze_backbone_weights(self.backbone, backbone, pretrained)

    def _make_heads(self) -> None:
        """The heads of :class:`Expert` (classifier, projection, local branches) for the current ``feat_dim``."""
        head_dim = self.feat_dim
        if self.info_heads:
            self.info = InfoHeads(self.feat_dim, self.info_heads, self.dropout)
            head_dim = self.info.dim
        self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(head_dim, NUM_CLASSES))
        if self.proj_dim > 0:
            hidden = max(self.proj_dim, head_dim // 2)
            self.proj = nn.Sequential(nn.Linear(head_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, self.proj_dim))

    def filter_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> the front's output in fp32 (dwt: (B, 9, H // 2, W // 2))."""
        return x if self.front == "none" else apply_front(self.front, x)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "front": self.front, "stages": self.stages}


def check_native(front: str, stages: int, mode: str) -> None:
    """A front or a cut reads pixel traces: the input must be cropped at native resolution."""
    if (front != "none" or stages) and mode != "crop":
        raise ConfigError(f"arch artifact with front {front!r} / stages {stages} reads native pixels: set "
                          f"input_mode: crop (got {mode!r}, which resamples the image and smears the traces the "
                          "front keeps)")


EXPERTS.register("artifact", ArtifactExpert)
