"""Reconstruction fakes: real images passed through an autoencoder, aligned with their reals.

A reconstruction has its real's content, pose and light; what differs is the decoder's trace (its
up-sampling, its smoothing of fine texture). Trained on such pairs a detector cannot lean on content,
and decoder traces are what latent-diffusion images share (arXiv 2601.20461; GenSign / DAIR, CVPR'26).

Methods (:data:`METHODS`, :data:`dfpipe.registry.RECONSTRUCTION_METHODS`: name -> factory of
:class:`Reconstructor` variants; registering one makes it selectable in ``augment_sd.reconstruct.methods``):

* ``taef2``: the FLUX.2 tiny autoencoder shipped in ``dfpipe/assets/taesd`` (:mod:`.taesd`);
* ``random_ae``: ``ae_models`` small autoencoders with drawn decoders, trained briefly on the reals
  (:mod:`.random_ae`); each pair uses one of them, drawn from its seed;
* ``vae``: a local diffusers AutoencoderKL / AutoencoderTiny or TAESD weights (:mod:`.vae`).

Both images of a pair end with one history (:mod:`.parity`). :func:`reconstruct` runs a model over
images of any sizes: each is reflect-padded to the model's side multiple (never resized: a resampling the
real does not have would be a cue) and cropped back.

Importing this package does not import torch (the config validates method names against the registry).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...config import ReconstructConfig
from ...errors import ConfigError
from ...registry import RECONSTRUCTION_METHODS

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

RANDOM_AE = "random_ae"


@dataclass
class Reconstructor:
    """One model: (B, 3, H, W) [0, 1] -> the same, for H, W multiples of ``factor``; ``info`` is its provenance."""

    model: nn.Module
    factor: int
    info: dict


@dataclass
class Context:
    """What factories may need beyond the config: the stage seed, the reals to train on, a cache folder."""

    seed: int = 0
    train_images: Callable[[], list[np.ndarray]] = field(default=lambda: [])
    cache_dir: Path | None = None  # trained models are kept here (resume); None = not kept
    key: str = ""  # fingerprint of the training reals (part of a cached model's name)


def _taef2(r: ReconstructConfig, ctx: Context) -> list[Reconstructor]:
    from .taesd import SHA256, SCALE, load_taef2

    return [Reconstructor(load_taef2(), SCALE, {"model": "taef2", "decoder_sha256": SHA256["taef2_decoder.pth"][:16]})]


def _vae(r: ReconstructConfig, ctx: Context) -> list[Reconstructor]:
    from .vae import load_vae

    model, factor = load_vae(r.vae_model)
    return [Reconstructor(model, factor, {"model": r.vae_model, "class": type(getattr(model, "vae", model)).__name__})]


def ae_seed(seed: int, k: int) -> int:
    """The seed of random autoencoder ``k`` of a stage run with ``seed`` (architecture, weights, crops)."""
    return int(np.random.SeedSequence([int(seed), 101, int(k)]).generate_state(1, np.uint64)[0] & (2**63 - 1))


def ae_settings(r: ReconstructConfig) -> dict:
    return {"models": r.ae_models, "steps": r.ae_steps, "crop": r.ae_crop, "batch": r.ae_batch,
            "train_images": r.ae_train_images}


def _random_ae(r: ReconstructConfig, ctx: Context) -> list[Reconstructor]:
    from safetensors.torch import load_file, save_file

    from . import random_ae

    images: list[np.ndarray] | None = None
    out = []
    for k in range(r.ae_models):
        seed = ae_seed(ctx.seed, k)
        model = random_ae.build(seed)
        key = hashlib.sha1(json.dumps({"seed": seed, **ae_settings(r), "reals": ctx.key, "arch": asdict(model.arch)},
                                      sort_keys=True).encode()).hexdigest()[:16]
        path = None if ctx.cache_dir is None else ctx.cache_dir / f"{RANDOM_AE}_{k}_{key}.safetensors"
        if path is not None and path.is_file():
            model.load_state_dict(load_file(path))
            model.eval()
        else:
            images = ctx.train_images() if images is None else images
            patches = random_ae.crops(images, r.ae_crop, seed)
            losses = random_ae.train(model, patches, r.ae_steps, r.ae_batch, seed)
            log.info("random_ae %d %s: L1 %.4f -> %.4f in %d steps", k, model.arch, np.mean(losses[:10]),
                     np.mean(losses[-10:]), len(losses))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(tmp))
                tmp.replace(path)
        out.append(Reconstructor(model.requires_grad_(False), model.arch.factor,
                                 {"model": RANDOM_AE, "index": k, "seed": seed, **asdict(model.arch)}))
    return out


RECONSTRUCTION_METHODS.register("taef2", _taef2)
RECONSTRUCTION_METHODS.register(RANDOM_AE, _random_ae)
RECONSTRUCTION_METHODS.register("vae", _vae)
METHODS = RECONSTRUCTION_METHODS  # name -> factory, read like a dict


def get_method(name: str) -> Callable[[ReconstructConfig, Context], list[Reconstructor]]:
    return METHODS.get(name)  # UnknownNameError listing the names, with a suggestion


def variant(name: str, seed: int, r: ReconstructConfig) -> int:
    """Which of a method's models a pair of ``seed`` uses (random_ae: one of ``ae_models``; else 0)."""
    if name != RANDOM_AE:
        return 0
    return int(np.random.default_rng(np.random.SeedSequence([int(seed), 9])).integers(r.ae_models))


