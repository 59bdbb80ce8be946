"""The expert's exponential moving average: timm's ``ModelEmaV3`` with a decay set in epochs.

Why timm's EMA: it averages the whole ``state_dict``, BN running statistics included, so the averaged
weights are evaluated with statistics of the same average (torch-ema averaged parameters only and left
the student's BN buffers under them). The EMA is a full copy of the model (``ema.module``), in eval mode:
it is what gets validated and saved in ``best.pt``, and the KL term's teacher.

Why epochs: a per-step decay means a different average for every batch size, data set size and number
of GPUs (0.98 per step averages about 50 steps: one epoch of a small set, a few percent of a big one).
``ema_epochs`` is the time constant in epochs; with ``S`` steps per epoch the per-step decay is
``exp(-1 / (ema_epochs * S))``, so step ``k`` back has weight ``(1 - d) d^k`` and the average reaches
back ``ema_epochs`` epochs (1/e of the weight lies further back) whatever ``S`` is.
"""

from __future__ import annotations

import logging
import math

import torch
from timm.utils import ModelEmaV3

from ..errors import ConfigError

log = logging.getLogger(__name__)


def ema_decay(ema_epochs: float, steps_per_epoch: int) -> float:
    """Per-step decay of an EMA with a time constant of ``ema_epochs`` epochs (0 = no averaging: decay 0)."""
    if ema_epochs < 0:
        raise ConfigError(f"ema_epochs must be >= 0 (0 = no EMA), got {ema_epochs}")
    if ema_epochs == 0:
        return 0.0
    return math.exp(-1.0 / (ema_epochs * max(1, steps_per_epoch)))


def make_ema(model: torch.nn.Module, ema_epochs: float, steps_per_epoch: int, teacher: bool) -> ModelEmaV3 | None:
    """The EMA of ``model`` (a copy in eval mode, updated by ``ema.update(model)`` after each step), or None.

    None when ``ema_epochs`` is 0 and no KL teacher is needed: the student is evaluated and saved
    itself, and no copy is kept. With a KL term but ``ema_epochs`` 0, the teacher is a copy of the
    student made after each step (decay 0). Build it after any SyncBatchNorm conversion and device
    move, before the DDP wrap: the copy must have the student's layers, device and memory format.
    """
    if ema_epochs == 0 and not teacher:
        return None
    decay = ema_decay(ema_epochs, steps_per_epoch)
    log.info("EMA of weights and BN buffers: %.3g epochs x %d steps, decay %.6f per step", ema_epochs,
             steps_per_epoch, decay)
    # decay constant from step 1 (no warm-up): the closed form above holds; the EMA stays in the model's fp32
    return ModelEmaV3(model, decay=decay, use_warmup=False).requires_grad_(False)
