"""Experts for inference: a self-describing checkpoint -> a frozen model, BatchNorm folded into its convolutions."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx

from ..data.preprocess import Preprocess, stage1_from_dict
from ..errors import DataError, InputError
from ..models import CHECKPOINT_FORMAT, expert_from_description

log = logging.getLogger(__name__)


@dataclass
class LoadedExpert:
    """An inference expert and what feeds it: ``preprocess`` is its checkpoint's stage-1 record and the model's
    own input contract (``preprocess.input is model.input``)."""

    name: str
    model: torch.nn.Module
    description: dict
    preprocess: Preprocess
    sha256: str = ""


def read_checkpoint(path: str | Path) -> dict:
    """An expert's ``best.pt`` in the layout of :data:`CHECKPOINT_FORMAT` (tensors and plain data only:
    ``weights_only``); a format-1 file is read into that layout. A missing file, or one that predates the
    preprocessing record, is one line naming the file and saying to retrain; one whose training did not finish
    (a killed stage 4), one line naming the expert and the command that resumes it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found (train it: dvc repro train_experts)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt == 1 and "preprocess" in ckpt.get("description", {}):
        return _from_format_1(ckpt)
    if fmt != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: checkpoint format {fmt!r} without the preprocessing record this version needs "
                        f"(format {CHECKPOINT_FORMAT}): retrain the expert (dvc repro train_experts)")
    _check_finished(path, ckpt)
    return ckpt


def _check_finished(path: Path, ckpt: dict) -> None:
    """Refuse the best epoch of a run that was stopped before its end (early stopping is an end). A checkpoint
    without the ``training`` record predates it and is taken as finished."""
    training = ckpt.get("training")
    if isinstance(training, dict) and not training.get("finished", True):
        name = ckpt.get("name", path.parent.name)
        raise DataError(f"{path.parent}: training stopped at epoch {training.get('epoch')} of "
                        f"{training.get('epochs')}; resume it with dvc repro train_experts@{name}")


def _from_format_1(ckpt: dict) -> dict:
    """A format-1 checkpoint in format 2's layout. Format 1 stored the input size three times (description
    ``img_size``, ``preprocess.input.size``, ``config.img_size``) and mean/std twice; the copies scoring read are
    kept (the model's size and normalisation from the description, the input mode and stage 1 from the record)."""
    desc = dict(ckpt["description"])
    prep = desc.pop("preprocess")
    size, mean, std = desc.pop("img_size"), desc.pop("mean"), desc.pop("std")
    desc["input"] = {"size": size, "mode": prep["input"]["mode"], "mean": mean, "std": std}
    return {**ckpt, "format": CHECKPOINT_FORMAT, "description": desc, "stage1": prep["stage1"]}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _ConvBnTracer(torch.fx.Tracer):
    """Keeps every Conv2d / BatchNorm2d (subclasses too: timm's Conv2dSame, BatchNormAct2d) a leaf."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution's
    weights (in place; inference only). timm's BatchNormAct2d keeps its activation. Returns how many
    were folded; 0 when the model cannot be traced (nothing changed then)."""
    try:
        graph = _ConvBnTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - an untraceable custom expert is simply not folded
        log.debug("BatchNorm folding skipped: %s", exc)
        return 0
    mods = dict(model.named_modules())
    folded = 0
    for node in graph.nodes:
        src = node.args[0] if node.args else None
        if not (node.op == "call_module" and isinstance(mods[node.target], torch.nn.BatchNorm2d)
                and isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(mods[src.target], torch.nn.Conv2d)):
            continue
        _fold_pair(model, mods[src.target], mods[node.target], node.target)
        folded += 1
    return folded


@torch.no_grad()
def _fold_pair(model: torch.nn.Module, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, bn_name: str) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = torch.nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
    keep = [getattr(bn, a) for a in ("drop", "act") if isinstance(getattr(bn, a, None), torch.nn.Module)]
    parent, _, attr = bn_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr,
            torch.nn.Sequential(*keep) if keep else torch.nn.Identity())


def load_expert(path: str | Path, device: torch.device) -> LoadedExpert:
    """Rebuild an expert from its self-describing checkpoint (EMA weights, saved as the state_dict).

    The model is for inference only: eval mode, frozen, BatchNorm folded into the convolutions, on
    ``device``, channels_last (faster convolutions on CPU (oneDNN) and GPU alike). Scores agree with
    the plain NCHW model to ~1e-6.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    model = expert_from_description(ckpt["description"], str(path))
    prep = Preprocess(stage1_from_dict(ckpt["stage1"], f"{path}: stage1"), model.input)
    model.load_state_dict(ckpt["state_dict"])
    model = model.eval().requires_grad_(False)
    fold_batchnorm(model)
    model = model.to(device).to(memory_format=torch.channels_last)
    return LoadedExpert(ckpt["name"], model, ckpt["description"], prep, _sha256(path))