def check_config(r: ReconstructConfig) -> None:
    """Validate ``augment_sd.reconstruct`` before any work (unknown methods, bad numbers, missing vae folder)."""
    from .parity import check_post_config

    unknown = sorted(set(r.methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"augment_sd.reconstruct.methods: unknown method(s) {unknown}; valid: {sorted(METHODS)}")
    w = np.array(list(r.methods.values()), np.float64)
    if (w < 0).any() or not np.isfinite(w).all():
        raise ConfigError(f"augment_sd.reconstruct.methods: weights must be finite and >= 0, got {dict(r.methods)}")
    if r.per_real < 0:
        raise ConfigError(f"augment_sd.reconstruct.per_real must be >= 0, got {r.per_real}")
    if r.per_real > 0 and w.sum() <= 0:
        raise ConfigError("augment_sd.reconstruct.methods: per_real > 0 but no method has a positive weight")
    for key in ("batch_size", "ae_models", "ae_steps", "ae_crop", "ae_batch", "ae_train_images"):
        if getattr(r, key) < 1:
            raise ConfigError(f"augment_sd.reconstruct.{key} must be >= 1, got {getattr(r, key)}")
    if r.per_real > 0 and r.methods.get("vae", 0) > 0:
        from .vae import load_vae

        load_vae(r.vae_model)  # a missing or unusable folder fails now, not after the editing fakes
    check_post_config(r)


def _pad(img: np.ndarray, factor: int) -> np.ndarray:
    h, w = img.shape[:2]
    ph, pw = -h % factor, -w % factor
    if not ph and not pw:
        return img
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")


def resolve_dtype(dtype: str, device: str | torch.device) -> str:
    """``auto``: bfloat16 where ``device`` computes it natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX),
    float32 elsewhere (emulated bf16 is slower than float32)."""
    import torch

    if dtype != "auto":
        return dtype
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def reconstruct(rec: Reconstructor, images: Sequence[np.ndarray], batch_size: int = 8, dtype: str = "float32"
                ) -> list[np.ndarray]:
    """``rec`` applied to (H, W, 3) uint8 RGB images of any sizes; uint8 images of the same sizes.

    ``dtype``: float32, or bfloat16 (autocast: convolutions in bf16, the output rounded to uint8 as always).

    Consecutive images whose padded sizes agree run as one batch (at most ``batch_size``), in input order,
    on the model's device, channels-last (measured 1.2-1.5x faster for TAESD on CPU).
    """
    import torch

    with torch.inference_mode():
        return _reconstruct(rec, images, batch_size, dtype)


def _reconstruct(rec: Reconstructor, images: Sequence[np.ndarray], batch_size: int, dtype: str) -> list[np.ndarray]:
    import torch

    model = rec.model.to(memory_format=torch.channels_last)
    device = next(model.parameters()).device
    out: list[np.ndarray | None] = [None] * len(images)
    for start in range(0, len(images), batch_size):
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(start, min(len(images), start + batch_size)):
            padded = tuple(-(-s // rec.factor) * rec.factor for s in images[i].shape[:2])
            groups.setdefault(padded, []).append(i)
        for idx in groups.values():
            x = torch.from_numpy(np.stack([_pad(images[i], rec.factor) for i in idx])).permute(0, 3, 1, 2)
            x = x.to(device).float().div(255.0).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                y = model(x).float()  # (B, 3, H', W') in [0, 1]
            y8 = (y.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for i, r in zip(idx, y8):
                h, w = images[i].shape[:2]
                out[i] = np.ascontiguousarray(r[:h, :w])
    return out  # type: ignore[return-value]


__all__ = ["METHODS", "Context", "Reconstructor", "ae_seed", "check_config", "get_method", "reconstruct",
           "resolve_dtype", "variant"]
