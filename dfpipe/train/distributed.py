"""Processes of one training run through ``accelerate``: 1 CPU, 1 GPU or N GPUs / nodes, one code path.

A plain ``python 04_train_experts.py`` is one process (accelerate's ``DistributedType.NO``: no process
group, every helper below is the identity). Under ``accelerate launch`` or ``torchrun`` each process
drives one device (NCCL on GPUs, gloo on CPUs) and the model is wrapped in DDP by
``Accelerator.prepare_model``, which all-reduces (averages) gradients in ``backward``.

What the loop relies on, and why:

- ``batch_size`` in params is the *global* batch; each rank takes ``batch_size / world`` samples of it,
  so steps per epoch, the LR schedule and the samples of step k do not depend on the number of GPUs.
- Every rank seeds the same way, so the model starts identical, the shuffling generator gives every
  rank the same global order (each takes its own shard, see :class:`~dfpipe.train.sampling.SeededSampler`)
  and the RNG states stay equal across ranks (same draws, same shapes): ``last.pt`` saves rank 0's,
  which is every rank's, and resume restores it everywhere.
- Params stay equal across ranks (same all-reduced gradient, same optimizer step), so the EMA updated
  on each rank stays equal too; BN statistics are made rank 0's at each epoch end (:func:`sync_buffers`).
- Only rank 0 logs (INFO), shows progress bars and writes files.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast

from ..config import ExpertConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)


def make_accelerator(ecfg: ExpertConfig) -> Accelerator:
    """The run's Accelerator: process group and device (``cuda:<local rank>``, else CPU)."""
    # A head unused by the loss (CE and KL both off) has no gradient: DDP must be told to expect that.
    unused = ecfg.loss.ce == 0 and ecfg.loss.kl == 0
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),  # never MPS & co.: the same device choice as dfpipe.device
        # precision is ours (bf16 autocast on CUDA, see dfpipe.device.autocast): a launcher's
        # --mixed_precision must not change the numerics behind params.yaml's back
        mixed_precision="no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
    )
    if not acc.is_main_process:
        # INFO from every rank would repeat each line world times; warnings and errors still show
        logging.getLogger("dfpipe").setLevel(logging.WARNING)
    return acc


def per_rank_batch(batch_size: int, world: int) -> int:
    """This process's share of the global ``batch_size``."""
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} is the global batch: it must be divisible by the "
                         f"{world} processes (each takes batch_size / {world})")
    return batch_size // world


def reduce_sum(acc: Accelerator, values: list[float]) -> list[float]:
    """Sum ``values`` over the ranks (float64, so one process gets its numbers back unchanged)."""
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return acc.reduce(t, reduction="sum").cpu().tolist()


def gather_by_index(acc: Accelerator, index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Reassemble per-rank ``values`` at their ``index`` (0..n-1) into one array, on every rank.

    Ranks may hold different counts (a val set not divisible by the world size): shards are padded
    with index -1 before ``gather``, and the padding is dropped.
    """
    idx = torch.as_tensor(index, dtype=torch.int64, device=acc.device)
    val = torch.as_tensor(values, device=acc.device)
    idx = acc.pad_across_processes(idx, pad_index=-1)
    val = acc.pad_across_processes(val, pad_index=0)
    idx, val = acc.gather(idx).cpu().numpy(), acc.gather(val).cpu().numpy()
    keep = idx >= 0
    idx, val = idx[keep], val[keep]
    if len(idx) != n or len(np.unique(idx)) != n:
        raise RuntimeError(f"gathered {len(idx)} predictions for {n} samples: the shards must cover each once")
    out = np.empty(n, dtype=val.dtype)
    out[idx] = val
    return out


def sync_buffers(module: torch.nn.Module) -> None:
    """Make every rank's buffers (BN running statistics) rank 0's, in place.

    DDP broadcasts them at the start of each training forward, so after an epoch's last step each rank
    holds its own; validation, the KL teacher and ``last.pt`` need the same ones everywhere.
    """
    for buf in module.buffers():
        broadcast(buf, from_process=0)


def check_same(acc: Accelerator, value: int, what: str) -> None:
    """Raise if ``value`` differs between ranks (e.g. one rank resumes and another starts fresh)."""
    t = torch.tensor([value], dtype=torch.int64, device=acc.device)
    seen = acc.gather(t).cpu().tolist()
    if len(set(seen)) > 1:
        raise RuntimeError(f"ranks disagree on {what}: {seen}")
