"""Train one expert on the cluster split: joint CE + KL + NCE loss (+ the information losses of an expert
with local branches, and mixup: :mod:`dfpipe.models.info`), EMA weights, AMP on GPU.

The EMA (timm's ModelEmaV3 over weights and BN buffers, time constant ``ema_epochs``, see :mod:`.ema`) is
both what gets evaluated and saved, and the teacher of the KL term; with ``ema_epochs`` 0 the student
itself is. The best checkpoint (by val AUC of the EMA) is self-describing: backbone, image size, the
preprocessing contract (:mod:`dfpipe.data.preprocess`) and the resolved config travel with the weights.

Every epoch end also writes ``last.pt`` (see :mod:`dfpipe.train_experts.checkpoint`): a run that is killed
resumes at the next epoch, with the same result as an uninterrupted run, if the expert config and the
data are unchanged; a run killed mid-epoch restarts that epoch from its beginning. ``patience`` > 0
stops training after that many epochs without a better val AUC.

The same code runs one process (``python 04_train_experts.py``) or one rank of a DDP run
(``accelerate launch`` / ``torchrun``): see :mod:`dfpipe.train_experts.distributed`. ``batch_size`` is the batch
of each process (global = batch_size x N, ``lr`` rescaled from ``lr_ref_batch``); each rank trains on its
shard of the same seeded epoch order, the NCE term sees the global batch, val predictions of all ranks
are gathered so val AUC is that of the whole val set, and only rank 0 logs and writes files.

``freeze_backbone`` makes the expert a probe on frozen features (UnivFD, Ojha et al. 2023; see
:class:`dfpipe.models.Expert`): the optimizer gets only the parameters that require gradients (the heads), so
``last.pt``'s optimizer state is theirs; the backbone stays in eval mode through every ``model.train()``
(the EMA copy and a DDP wrap included: the override is the expert's), and DDP reduces only the heads'
gradients (it skips parameters without ``requires_grad``).

Per-epoch logs go through DVCLive (:mod:`dfpipe.train_experts.logs`): ``run(cfg, layout)`` writes
``<train_logs>/<name>/plots/metrics/*.tsv`` (one step per epoch) and ``<train_logs>/<name>/metrics.json`` (the best epoch).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import ExpertConfig, TrainConfig
from ..data.dataset import StoreDataset
from ..data.preprocess import InputPolicy
from ..data.samples import load_split_pool
from ..data.store import read_store_record
from ..data.transforms import seed_worker, to_model_input, train_augment
from ..device import autocast, num_workers
from ..errors import ConfigError, DataError, UnknownNameError
from ..layout import Layout
from ..losses import JointLoss, mixup
from ..metrics import summary
from ..models import build_expert, trainable_parameters
from .checkpoint import (data_fingerprint, load_resumable, mark_training, save_checkpoint, save_last, set_rng_state,
                         training_record)
from .distributed import (check_same, gather_across_ranks, gather_by_index, global_batch, make_accelerator,
                          maybe_sync_bn, rank_seed, reduce_sum, scaled_lr, sync_buffers)
from .ema import make_ema
from .logs import TrainLog
from .sampling import PairBatchSampler, SeededAugmentDataset, SeededSampler, epoch_length, pair_groups

log = logging.getLogger(__name__)

LOSS_TERMS = ("ce", "kl", "nce", "info_ce", "lil", "gil")  # the loss terms an epoch's row can hold, in log order
MIXUP_STREAM = 0x6D6978  # the mixup generator's own seed word ("mix"), apart from the dropout seeds


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def input_policy(ecfg: ExpertConfig) -> InputPolicy:
    return InputPolicy(ecfg.input_mode, ecfg.img_size)


def cosine_with_warmup(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                  with_index: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """P(fake) of each image of ``loader`` (and, ``with_index``, the dataset index of each)."""
    model.eval()
    out, index = [], []
    for xs, _, idx in loader:
        (x,) = xs.values()  # a one-policy loader: {policy key: uint8 (B, S, S, 3)}
        x = to_model_input(x.to(device, non_blocking=True), model.img_size, model.mean, model.std,
                           device.type == "cuda")
        with autocast(device):
            out.append(model(x)["prob"].float().cpu().numpy())
        index.append(idx.numpy())
    probs = np.concatenate(out) if out else np.zeros(0, np.float32)  # a rank may get no val image
    if with_index:
        return probs, (np.concatenate(index) if index else np.zeros(0, np.int64))
    return probs


def train_expert(cfg: TrainConfig, layout: Layout, name: str, acc: Accelerator | None = None,
                 history_csv: str | Path | None = None,
                 live_dir: str | Path | None = None) -> tuple[dict, pd.DataFrame]:
    """Train expert ``name`` of ``cfg.experts`` on ``layout``'s split into ``<models>/<name>``; save the best (EMA)
    checkpoint. Returns (best, history).

    One process or one rank of a DDP run (``acc``, default: a new one for this expert; see :mod:`.distributed`);
    every rank waits for the others before it returns.
    Rank 0 logs every epoch (timings included, unlike ``last.pt``) to the DVCLive directory ``live_dir``
    and/or rewrites the plain CSV ``history_csv`` (see :mod:`.logs`; each optional).
    """
    ecfg = _expert(cfg, name)
    _check_frozen(ecfg)
    acc = acc or make_accelerator(leaves_parameters_unused(ecfg), ecfg.deterministic)
    seed_everything(ecfg.seed)  # the same on every rank: same initial weights (dropout: rank_seed per epoch)
    device, main = acc.device, acc.is_main_process
    df = load_split_pool(layout.splits, layout.prepared, layout.augmented)
    train_df = df[(df.subset == "train") & (ecfg.use_augmented | (df.origin != "aug"))].reset_index(drop=True)
    val_df = df[(df.subset == "val") & (df.origin != "aug")].reset_index(drop=True)
    batch = global_batch(ecfg.batch_size, acc.num_processes)
    lr = scaled_lr(ecfg.lr, batch, ecfg.lr_ref_batch, ecfg.lr_scale)
    log.info("expert %s: %d train (%d generated), %d val images, device %s, %d process(es) x batch %d = global "
             "batch %d, lr %.3g (%s from %.3g at %d)", name, len(train_df), int((train_df.origin == "aug").sum()),
             len(val_df), device, acc.num_processes, ecfg.batch_size, batch, lr, ecfg.lr_scale, ecfg.lr,
             ecfg.lr_ref_batch)

    g = torch.Generator().manual_seed(ecfg.seed)  # shuffle order + per-sample augmentation seeds
    train_loader, val_loader = _loaders(cfg, ecfg, train_df, val_df, g, acc)
    loss_fn = _loss_fn(ecfg, train_df, device)  # from the data too (class weights); draws no random number
    model = maybe_sync_bn(build_expert(ecfg), ecfg.sync_bn, acc).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ecfg.freeze_backbone:
        _log_frozen(name, model)
    steps_per_epoch = max(1, len(train_loader))
    ema = make_ema(model, ecfg.ema_epochs, steps_per_epoch, teacher=ecfg.loss.kl > 0)  # None: the student is
    teacher = ema.module if ema is not None and ecfg.loss.kl > 0 else None
    evaluated = model if ema is None else ema.module  # validated and saved in best.pt
    opt = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=ecfg.weight_decay)
    sched = cosine_with_warmup(opt, int(ecfg.warmup_epochs * steps_per_epoch), ecfg.epochs * steps_per_epoch)

    out_dir = Path(layout.models) / name
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    # the preprocessing contract: stage 1's record + the expert's input contract (model.input)
    stage1 = read_store_record(layout.prepared)
    desc = {**model.describe(), "stage1": dataclasses.asdict(stage1)}  # what best.pt describes
    key = {"config": dataclasses.asdict(ecfg), "data": data_fingerprint(train_df, val_df, desc),
           "world": acc.num_processes}  # N processes: another global batch, lr and EMA decay, so another run
    history, best, first = [], {"auc": -1.0}, 1
    ckpt = load_resumable(out_dir, key)
    if ckpt is not None:
        history, best, first = _resume(ckpt, model, opt, sched, ema, g)
    check_same(acc, first, "the first epoch (resume from last.pt or not)")
    logs = TrainLog(live_dir, history_csv) if main else TrainLog()
    history = logs.start(history, best)  # a resumed run's rows again, first
    step_model = acc.prepare_model(model, device_placement=False)  # DDP when launched on N > 1 processes
    last = dict(key=key, model=model, opt=opt, sched=sched, ema=ema, loader_generator=g, world=acc.num_processes)
    for epoch in range(first, ecfg.epochs + 1):
        torch.manual_seed(rank_seed(ecfg.seed, epoch, acc.process_index))  # dropout: own masks per rank, resumable
        mix = None  # mixup draws of this rank and epoch: a function of (seed, epoch, rank) only, so resumable
        if ecfg.mixup > 0:
            mix = (ecfg.mixup, np.random.default_rng([ecfg.seed, epoch, acc.process_index, MIXUP_STREAM]))
        row = _train_epoch(step_model, teacher, ema, train_loader, loss_fn, opt, sched, acc, channels_last, epoch,
                           mix=mix)
        _end_of_epoch_sync(model, ema)
        probs = _predict_val(evaluated, val_loader, acc, len(val_df))
        val = summary(val_df.label.to_numpy(), probs)
        row.update({f"val_{k}": v for k, v in val.items() if not k.startswith("n_")})
        history.append(row)
        improved = val["auc"] > best["auc"]
        if improved:
            best = {**val, "epoch": epoch}
        stop = _should_stop(ecfg.patience, epoch, best)
        if main:
            # best.pt says how far the run got (load_expert refuses an unfinished one): before last.pt, so a
            # kill in between reruns this epoch
            training = training_record(epoch, ecfg.epochs, stop or epoch == ecfg.epochs)
            if improved:
                save_checkpoint(out_dir / "best.pt", evaluated, stage1, ecfg, name, best, training)
            elif (out_dir / "best.pt").is_file():
                mark_training(out_dir / "best.pt", training)
            _log_epoch(name, row)
            if stop:
                log.info("expert %s: early stop after epoch %d, no better val auc for %d epochs (best %.4f at "
                         "epoch %d)", name, epoch, ecfg.patience, best["auc"], best["epoch"])
            save_last(out_dir / "last.pt", epoch=epoch, finished=stop or epoch == ecfg.epochs, best=best,
                      history=history, **last)
            logs.epoch(history, best)
        if stop:
            break
    logs.end()
    acc.wait_for_everyone()  # no rank leaves before the reports exist
    return best, pd.DataFrame(history)


def _expert(cfg: TrainConfig, name: str) -> ExpertConfig:
    if name not in cfg.experts:
        raise UnknownNameError(f"expert {name!r} not in params train_experts.experts (have {sorted(cfg.experts)})")
    return cfg.experts[name]


def _check_frozen(ecfg: ExpertConfig) -> None:
    """Settings a frozen backbone cannot train well with: an error when the classifier would learn no labels,
    a warning when the NCE term can reach nothing the classifier reads."""
    if not ecfg.freeze_backbone:
        return
    if ecfg.loss.ce <= 0:
        raise ConfigError(f"freeze_backbone trains only the heads, and only loss.ce teaches the classifier the labels: "
                          f"set loss.ce > 0 (it is {ecfg.loss.ce})")
    if ecfg.loss.nce > 0 and ecfg.info_heads == 0:
        log.warning("loss.nce = %g with freeze_backbone reaches only the projection head (proj_dim > 0) or nothing, "
                    "neither of which the classifier reads: the term cannot change the scores", ecfg.loss.nce)


def _log_frozen(name: str, model: torch.nn.Module) -> None:
    """One line: which of the expert's modules train on the frozen backbone, and how many parameters that is."""
    trained = [child for child, m in model.named_children() if any(p.requires_grad for p in m.parameters())]
    n_train = sum(p.numel() for p in trainable_parameters(model))
    n_all = sum(p.numel() for p in model.parameters())
    log.info("expert %s: frozen backbone (eval mode, BN statistics as loaded); training %s: %d of %d parameters",
             name, ", ".join(trained), n_train, n_all)


