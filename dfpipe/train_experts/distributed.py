"""Processes of one training run through ``accelerate``: 1 CPU, 1 GPU or N GPUs / nodes, one code path.

A plain ``python 04_train_experts.py`` is one process (accelerate's ``DistributedType.NO``: no process
group, every helper below is the identity). Under ``accelerate launch`` or ``torchrun`` each process
drives one device (NCCL on GPUs, gloo on CPUs) and the model is wrapped in DDP by
``Accelerator.prepare_model``, which all-reduces (averages) gradients in ``backward``.

What the loop relies on, and why:

- ``batch_size`` in params is the *per-process* (per-GPU) batch: N processes train on a global batch of
  ``batch_size x N``, so a GPU's memory and BN statistics do not shrink as GPUs are added. ``lr`` is the
  learning rate of a global batch of ``lr_ref_batch`` and is rescaled for the actual global batch by
  ``lr_scale`` (:func:`scaled_lr`: sqrt, timm's rule for adaptive optimizers such as AdamW, by
  default; linear for SGD-like recipes; none). Steps per epoch fall as 1 / N.
- ``sync_bn`` converts BatchNorm to SyncBatchNorm (timm's converter, which knows its BN + activation
  layers) on N > 1 GPUs, so BN sees the global batch; gloo (CPU) has no SyncBatchNorm: skipped.
- The NCE term sees the global batch: :func:`gather_across_ranks` all-gathers features with gradient.
- Every rank seeds the same way before the model is built, so the model starts identical, and the
  shuffling generator gives every rank the same global order (each takes its own shard, see
  :class:`~dfpipe.train_experts.sampling.SeededSampler`; augmentation seeds are per sample). The global torch RNG
  (dropout) is then re-seeded at each epoch with :func:`rank_seed` (seed, epoch, rank): each rank draws
  its own dropout masks, and a resumed epoch draws the same ones as an uninterrupted run.
- Params stay equal across ranks (same all-reduced gradient, same optimizer step), so the EMA's
  weights updated on each rank stay equal too; BN statistics (the model's and the EMA's) are made
  rank 0's at each epoch end (:func:`sync_buffers`).
- ``deterministic`` (GPU): deterministic cuDNN and cuBLAS kernels (:func:`set_determinism`), so a GPU
  run, like a CPU run, gives the same ``best.pt`` bytes each time for a fixed seed, data and launcher.
- Only rank 0 logs (INFO), shows progress bars and writes files.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast
from timm.layers import convert_sync_batchnorm

from ..config import LrScale
from ..errors import ConfigError

log = logging.getLogger(__name__)


def make_accelerator(find_unused_parameters: bool = False, deterministic: bool = False) -> Accelerator:
    """The run's Accelerator: process group and device (``cuda:<local rank>``, else CPU).

    ``find_unused_parameters``: DDP must search each step for layers without a gradient (the loop knows from the
    expert and its loss whether there are any: :func:`dfpipe.train_experts.loop.leaves_parameters_unused`);
    ``deterministic``: :func:`set_determinism`. Plain flags: this module knows processes, not expert configs.
    """
    set_determinism(deterministic)  # before the Accelerator: it may be the first to touch CUDA
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),  # never MPS & co.: the same device choice as dfpipe.device
        # precision is ours (bf16 autocast on CUDA, see dfpipe.device.autocast): a launcher's
        # --mixed_precision must not change the numerics behind params.yaml's back
        mixed_precision="no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    if not acc.is_main_process:
        # INFO from every rank would repeat each line world times; warnings and errors still show
        logging.getLogger("dfpipe").setLevel(logging.WARNING)
    return acc


def set_determinism(enabled: bool, cuda: bool | None = None) -> None:
    """Deterministic GPU kernels for this process (``cuda``: default, whether CUDA is available).

    cuDNN: no autotuner (``benchmark`` picks kernels by timing, which varies run to run) and only
    deterministic algorithms; cuBLAS: a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, read when its first
    handle is made, so this must run before any matmul on the GPU; a value already set is kept);
    ``use_deterministic_algorithms`` with ``warn_only``: an op with no deterministic CUDA kernel warns
    (naming itself) instead of failing the run. CPU kernels already are deterministic: nothing to do.
    ``enabled`` False switches the flags off again (a later expert of the same process may ask for that).
    """
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = enabled
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def global_batch(batch_size: int, world: int) -> int:
    """The batch of one optimizer step: ``batch_size`` (per process) from each of ``world`` processes."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (the batch of each process), got {batch_size}")
    return batch_size * world


def scaled_lr(lr: float, batch: int, ref_batch: int, rule: LrScale) -> float:
    """``lr`` (tuned for a global batch of ``ref_batch``) for a global batch of ``batch``.

    sqrt: ``lr * sqrt(batch / ref_batch)`` (adaptive optimizers; timm's default for Adam-like ones);
    linear: ``lr * batch / ref_batch`` (Goyal et al., SGD); none: ``lr`` whatever the batch.
    """
    if rule == "none":
        return lr
    if ref_batch < 1:
        raise ConfigError(f"lr_ref_batch must be >= 1 with lr_scale {rule!r}, got {ref_batch}")
    power = {"sqrt": 0.5, "linear": 1.0}[rule]
    return lr * (batch / ref_batch) ** power


def maybe_sync_bn(model: torch.nn.Module, enabled: bool, acc: Accelerator) -> torch.nn.Module:
    """``model`` with SyncBatchNorm layers when asked for and usable: N > 1 processes on GPUs.

    Convert before the EMA copy and the DDP wrap. The state_dict keys stay those of BatchNorm, so
    ``best.pt`` loads into the plain model for prediction. gloo (CPU) has no SyncBatchNorm kernel.
    """
    if not enabled:
        return model
    if acc.num_processes == 1:
        log.info("sync_bn: one process, its BatchNorm already sees the whole batch")
        return model
    if acc.device.type != "cuda":
        log.info("sync_bn: no SyncBatchNorm on %s (GPUs only): each process keeps its own BN statistics",
                 acc.device.type)
        return model
    log.info("sync_bn: BatchNorm statistics over the global batch of %d processes", acc.num_processes)
    return convert_sync_batchnorm(model)


def gather_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, ...) of every rank concatenated in rank order, (world * B, ...); ``t`` itself on one process.

    With gradient when ``t`` has one (``torch.distributed.nn.functional.all_gather``: its backward sums
    over the ranks the gradients of this rank's slice); every rank must call it with the same shape.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    if t.requires_grad:
        return torch.cat(dist_nn.all_gather(t))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of ``rank`` in ``epoch``: distinct per rank and epoch, a function of them only."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


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
    holds its own (and the EMA averaged its own); validation, the KL teacher and ``last.pt`` need the
    same ones everywhere.
    """
    for buf in module.buffers():
        broadcast(buf, from_process=0)


def check_same(acc: Accelerator, value: int, what: str) -> None:
    """Raise if ``value`` differs between ranks (e.g. one rank resumes and another starts fresh)."""
    t = torch.tensor([value], dtype=torch.int64, device=acc.device)
    seen = acc.gather(t).cpu().tolist()
    if len(set(seen)) > 1:
        raise RuntimeError(f"ranks disagree on {what}: {seen}")
