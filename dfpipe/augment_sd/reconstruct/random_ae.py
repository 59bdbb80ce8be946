"""Small convolutional autoencoders with randomly drawn decoders, trained briefly on the real images.

A detector trained against one generator's decoder learns that decoder. Many decoders that differ in
how they up-sample (nearest, bilinear, transposed conv, pixel shuffle), in activation, normalisation and
depth leave traces that share only what decoders have in common (GenSign / DAIR, CVPR'26). Each model's
architecture is a function of its seed (:func:`draw_arch`); :func:`train` fits it to random crops of the
reals in a few hundred steps (a couple of seconds per model on CPU, deterministic for a seed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

UPSAMPLE = ("nearest", "bilinear", "transposed", "pixel_shuffle")
ACTIVATION = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "gelu": nn.GELU, "silu": nn.SiLU}
NORM = ("none", "batch", "group")
CROPS_PER_IMAGE = 8  # training crops cut from each sampled real (crops, not images, are kept in memory)


@dataclass(frozen=True)
class AEArch:
    """One drawn architecture: encoder of ``depth`` stride-2 convs, decoder of ``depth`` up-samplings."""

    depth: int  # 2 or 3: the image is down-sampled by 2**depth
    width: int  # channels of every hidden layer
    latent: int  # channels of the bottleneck
    upsample: str  # one of UPSAMPLE
    activation: str  # one of ACTIVATION
    norm: str  # one of NORM (decoder only)

    @property
    def factor(self) -> int:
        return 2 ** self.depth


def draw_arch(seed: int) -> AEArch:
    """The architecture of model ``seed`` (numpy draws only: the same on every machine)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    return AEArch(depth=int(rng.integers(2, 4)), width=int(rng.choice([16, 24, 32])),
                  latent=int(rng.choice([4, 8, 12])), upsample=str(rng.choice(UPSAMPLE)),
                  activation=str(rng.choice(list(ACTIVATION))), norm=str(rng.choice(NORM)))


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        return nn.GroupNorm(4, ch)
    return nn.Identity()


def _up(kind: str, ch: int) -> list[nn.Module]:
    """Layers that double the resolution at ``ch`` channels."""
    if kind == "transposed":
        return [nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1)]
    if kind == "pixel_shuffle":
        return [nn.Conv2d(ch, ch * 4, 3, padding=1), nn.PixelShuffle(2)]
    return [nn.Upsample(scale_factor=2, mode=kind, **({} if kind == "nearest" else {"align_corners": False})),
            nn.Conv2d(ch, ch, 3, padding=1)]


class RandomAE(nn.Module):
    """(B, 3, H, W) in [0, 1] -> the same shape (H, W multiples of ``arch.factor``)."""

    def __init__(self, arch: AEArch) -> None:
        super().__init__()
        self.arch = arch
        act, w = ACTIVATION[arch.activation], arch.width
        enc: list[nn.Module] = [nn.Conv2d(3, w, 3, padding=1), act()]
        for _ in range(arch.depth):
            enc += [nn.Conv2d(w, w, 3, stride=2, padding=1), act()]
        enc.append(nn.Conv2d(w, arch.latent, 1))
        dec: list[nn.Module] = [nn.Conv2d(arch.latent, w, 3, padding=1), act()]
        for _ in range(arch.depth):
            dec += [*_up(arch.upsample, w), _norm(arch.norm, w), act()]
        dec.append(nn.Conv2d(w, 3, 3, padding=1))
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def build(seed: int) -> RandomAE:
    """Model ``seed``: drawn architecture, initial weights from the same seed (torch's RNG left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return RandomAE(draw_arch(seed))


def crops(images: Sequence[np.ndarray], side: int, seed: int, per_image: int = CROPS_PER_IMAGE) -> np.ndarray:
    """(N * per_image, side, side, 3) uint8 random crops (an image smaller than ``side`` is reflect-padded)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 12]))
    out = np.empty((len(images) * per_image, side, side, 3), np.uint8)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        if h < side or w < side:
            img = np.pad(img, ((0, max(0, side - h)), (0, max(0, side - w)), (0, 0)), mode="reflect")
            h, w = img.shape[:2]
        ys, xs = rng.integers(0, h - side + 1, per_image), rng.integers(0, w - side + 1, per_image)
        for k, (y, x) in enumerate(zip(ys, xs)):
            out[i * per_image + k] = img[y:y + side, x:x + side]
    return out


def train(model: RandomAE, patches: np.ndarray, steps: int, batch: int, seed: int, lr: float = 2e-3) -> list[float]:
    """Fit ``model`` to reconstruct ``patches`` ((N, s, s, 3) uint8) with L1, Adam; the loss of each step.

    Deterministic for a seed on CPU: batches come from a numpy generator, and torch's global RNG is not used.
    """
    if len(patches) == 0:
        raise ValueError("random_ae: no training crops")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 13]))
    data = torch.from_numpy(patches).permute(0, 3, 1, 2)  # (N, 3, s, s) uint8
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    model.train()
    losses = []
    for _ in range(steps):
        x = data[torch.from_numpy(rng.integers(0, len(data), batch))].float() / 255.0
        if rng.random() < 0.5:  # flips: more distinct crops from few images
            x = x.flip(3)
        loss = F.l1_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def describe(model: RandomAE) -> dict:
    """The architecture as the manifest records it."""
    return asdict(model.arch)