def _loaders(cfg: TrainConfig, ecfg: ExpertConfig, train_df: pd.DataFrame, val_df: pd.DataFrame,
             g: torch.Generator, acc: Accelerator) -> tuple[DataLoader, DataLoader]:
    """Training batches come from :class:`SeededSampler`, or with ``pair_batches`` :class:`PairBatchSampler`
    (order and augmentation from ``g`` only).

    Each rank loads its shard: ``batch_size`` training samples per step (of a global ``batch_size x world``),
    every ``world``-th val image (val predictions are gathered, see :func:`_predict_val`).
    """
    workers = num_workers(cfg.workers)
    rank, world = acc.process_index, acc.num_processes
    batch = ecfg.batch_size
    length = epoch_length(len(train_df), global_batch(batch, world), world)
    if length == 0:
        raise DataError(f"{len(train_df)} training images cannot be split over {world} processes")
    pin = acc.device.type == "cuda"
    policy = input_policy(ecfg)
    train_ds = SeededAugmentDataset(StoreDataset(train_df, [policy]), policy, train_augment(ecfg.augment, ecfg.seed))
    if ecfg.pair_batches:
        sampler = _pair_sampler(train_df, g, global_batch(batch, world), rank, world, length)
    else:
        sampler = SeededSampler(len(train_ds), g, rank=rank, world=world, length=length)
    # the sampler yields whole batches only (the old drop_last), so every rank runs the same steps
    train_loader = DataLoader(train_ds, batch_size=batch, sampler=sampler, drop_last=False, num_workers=workers,
                              worker_init_fn=seed_worker, pin_memory=pin,
                              # a private generator for the workers' base seed: the global RNG stays untouched
                              generator=torch.Generator().manual_seed(ecfg.seed),
                              persistent_workers=workers > 0)
    val_loader = DataLoader(StoreDataset(val_df, [policy]), batch_size=batch * 2, sampler=range(rank, len(val_df), world),
                            num_workers=workers, pin_memory=pin)
    return train_loader, val_loader


