"""A user's own latent-diffusion autoencoder from a local folder, as a [0, 1] -> [0, 1] image module.

Accepted (``augment_sd.reconstruct.vae_model``):

* a diffusers ``AutoencoderKL`` (SD 1.x/2.x/XL VAEs...) or ``AutoencoderTiny`` (TAESD in diffusers form)
  folder holding ``config.json``, or a pipeline folder with such a ``vae/`` subfolder;
* a folder of upstream TAESD weights ``<name>_encoder.pth`` + ``<name>_decoder.pth`` (taesd, taesdxl,
  taesd3, taef1, taef2...): latent width and the midblock-GN branch are read from the state dicts.

Nothing is downloaded: a folder that is not there or holds none of these is an :class:`InputError`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...errors import DataError, InputError
from .taesd import TinyAutoencoder, load_state

VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


class DiffusersVAE(nn.Module):
    """Encode to the latent mean (no sampling: deterministic) and decode, in [0, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.kl = type(vae).__name__ == "AutoencoderKL"

    @property
    def factor(self) -> int:
        cfg = self.vae.config
        blocks = cfg.block_out_channels if self.kl else cfg.encoder_block_out_channels
        return 2 ** (len(blocks) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.vae.encode(x * 2 - 1)
        z = enc.latent_dist.mode() if self.kl else enc.latents
        return ((self.vae.decode(z).sample + 1) / 2).clamp(0, 1)


def _diffusers_folder(path: Path) -> Path | None:
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    return None


def load_diffusers_vae(folder: Path) -> DiffusersVAE:
    import diffusers

    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder / 'config.json'}: unreadable ({exc})") from None
    if name not in VAE_CLASSES:
        raise DataError(f"{folder / 'config.json'}: _class_name {name!r} is not one of {list(VAE_CLASSES)}")
    try:
        vae = getattr(diffusers, name).from_pretrained(folder, torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder}: cannot load the {name} ({exc})") from None
    return DiffusersVAE(vae.eval().requires_grad_(False))


def load_taesd_pair(folder: Path) -> TinyAutoencoder:
    """Upstream TAESD weights ``*_encoder.pth`` / ``*_decoder.pth`` of any variant (no sha256: the user's files)."""
    enc = sorted(folder.glob("*_encoder.pth"))
    if len(enc) != 1:
        raise InputError(f"{folder}: need exactly one *_encoder.pth (TAESD weights), found {len(enc)}")
    dec = enc[0].with_name(enc[0].name.replace("_encoder.pth", "_decoder.pth"))
    enc_state, dec_state = load_state(enc[0], None), load_state(dec, None)
    last = max((k for k in enc_state if k.endswith(".weight") and k.split(".")[0].isdigit()),
               key=lambda k: int(k.split(".")[0]))
    model = TinyAutoencoder(latent_channels=int(enc_state[last].shape[0]),
                            midblock_gn=any(".pool." in k for k in enc_state))
    for part, state, path in (("encoder", enc_state, enc[0]), ("decoder", dec_state, dec)):
        try:
            getattr(model, part).load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as exc:
            raise DataError(f"{path}: does not fit the TAESD {part} layout: {exc}") from None
    return model.eval().requires_grad_(False)


def load_vae(model: str | Path) -> tuple[nn.Module, int]:
    """(module mapping (B, 3, H, W) [0, 1] to the same, the side multiple its input needs)."""
    if not str(model):
        raise InputError("augment_sd.reconstruct.vae_model is empty: the vae method needs a local autoencoder folder")
    path = Path(model).expanduser()
    if not path.is_dir():
        raise InputError(f"augment_sd.reconstruct.vae_model: {path} is not a folder (a local VAE folder is needed)")
    folder = _diffusers_folder(path)
    if folder is not None:
        vae = load_diffusers_vae(folder)
        return vae, vae.factor
    if any(path.glob("*_encoder.pth")):
        return load_taesd_pair(path), 8
    raise InputError(f"{path}: neither a diffusers VAE folder (config.json, or vae/config.json) "
                     "nor TAESD weights (*_encoder.pth + *_decoder.pth)")
