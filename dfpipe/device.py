"""Device, precision and DataLoader defaults shared by training, embedding and prediction."""

from __future__ import annotations

import contextlib
import os

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaler needed); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def num_workers(requested: int) -> int:
    """-1 = auto: half the cores (leave the rest to torch's own threads), at most 8."""
    if requested >= 0:
        return requested
    return max(0, min(8, (os.cpu_count() or 2) // 2))
