"""Expert (real/fake classifier) registry, DeepfakeBench style: ``@EXPERTS.register("timm")``.

An expert is a timm backbone giving pooled features plus a 2-way head (class 1 = fake). It describes
itself (``describe()``), so a checkpoint holding that description and a state_dict can be rebuilt with
``expert_from_description`` without the original params.yaml and without downloading anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from ..config import ExpertConfig
from .pretrained import create_backbone, normalization

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

NUM_CLASSES = 2  # 0 = real, 1 = fake
DEFAULT_DROPOUT = ExpertConfig.dropout


class Registry:
    """Name -> builder. Registering a taken name is an error, so two modules cannot silently collide."""

    def __init__(self, kind: str = "expert") -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


EXPERTS = Registry("expert")


class Expert(nn.Module):
    """timm backbone (pooled features) + dropout + Linear(D, 2).

    ``forward(x)`` with x (B, 3, H, W) normalised by ``mean``/``std`` returns
    ``{"logits": (B, 2), "prob": (B,) softmax probability of fake, "feat": (B, D) pooled feature}``.
    """

    def __init__(self, backbone: str, img_size: int, pretrained: str = "bundled", dropout: float = DEFAULT_DROPOUT,
                 arch: str = "timm") -> None:
        super().__init__()
        self.backbone_name = backbone
        self.img_size = int(img_size)
        self.arch = arch
        self.dropout = float(dropout)
        self.backbone = create_backbone(backbone, pretrained=pretrained, num_classes=0)  # x -> (B, D)
        self.feat_dim = int(self.backbone.num_features)  # D, e.g. 1280 for tf_efficientnet_lite0
        self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(self.feat_dim, NUM_CLASSES))  # (B, D) -> (B, 2)
        self.mean, self.std = normalization(self.backbone)  # 3-tuples the input pipeline must use

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.backbone(x)  # (B, D)
        logits = self.head(feat)  # (B, 2)
        prob = torch.softmax(logits.float(), dim=1)[:, 1]  # (B,) fp32 even under autocast
        return {"logits": logits, "prob": prob, "feat": feat}

    def describe(self) -> dict[str, Any]:
        """Everything needed to rebuild this architecture and feed it correctly (JSON-serialisable)."""
        return {"arch": self.arch, "backbone": self.backbone_name, "img_size": self.img_size,
                "mean": list(self.mean), "std": list(self.std), "num_classes": NUM_CLASSES,
                "dropout": self.dropout}


@EXPERTS.register("timm")
def build_timm_expert(cfg: ExpertConfig, pretrained: str | None = None, dropout: float | None = None) -> Expert:
    """The default expert. Builders take (cfg, pretrained=None, dropout=None); ``pretrained`` overrides
    ``cfg.pretrained`` (``"none"`` when rebuilding from a checkpoint), ``dropout`` ``cfg.dropout``."""
    return Expert(cfg.backbone, cfg.img_size, pretrained=cfg.pretrained if pretrained is None else pretrained,
                  dropout=cfg.dropout if dropout is None else dropout, arch="timm")


def build_expert(cfg: ExpertConfig, arch: str | None = None) -> Expert:
    """Build the expert registered as ``arch`` (default ``cfg.arch``); weights as ``cfg.pretrained`` says."""
    return EXPERTS.get(arch or cfg.arch)(cfg)


def expert_from_description(desc: dict[str, Any]) -> Expert:
    """Rebuild the architecture ``describe()`` produced, randomly initialised, ready for load_state_dict.

    Extra keys (e.g. ``cache_size`` added by training) are ignored; mean/std come from the description
    since they are what the checkpoint was trained with.
    """
    num_classes = int(desc.get("num_classes", NUM_CLASSES))
    if num_classes != NUM_CLASSES:
        raise ValueError(f"expert description has num_classes={num_classes}; only {NUM_CLASSES} is supported")
    cfg = ExpertConfig(backbone=desc["backbone"], img_size=int(desc["img_size"]), pretrained="none")
    dropout = float(desc.get("dropout", DEFAULT_DROPOUT))
    expert = EXPERTS.get(desc.get("arch", "timm"))(cfg, pretrained="none", dropout=dropout)
    if "mean" in desc and "std" in desc:
        expert.mean = tuple(float(v) for v in desc["mean"])
        expert.std = tuple(float(v) for v in desc["std"])
    return expert