def _pair_sampler(train_df: pd.DataFrame, g: torch.Generator, batch: int, rank: int, world: int,
                  length: int) -> PairBatchSampler:
    """Each original with its stage-2 images in one global batch of ``batch``; logs what the groups are."""
    groups = pair_groups(train_df)
    sizes = np.bincount(groups)
    log.info("pair batches: %d training images in %d groups (%d of 2+ images, largest %d), packed whole into "
             "global batches of %d", len(groups), len(sizes), int((sizes > 1).sum()), int(sizes.max()), batch)
    if (sizes > 1).sum() == 0:
        log.warning("pair_batches is on but no training image has a stage-2 image made from it: every group is "
                    "one image, the batches are a plain shuffle")
    return PairBatchSampler(groups, g, batch, rank=rank, world=world, length=length)


def leaves_parameters_unused(ecfg: ExpertConfig) -> bool:
    """Whether the expert has a trainable layer that the loss's weights leave out of the graph (no gradient).

    DDP then needs ``find_unused_parameters`` (without it the second step fails); the search costs a graph
    traversal per step, so it is asked for only here. The layers and the loss terms that read them (the
    :class:`~dfpipe.losses.JointLoss` that :func:`_loss_fn` builds): the classifier, by CE, KL and GIL; the
    projection head (``proj_dim``), by NCE only. The local branches (``info_heads``) are always in the graph:
    their CE enters the total times ``loss.ce`` even at 0 (a zero gradient, which DDP accepts).
    """
    w = ecfg.loss
    return (w.ce == 0 and w.kl == 0 and w.gil == 0) or (ecfg.proj_dim > 0 and w.nce == 0)


