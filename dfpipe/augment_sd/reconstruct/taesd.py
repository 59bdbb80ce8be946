"""TAESD (Tiny AutoEncoder for Stable Diffusion, github.com/madebyollin/taesd, MIT): its FLUX.2 variant.

A 2.7 M-parameter distilled stand-in for FLUX.2's VAE: 32 latent channels, 8x down/up-sampling. A real
image passed through encoder then decoder comes back with the traces of a latent-diffusion decoder
(nearest up-sampling + convs), at ~34.5 dB PSNR on faces.

The modules are written from upstream's architecture (``taesd.py``): 3x3 convs, residual blocks of three
convs with ReLU, stride-2 convs down, nearest ``Upsample(2)`` + conv up, a ``tanh(x/3)*3`` clamp at the
decoder input, and the FLUX.2 variant's "midblock GN" branch (1x1 conv to 4x the width, GroupNorm(4),
ReLU, 1x1 conv back, added to the block input) in the three blocks nearest the latent. :func:`load_taef2`
builds them and loads the shipped weights (``dfpipe/assets/taesd/``, with upstream's LICENSE), after
checking their sha256 and with ``weights_only=True``: a pickle that is not plain tensors is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ...errors import DataError, InputError

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "taesd"
# upstream commit 5cccb12dc72074a4be35680c3b108548a7c69978 (2025-12-27), byte copies
SHA256 = {
    "taef2_encoder.pth": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
    "taef2_decoder.pth": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
}
LATENT_CHANNELS = 32
SCALE = 8  # spatial down-sampling of the latent


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3) at the decoder input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block: three 3x3 convs with ReLU, plus (``midblock_gn``) a GroupNorm branch on the input."""

    def __init__(self, n_in: int, n_out: int, midblock_gn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Module | None = None
        if midblock_gn:
            # GroupNorm's statistics span the whole image: a global (pooled) signal added to every position
            n_gn = n_in * 4
            self.pool = nn.Sequential(nn.Conv2d(n_in, n_gn, 1, bias=False), nn.GroupNorm(4, n_gn), nn.ReLU(),
                                      nn.Conv2d(n_gn, n_in, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def encoder(latent_channels: int = LATENT_CHANNELS, midblock_gn: bool = True) -> nn.Sequential:
    """(B, 3, H, W) in [0, 1] -> (B, latent_channels, H/8, W/8)."""
    gn = {"midblock_gn": midblock_gn}
    return nn.Sequential(
        _conv(3, 64), Block(64, 64),
        _conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        _conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        _conv(64, 64, stride=2, bias=False), Block(64, 64, **gn), Block(64, 64, **gn), Block(64, 64, **gn),
        _conv(64, latent_channels),
    )


def decoder(latent_channels: int = LATENT_CHANNELS, midblock_gn: bool = True) -> nn.Sequential:
    """(B, latent_channels, h, w) -> (B, 3, 8h, 8w), about [0, 1] (clamp after)."""
    gn = {"midblock_gn": midblock_gn}
    return nn.Sequential(
        Clamp(), _conv(latent_channels, 64), nn.ReLU(),
        Block(64, 64, **gn), Block(64, 64, **gn), Block(64, 64, **gn),
        nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        Block(64, 64), _conv(64, 3),
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """A plain tensor state dict (``weights_only=True``), its bytes checked against ``expected_sha256``."""
    if not path.is_file():
        raise InputError(f"{path} not found: the TAESD weights ship with the package (reinstall dfpipe)")
    if expected_sha256 is not None and (got := sha256(path)) != expected_sha256:
        raise DataError(f"{path}: sha256 {got} is not the shipped file's {expected_sha256} (corrupt or replaced)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad or unsafe pickle
        raise DataError(f"{path}: not a plain tensor state dict ({exc})") from None


class TinyAutoencoder(nn.Module):
    """Encoder + decoder; :meth:`forward` reconstructs (B, 3, H, W) [0, 1] images (H, W multiples of 8)."""

    def __init__(self, latent_channels: int = LATENT_CHANNELS, midblock_gn: bool = True) -> None:
        super().__init__()
        self.encoder = encoder(latent_channels, midblock_gn)
        self.decoder = decoder(latent_channels, midblock_gn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).clamp(0, 1)


def load_taef2(folder: str | Path | None = None, check_sha256: bool = True) -> TinyAutoencoder:
    """The FLUX.2 tiny autoencoder with its shipped weights (float32, eval mode, on CPU).

    ``folder``: where ``taef2_encoder.pth`` / ``taef2_decoder.pth`` are (default: the package's assets).
    A state dict whose keys or shapes do not fit the module is a :class:`DataError` naming the file.
    """
    folder = ASSETS if folder is None else Path(folder)
    model = TinyAutoencoder()
    for part in ("encoder", "decoder"):
        name = f"taef2_{part}.pth"
        state = load_state(folder / name, SHA256[name] if check_sha256 else None)
        try:
            getattr(model, part).load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as exc:  # missing / unexpected keys, shape mismatch
            raise DataError(f"{folder / name}: does not fit the TAESD FLUX.2 {part}: {exc}") from None
    return model.eval().requires_grad_(False)
