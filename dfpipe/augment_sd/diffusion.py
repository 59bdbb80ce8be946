"""Stable Diffusion fakes through ``diffusers``: img2img (whole image re-synthesised) or inpainting.

* :func:`load_pipeline` loads a local diffusers folder (e.g. a Stable Diffusion 1.5 or
  SD-inpainting checkout with ``model_index.json``) or a hub id (only with a network or an
  already-filled Hugging Face cache; the pipeline runs offline, so a missing model is a clear error).
* :func:`generate` runs it batched, with one ``torch.Generator`` per image seeded by that image's
  seed, so each image is reproducible from its seed.
* :func:`tiny_pipeline` builds a **randomly initialised, tiny** pipeline (a few hundred kB of
  weights). Its outputs are noise-like and useless as training data: it exists only so tests and
  smoke runs can exercise the real diffusers code path without downloading weights. The stage accepts
  it under the model name :data:`TINY_MODEL`.

Smoke run: ``python -m dfpipe.augment_sd.diffusion --tiny --mode inpaint --out /tmp/sd_smoke.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import cv2
import numpy as np
import torch

from ..config import DiffusionConfig, DiffusionDtype, DiffusionMode
from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

MODES = get_args(DiffusionMode)  # ("img2img", "inpaint")
DTYPES = {name: getattr(torch, name) for name in get_args(DiffusionDtype) if name != "auto"}  # float32/16, bfloat16
TINY_MODEL = ":tiny-random:"  # model name for tiny_pipeline(): random weights, tests/smoke runs only
_TINY_LOCK = threading.Lock()


# --------------------------------------------------------------------------- loading
def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` = bf16 (fp16 where bf16 is unsupported) on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown diffusion dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _looks_like_path(model: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with a separator or dot prefix is a path."""
    return (os.path.isabs(model) or model.startswith((".", "~")) or "\\" in model
            or model.count("/") > 1 or model.endswith("/"))


def _pipeline_class(mode: str) -> Any:
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    if mode not in MODES:
        raise ConfigError(f"unknown diffusion mode {mode!r}; choose one of {list(MODES)}")
    return AutoPipelineForImage2Image if mode == "img2img" else AutoPipelineForInpainting


def load_pipeline(model: str | Path, mode: str = "img2img", dtype: str = "auto", device: str | None = None) -> Any:
    """Load an img2img or inpainting pipeline, safety checker off, progress bar off, on ``device``.

    ``model``: a local diffusers folder, a hub id (cached or online), or :data:`TINY_MODEL`.
    Raises FileNotFoundError naming the model when it cannot be found.
    """
    cls = _pipeline_class(mode)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    model = str(model)
    if not model:
        raise ConfigError("no diffusion model given (augment_sd.diffusion.model is empty)")
    if model == TINY_MODEL:
        log.warning("using the tiny RANDOM-weight diffusion pipeline: outputs are for tests only")
        pipe = tiny_pipeline(mode)
        if torch_dtype != torch.float32:  # built in fp32; from_pretrained sets dtype for real models
            pipe = pipe.to(dtype=torch_dtype)
    else:
        source = _check_source(model)
        # The detector must see every generated image; the NSFW filter would black some out.
        kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False,
                                  **_null_components(source)}
        try:
            pipe = cls.from_pretrained(source, dtype=torch_dtype, **kwargs)
        except OSError as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise InputError(
                f"diffusion model {model!r} could not be loaded: it is not a local diffusers folder and "
                f"is not in the Hugging Face cache{' (HF_HUB_OFFLINE=1: no download)' if offline else ''}. "
                f"Set augment_sd.diffusion.model to a folder holding model_index.json. ({exc})"
            ) from None
    _check_mode(pipe, mode, model)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _check_source(model: str) -> str:
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InputError(f"diffusion model folder {path} has no model_index.json (not a diffusers folder)")
        return str(path)
    if _looks_like_path(model):
        raise InputError(f"diffusion model folder {path} does not exist")
    return model  # a hub id


def _null_components(source: str) -> dict[str, None]:
    """Components saved as ``[null, null]`` in a local model_index.json (e.g. a pipeline saved
    without text encoder); diffusers only loads such a folder when they are passed as None."""
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return {}
    spec = json.loads(index.read_text(encoding="utf-8"))
    return {k: None for k, v in spec.items() if not k.startswith("_") and v == [None, None]}


def _check_mode(pipe: Any, mode: str, model: str) -> None:
    """An inpainting UNet (9 input channels) cannot run img2img; say so instead of a shape error."""
    in_ch = pipe.unet.config.in_channels
    if mode == "img2img" and in_ch != 4:
        raise ConfigError(f"diffusion model {model!r} is an inpainting model (UNet in_channels={in_ch}): "
                         "set augment_sd.diffusion.mode to inpaint")
    if mode == "inpaint" and in_ch == 4:
        log.info("%s: plain (4-channel) UNet used for inpainting: masked latent blending", model)