def _loss_fn(ecfg: ExpertConfig, train_df: pd.DataFrame, device: torch.device) -> JointLoss:
    if (ecfg.loss.lil > 0 or ecfg.loss.gil > 0) and ecfg.info_heads < 2:
        raise ConfigError(f"loss.lil = {ecfg.loss.lil}, loss.gil = {ecfg.loss.gil} need local branches: set "
                          f"info_heads >= 2 (it is {ecfg.info_heads}), or both weights to 0")
    if ecfg.mixup < 0:
        raise ConfigError(f"mixup is the Beta(alpha, alpha) parameter, >= 0 (0 = off); got {ecfg.mixup}")
    counts = np.bincount(train_df.label.to_numpy(), minlength=2).astype(np.float64)
    class_weights = torch.tensor(counts.sum() / (2 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    return JointLoss(ecfg.loss, label_smoothing=ecfg.label_smoothing, temperature=ecfg.temperature,
                     kl_temperature=ecfg.kl_temperature, class_weights=class_weights,
                     gather=gather_across_ranks,  # NCE, LIL over the global batch (the identity on one process)
                     info_temperature=ecfg.info_temperature, info_mi=ecfg.info_mi)


def _resume(ckpt: dict, *state) -> tuple[list[dict], dict, int]:
    """Restore a ``last.pt`` into ``state`` (model, opt, sched, ema, g): (history, best, first epoch).

    Only a run of the same number of processes resumes (it is in the key): ``batch_size`` is per process.
    """
    _restore(ckpt, *state)
    return ckpt["history"], ckpt["best"], ckpt["epoch"] + 1


def _restore(ckpt: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, sched, ema: ModelEmaV3 | None,
             g: torch.Generator) -> None:
    """Load a ``last.pt`` state (the EMA, when there is one, is also the KL teacher)."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"], g)


def _should_stop(patience: int, epoch: int, best: dict) -> bool:
    """Early stopping: ``patience`` epochs in a row without a better val AUC (0 = never)."""
    return patience > 0 and "epoch" in best and epoch - best["epoch"] >= patience


def _log_epoch(name: str, row: dict) -> None:
    terms = " ".join(f"{k} {row[k]:.4f}" for k in LOSS_TERMS if k in row)
    log.info("expert %s epoch %d: loss %.4f (%s) val auc %.4f tpr@1e-3 %.3f, %.0f img/s",
             name, row["epoch"], row["loss"], terms, row["val_auc"], row["val_tpr_at_fpr_1e-3"], row["images_per_s"])


def _end_of_epoch_sync(model: torch.nn.Module, ema: ModelEmaV3 | None) -> None:
    """Every rank gets rank 0's BN statistics, the student's and the EMA's (val, teacher and last.pt see the
    same); a no-op on one process."""
    sync_buffers(model)
    if ema is not None:
        sync_buffers(ema.module)


def _predict_val(model: torch.nn.Module, loader: DataLoader, acc: Accelerator, n: int) -> np.ndarray:
    """Probabilities of the whole val set, on every rank: each predicts its shard, then gather by index.

    The unwrapped model: a DDP forward would broadcast buffers, a collective the uneven shards could hang.
    """
    probs, index = predict_probs(model, loader, acc.device, with_index=True)
    return gather_by_index(acc, index, probs, n)


def _train_epoch(model, teacher, ema, loader, loss_fn, opt, sched, acc, channels_last, epoch, mix=None) -> dict:
    """One epoch of ``model`` (DDP-wrapped under a launcher: backward all-reduces the gradients).

    ``teacher`` (the EMA's model, or None without KL) gives the KL targets; ``ema`` (or None) is updated
    from the unwrapped student after each optimizer step. ``mix``: (alpha, numpy Generator) for mixup of
    every batch (the teacher sees the mixed batch too), or None. The row holds the mean of every loss term
    the loss returns (ce, kl, nce; info_ce, lil, gil for an expert with local branches).
    """
    model.train()
    net = acc.unwrap_model(model)  # img_size, mean, std
    device = acc.device
    sums: dict[str, float] = {"loss": 0.0}
    n_seen, t0 = 0, time.perf_counter()
    for xs, y, _ in tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not acc.is_main_process):
        (x,) = xs.values()  # uint8 (b, S, S, 3), already cut to the expert's input policy in the workers
        x = to_model_input(x.to(device, non_blocking=True), net.img_size, net.mean, net.std, channels_last)
        y = y.to(device, non_blocking=True)
        mixed = None
        if mix is not None:
            x, y_b, lam = mixup(x, y, *mix)  # (b, 3, S, S) lam x + (1 - lam) x[perm]; labels y and y_b
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            mixed = (y_b, lam)
        with autocast(device):
            out = model(x)  # {"logits": (b, 2), "prob": (b,), "feat": (b, D), ...}, b = this rank's share
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)["logits"].float()
        out = {k: v.float() for k, v in out.items()}  # losses in fp32
        losses = loss_fn(out, y, teacher_logits=teacher_logits, mix=mixed)
        opt.zero_grad(set_to_none=True)
        acc.backward(losses["total"])
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)  # on the all-reduced gradients
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(net)  # the same params on every rank: the same EMA weights (buffers: per rank)
        b = len(y)
        n_seen += b
        sums["loss"] += float(losses["total"].detach()) * b
        for k in LOSS_TERMS:
            if k in losses:
                sums[k] = sums.get(k, 0.0) + float(losses[k]) * b
    totals = reduce_sum(acc, [float(n_seen), *sums.values()])  # over the ranks: means of the global epoch
    n_all = totals[0]
    elapsed = time.perf_counter() - t0
    row = {"epoch": epoch, **{k: v / max(1.0, n_all) for k, v in zip(sums, totals[1:])},
           "lr": opt.param_groups[0]["lr"], "images_per_s": n_all / max(elapsed, 1e-9)}
    return row


def run(cfg: TrainConfig, layout: Layout, expert: str | None = None, history: str = "") -> dict[str, dict]:
    """Stage 4: train ``expert`` (default: every expert of ``cfg.experts``, one after another), logging each to
    the DVCLive directory ``<train_logs>/<name>`` (rank 0; see :mod:`.logs`) and, when ``history`` is given, to
    the plain per-epoch CSV ``history.format(name=name)``. Returns name -> best metrics, the same on every rank."""
    out = {}
    for name in [expert] if expert else list(cfg.experts):
        out[name], _ = train_expert(cfg, layout, name, history_csv=history.format(name=name) or None,
                                    live_dir=Path(layout.train_logs) / name)
    return out
