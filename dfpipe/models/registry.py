"""Experts (real/fake classifiers), registered by name in :data:`dfpipe.registry.EXPERTS`: ``@EXPERTS.register("npr")``.

An expert is a timm backbone giving pooled features plus a 2-way head (class 1 = fake). A registered entry is an
:class:`Expert` subclass (or any callable taking the same arguments). The expert carries its input contract
(``expert.input``, a :class:`~dfpipe.data.preprocess.InputSpec`: size, mode, mean, std), built once from the
config and the backbone's pretrained normalisation. It describes itself (``describe()``: architecture and
``input``), so a checkpoint holding that description and a state_dict is rebuilt by
:func:`expert_from_description` without the original params.yaml and without downloading anything.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExpertConfig
from ..data.preprocess import InputPolicy, InputSpec
from ..errors import DataError
from ..registry import EXPERTS, Registry  # noqa: F401  (Registry: re-exported, it lived here)
from .info import InfoHeads
from .pretrained import create_backbone, normalization

log = logging.getLogger(__name__)

NUM_CLASSES = 2  # 0 = real, 1 = fake
# best.pt's layout (dfpipe.train_experts.checkpoint writes it, dfpipe.ensemble_predict.experts reads it).
# 2: the input contract stored once, as description["input"] (size, mode, mean, std), stage1 beside it
CHECKPOINT_FORMAT = 2
DEFAULT_DROPOUT = ExpertConfig.dropout
# ExpertConfig settings that only some archs take, at their "off" value: an arch that takes one lists it in its
# OPTIONS (dfpipe.models.artifact: front, stages); build_expert passes those that are set
ARCH_OPTIONS: dict[str, Any] = {"front": "none", "stages": 0}


class Expert(nn.Module):
    """timm backbone (pooled features) + dropout + Linear(D, 2), and optionally a projection head for NCE.

    ``input``: the input contract. An :class:`InputSpec` (from a checkpoint) is kept as it is; an
    :class:`InputPolicy` (size and mode, from the config) is completed with the backbone's pretrained mean/std.
    ``img_size``, ``mean`` and ``std`` read ``self.input``.

    ``forward(x)`` with x (B, 3, H, W) normalised by ``mean``/``std`` returns
    ``{"logits": (B, 2), "prob": (B,) softmax probability of fake, "feat": (B, D) pooled feature}``
    plus ``"proj": (B, proj_dim)`` when ``proj_dim > 0``; logits, prob and proj are fp32 even under
    autocast. The projection head is a small MLP (D -> D/2 -> proj_dim) whose output the contrastive
    term uses instead of ``feat``. Why: the pooled features of a ReLU network are all
    >= 0, so their cosine similarities are all positive and supervised InfoNCE on them stays near
    chance (log of the batch size); SimCLR / SupCon put the contrastive loss on such a head instead.

    With ``info_heads`` = n >= 2 the classifier reads, instead of the pooled feature, the fusion z (B, d) of n
    local branches on the backbone's feature map (:class:`dfpipe.models.info.InfoHeads`, d = D // n): then
    ``feat`` is z (fp32), and in training mode the output also holds ``info_logits`` (B, 2) and
    ``info_loo_logits`` (B, n, 2), the variational classifiers of the LIL / GIL terms (:mod:`dfpipe.losses`).

    With ``freeze_backbone`` the expert is a probe on frozen features (UnivFD, Ojha et al. 2023): the backbone's
    parameters do not require gradients, it stays in eval mode whatever ``train()`` is called with (its BN
    running statistics stay the pretrained ones, its dropout / drop-path are off) and runs under ``no_grad``;
    everything that reads its output trains: the classifier, the projection head, the local branches.
    A frozen expert's description and state_dict are those of a plain one: rebuilt for inference it scores the same.
    """

    # settings of ExpertConfig only some archs take (name -> its "off" value); build_expert passes those set
    OPTIONS: dict[str, Any] = {}

    def __init__(self, backbone: str, input: InputSpec | InputPolicy, *, pretrained: str = "bundled",  # noqa: A002
                 dropout: float = DEFAULT_DROPOUT, arch: str = "timm", proj_dim: int = 0, info_heads: int = 0,
                 freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.arch = arch
        self.dropout = float(dropout)
        self.proj_dim = int(proj_dim)
        self.info_heads = int(info_heads)
        self.freeze_backbone = bool(freeze_backbone)
        self.backbone = create_backbone(backbone, pretrained=pretrained, num_classes=0)  # x -> (B, D)
        self.feat_dim = int(self.backbone.num_features)  # D, e.g. 1280 for tf_efficientnet_lite0
        head_dim = self.feat_dim  # what the classifier (and the projection head) read: "feat"
        if self.info_heads:  # local branches on the feature map, fused into z (B, d): see dfpipe.models.info
            self.info = InfoHeads(self.feat_dim, self.info_heads, self.dropout)
            head_dim = self.info.dim
        self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(head_dim, NUM_CLASSES))  # (B, D) -> (B, 2)
        if self.proj_dim > 0:  # (B, D) -> (B, proj_dim), for the NCE term only
            hidden = max(self.proj_dim, head_dim // 2)
            self.proj = nn.Sequential(nn.Linear(head_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, self.proj_dim))
        if isinstance(input, InputSpec):  # a checkpoint's: what the weights were trained with
            self.input = input
        else:  # the config's size and mode, normalised as the backbone's pretrained weights expect
            self.input = InputSpec(input.size, input.mode, *normalization(self.backbone))
        if self.freeze_backbone:
            freeze_backbone_weights(self.backbone, backbone, pretrained)

    @property
    def img_size(self) -> int:
        return self.input.size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.input.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.input.std

    def train(self, mode: bool = True) -> Expert:
        """``nn.Module.train``, but a frozen backbone stays in eval mode (``eval()`` is ``train(False)``)."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def _backbone_context(self) -> contextlib.AbstractContextManager:
        """``no_grad`` around a frozen backbone: nothing in it trains, so autograd need not keep its activations
        (input gradients do not pass it either; an expert rebuilt from its checkpoint is not frozen)."""
        return torch.no_grad() if self.freeze_backbone else contextlib.nullcontext()

    def filter_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the backbone sees of the normalised input: the input itself (subclasses filter it)."""
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised input -> (B, D) pooled features."""
        with self._backbone_context():
            return self.backbone(self.filter_input(x))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised input -> (B, D, h, w), the backbone's last feature map (before pooling)."""
        with self._backbone_context():
            return self.backbone.forward_features(self.filter_input(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # The heads run in fp32 even under autocast: bf16 logits hold 8 significant bits, so a test set's
        # scores collapse to a few thousand distinct values and tie where TPR at FPR 1e-3 is read.
        # Small layers: the cost is nil next to the backbone. Both device types are named as
        # constants (not feat.device.type) so torch.fx can still trace the model (BatchNorm folding).
        info = {}
        if self.info_heads:
            fmap = self.feature_map(x)  # (B, D, h, w), bf16 under CUDA autocast
            with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
                info = self.info(fmap.float())  # z (B, d); in training also the variational heads' logits
            feat = info.pop("z")  # (B, d) fp32: the classifier's input
        else:
            feat = self.features(x)  # (B, D), bf16 under CUDA autocast
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            feat32 = feat.float()
            logits = self.head(feat32)  # (B, 2) fp32
            out = {"logits": logits, "prob": torch.softmax(logits, dim=1)[:, 1], "feat": feat}  # prob (B,)
            if self.proj_dim > 0:
                out["proj"] = self.proj(feat32)  # (B, proj_dim) fp32: NCE similarities at full precision
        return {**out, **info}

    def describe(self) -> dict[str, Any]:
        """Everything needed to rebuild this architecture and feed it correctly (JSON-serialisable): the
        architecture's arguments and ``input``, the input contract (the one place a checkpoint stores it)."""
        return {"arch": self.arch, "backbone": self.backbone_name, "num_classes": NUM_CLASSES,
                "dropout": self.dropout, "proj_dim": self.proj_dim,
                # only when on: the descriptions (and resume keys) of experts without branches stay as they were
                **({"info_heads": self.info_heads} if self.info_heads else {}),
                "input": self.input.to_dict()}


def freeze_backbone_weights(backbone: nn.Module, name: str, pretrained: str) -> None:
    """Take ``backbone`` out of training: no gradients, eval mode (the expert's ``train()`` keeps it there)."""
    backbone.requires_grad_(False)
    backbone.eval()
    if pretrained == "none":
        log.warning("freeze_backbone with pretrained: none: %s stays at its random initialisation, the heads "
                    "train on random features (a probe makes sense on pretrained ones)", name)


def npr(x: torch.Tensor) -> torch.Tensor:
    """Neighbouring pixel relationships (Tan et al., CVPR 2024): x minus its nearest-neighbour
    down-(x0.5)-then-up-sampled copy. (B, C, H, W) -> (B, C, H, W).

    Up-sampling layers of generators (GANs and diffusion decoders alike) leave correlations between
    adjacent pixels of each 2 x 2 cell; the residual keeps just those local relations and drops the
    content, which is why it transfers across generators better than the RGB image does.
    """
    h, w = x.shape[-2:]
    down = F.interpolate(x, size=(max(1, h // 2), max(1, w // 2)), mode="nearest")
    return x - F.interpolate(down, size=(h, w), mode="nearest")


EXPERTS.register("timm", Expert)  # the default expert


@EXPERTS.register("npr")
class NPRExpert(Expert):
    """The artifact expert: the same backbone and heads, fed the NPR residual (:func:`npr`) of its input."""

    def filter_input(self, x: torch.Tensor) -> torch.Tensor:
        return npr(x)


def build_expert(cfg: ExpertConfig, arch: str | None = None) -> Expert:
    """Build the expert registered as ``arch`` (default ``cfg.arch``); weights as ``cfg.pretrained`` says, input
    ``cfg.img_size`` x ``cfg.img_size`` taken by ``cfg.input_mode``, normalised as the backbone expects."""
    arch = arch or cfg.arch
    cls = EXPERTS.get(arch)
    # the arch's own settings, when set (ExpertConfig refuses them for an arch that does not take them)
    options = {k: getattr(cfg, k) for k in ARCH_OPTIONS if getattr(cfg, k) != ARCH_OPTIONS[k]}
    return cls(cfg.backbone, InputPolicy(cfg.input_mode, cfg.img_size), pretrained=cfg.pretrained,
               dropout=cfg.dropout, arch=arch, proj_dim=cfg.proj_dim, info_heads=cfg.info_heads,
               freeze_backbone=cfg.freeze_backbone, **options)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require gradients, in ``parameters()`` order: what the optimizer gets.

    All of them for a plain expert (the same list, so the same optimizer state); without the backbone's when
    it is frozen, so AdamW neither steps nor decays it, and ``last.pt`` holds no state for it.
    """
    return [p for p in model.parameters() if p.requires_grad]


def expert_from_description(desc: dict[str, Any], where: str = "expert description") -> Expert:
    """Rebuild the architecture ``describe()`` produced, randomly initialised, ready for load_state_dict, with the
    input contract ``desc["input"]`` it was trained with (mean/std included: nothing is recomputed).

    The expert is never frozen (``freeze_backbone`` is a training setting; it travels in a checkpoint's
    ``config``): an inference model is the same either way. ``where`` (the checkpoint's path) names the
    description in errors.
    """
    num_classes = int(desc.get("num_classes", NUM_CLASSES))
    if num_classes != NUM_CLASSES:
        raise DataError(f"{where}: num_classes={num_classes}; only {NUM_CLASSES} is supported")
    missing = [k for k in ("arch", "backbone", "input") if k not in desc]
    if missing:
        raise DataError(f"{where}: the expert description lacks {missing} (written by an older version?): "
                        "retrain it (dvc repro train_experts)")
    spec = InputSpec.from_dict(desc["input"], f"{where}: input")
    cls = EXPERTS.get(desc["arch"])
    options = {k: desc[k] for k in getattr(cls, "OPTIONS", {}) if k in desc}  # e.g. an artifact expert's front
    return cls(desc["backbone"], spec, pretrained="none", arch=desc["arch"],
               dropout=float(desc.get("dropout", DEFAULT_DROPOUT)), proj_dim=int(desc.get("proj_dim", 0)),
               info_heads=int(desc.get("info_heads", 0)), **options)