# --------------------------------------------------------------------------- tiny test pipeline
def tiny_pipeline(mode: str = "img2img", seed: int = 0) -> Any:
    """A tiny Stable Diffusion pipeline with RANDOM weights, for tests and smoke runs only.

    UNet and VAE have two blocks of 32/64 channels, 64x64 native images, no text encoder (pass
    ``prompt_embeds`` of shape (B, 77, 32), see :func:`placeholder_prompt_embeds`). Building it and a
    2-step run at 64 px take well under a second on CPU. Its images are meaningless.
    """
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline,
                           StableDiffusionInpaintPipeline, UNet2DConditionModel)

    if mode not in MODES:
        raise ConfigError(f"unknown diffusion mode {mode!r}; choose one of {list(MODES)}")
    # Fork the RNG so building the test pipeline does not shift anybody else's torch random stream; the
    # lock keeps two threads (ranks simulated by threads in tests) from seeding the shared generator at once.
    with _TINY_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
            in_channels=4 if mode == "img2img" else 9, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=64,
        )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    unet.eval()  # as from_pretrained leaves them
    vae.eval()
    cls = StableDiffusionImg2ImgPipeline if mode == "img2img" else StableDiffusionInpaintPipeline
    pipe = cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def placeholder_prompt_embeds(pipe: Any, seed: int = 0) -> torch.Tensor:
    """Fixed random (1, 77, D) prompt embeddings for a pipeline without a text encoder (tests)."""
    dim = pipe.unet.config.cross_attention_dim
    return torch.randn(1, 77, dim, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- generation
def native_size(pipe: Any) -> int | None:
    """The side the model was trained at (512 for SD 1.5, 64 for the tiny pipeline)."""
    sample = getattr(pipe.unet.config, "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", 8)
    return int(sample) * int(scale) if isinstance(sample, int) else None


def _round8(x: float) -> int:
    """Nearest multiple of 8 (at least 8): SD's VAE and UNet need sides divisible by 8."""
    return max(8, int(round(x / 8.0)) * 8)


def work_size(h: int, w: int, size: int | None) -> tuple[int, int]:
    """(height, width) to run the pipeline at: longer side ``size`` (or the input's), multiples of 8."""
    f = 1.0 if not size else size / float(max(h, w))
    return _round8(h * f), _round8(w * f)


def _resize(img: np.ndarray, hw: tuple[int, int], interp_up: int = cv2.INTER_CUBIC) -> np.ndarray:
    h, w = hw
    if img.shape[:2] == (h, w):
        return img
    interp = cv2.INTER_AREA if h * w < img.shape[0] * img.shape[1] else interp_up
    return cv2.resize(img, (w, h), interpolation=interp)


def _check_generate_args(pipe: Any, images: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None,
                         seeds: Sequence[int], cfg: DiffusionConfig) -> bool:
    """Validate arguments; return True for an inpainting pipeline."""
    inpaint = "mask_image" in _call_params(pipe)
    if len(seeds) != len(images):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds: one seed per image")
    if inpaint and (masks is None or len(masks) != len(images)):
        raise ValueError("an inpainting pipeline needs one mask per image")
    if not inpaint and masks is not None:
        raise ValueError("masks given to an img2img pipeline (set mode to inpaint)")
    check_config(cfg)
    return inpaint


def check_config(cfg: DiffusionConfig) -> None:
    """Catch settings that would fail inside diffusers, with the setting's name."""
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown diffusion mode {cfg.mode!r}; choose one of {list(MODES)}")
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        raise ConfigError(f"unknown diffusion dtype {cfg.dtype!r}; choose auto or one of {sorted(DTYPES)}")
    if not 0.0 < cfg.strength <= 1.0:
        raise ConfigError(f"diffusion strength must be in (0, 1], got {cfg.strength}")
    if int(cfg.steps * cfg.strength) < 1:
        raise ConfigError(f"steps * strength = {cfg.steps} * {cfg.strength} < 1: no denoising step would run")
    if cfg.batch_size < 1:
        raise ConfigError(f"diffusion batch_size must be >= 1, got {cfg.batch_size}")


def _call_params(pipe: Any) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


def _prompt_kwargs(pipe: Any, cfg: DiffusionConfig, n: int, prompt_embeds: torch.Tensor | None) -> dict:
    if prompt_embeds is None:
        if getattr(pipe, "text_encoder", None) is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds")
        return {"prompt": [cfg.prompt] * n, "negative_prompt": [cfg.negative_prompt] * n}
    pe = prompt_embeds.to(device=pipe.device, dtype=pipe.unet.dtype)
    if pe.shape[0] == 1:
        pe = pe.expand(n, -1, -1)
    elif pe.shape[0] != n:
        raise ValueError(f"prompt_embeds batch {pe.shape[0]} is neither 1 nor {n}")
    # Zero negative embeddings: classifier-free guidance against "no prompt" without a tokenizer.
    return {"prompt_embeds": pe, "negative_prompt_embeds": torch.zeros_like(pe)}


def generate(
    pipe: Any,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None,
    seeds: Sequence[int],
    cfg: DiffusionConfig,
    prompt_embeds: torch.Tensor | None = None,
    size: int | None = None,
) -> list[np.ndarray]:
    """Run ``pipe`` on (H, W, 3) uint8 RGB ``images`` of any sizes; return uint8 images of the input sizes.

    ``masks`` (inpainting only): (H, W) arrays of their image's size, > 0.5 = repaint. Each image is
    resized so its longer side is ``size`` (default: the model's native size, e.g. 512 for SD 1.5, as SD
    degrades far from it), aspect kept, sides rounded to multiples of 8 (SD's VAE and UNet need them), and
    the result resized back to the image's exact shape. A batch holds images of one working size: images
    of ``cfg.batch_size`` consecutive inputs with different working sizes run as separate sub-batches
    (grouped by size, in input order), so an image is never squashed to another image's shape. One CPU
    ``torch.Generator`` per image, seeded by its seed, makes each image reproducible from its seed
    (bit-exact on the same hardware and batch composition; the initial noise does not depend on the device).
    """
    inpaint = _check_generate_args(pipe, images, masks, seeds, cfg)
    size = size or native_size(pipe)
    out: list[np.ndarray | None] = [None] * len(images)
    for start in range(0, len(images), cfg.batch_size):
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(start, min(len(images), start + cfg.batch_size)):
            groups.setdefault(work_size(*images[i].shape[:2], size), []).append(i)
        for (h, w), idx in groups.items():
            for i, gen in zip(idx, _run_batch(pipe, images, masks if inpaint else None, seeds, cfg, prompt_embeds,
                                              idx, (h, w))):
                out[i] = gen
    return out  # type: ignore[return-value]


def _run_batch(pipe: Any, images: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None, seeds: Sequence[int],
               cfg: DiffusionConfig, prompt_embeds: torch.Tensor | None, idx: list[int], hw: tuple[int, int]
               ) -> list[np.ndarray]:
    """One pipeline call on ``images[idx]`` at working size ``hw``; results at each input's shape."""
    h, w = hw
    kwargs: dict[str, Any] = {
        "image": np.stack([_resize(images[i], (h, w)).astype(np.float32) / 255.0 for i in idx]),
        "strength": cfg.strength, "num_inference_steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
        "generator": [torch.Generator("cpu").manual_seed(int(seeds[i])) for i in idx],
        "output_type": "np",
        **_prompt_kwargs(pipe, cfg, len(idx), prompt_embeds),
    }
    if masks is not None:
        kwargs["mask_image"] = np.stack([
            (_resize(np.asarray(masks[i], np.float32), (h, w), cv2.INTER_LINEAR) > 0.5).astype(np.float32)[..., None]
            for i in idx
        ])
        kwargs["height"], kwargs["width"] = h, w
    result = pipe(**kwargs).images
    out = []
    for i, gen in zip(idx, result):
        u8 = np.clip(np.round(np.asarray(gen, np.float32) * 255.0), 0, 255).astype(np.uint8)
        out.append(np.ascontiguousarray(_resize(u8, images[i].shape[:2])))
    return out


def composite(orig: np.ndarray, gen: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Paste ``gen`` into ``orig`` through a soft ``mask``; pixels with mask == 0 stay exactly ``orig``.

    Without this, an inpainting output differs everywhere (the VAE round trip), and the mask would
    not say where the image was edited; img2img fakes keep that global VAE trace instead.
    """
    m = mask.astype(np.float32)[..., None]
    blended = np.clip(np.round(gen.astype(np.float32) * m + orig.astype(np.float32) * (1.0 - m)), 0, 255)
    return np.where(m > 0, blended.astype(np.uint8), orig)


# --------------------------------------------------------------------------- smoke run
def _smoke(args: argparse.Namespace) -> None:
    from .editing import region_mask

    model = TINY_MODEL if args.tiny else args.model
    if not model:
        raise SystemExit("give --tiny or --model PATH")
    pipe = load_pipeline(model, args.mode, args.dtype, args.device)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:args.size, 0:args.size].astype(np.float32) / args.size
    img = (np.stack([xx, yy, (xx + yy) / 2], axis=2) * 255).astype(np.uint8)
    cv2.circle(img, (args.size // 2, args.size // 2), args.size // 4, (200, 80, 40), -1)
    cfg = DiffusionConfig(model=model, mode=args.mode, steps=args.steps, batch_size=1)
    mask = region_mask(args.size, args.size, rng, face=True, soft=False)[0] if args.mode == "inpaint" else None
    embeds = placeholder_prompt_embeds(pipe) if getattr(pipe, "text_encoder", None) is None else None
    fake = generate(pipe, [img], [mask] if mask is not None else None, [0], cfg, prompt_embeds=embeds)[0]
    sheet = np.concatenate([img, fake], axis=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    log.info("wrote %s (source | generated), mean abs change %.2f", args.out,
             float(np.abs(fake.astype(int) - img.astype(int)).mean()))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Smoke-test the diffusion path on one synthetic image.")
    p.add_argument("--tiny", action="store_true", help="random-weight tiny pipeline (no download)")
    p.add_argument("--model", default="", help="local diffusers folder or hub id")
    p.add_argument("--mode", default="img2img", choices=MODES)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default="sd_smoke.png")
    from ..io import setup_logging

    setup_logging()
    _smoke(p.parse_args(argv))


if __name__ == "__main__":
    main()
