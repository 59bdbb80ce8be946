"""Train one expert on the cluster split: joint CE + KL + NCE loss, EMA weights, AMP on GPU.

The EMA model (torch-ema) is both what gets evaluated and saved, and the teacher of the KL term.
The best checkpoint (by val AUC of the EMA weights) is self-describing: backbone, image size,
normalisation, cache size and the resolved config travel with the weights.

Every epoch end also writes ``last.pt`` (see :mod:`dfpipe.train.checkpoint`): a run that is killed
resumes at the next epoch, with the same result as an uninterrupted run, if the expert config and the
data are unchanged; a run killed mid-epoch restarts that epoch from its beginning. ``patience`` > 0
stops training after that many epochs without a better val AUC.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from torch_ema import ExponentialMovingAverage
from tqdm import tqdm

from ..config import ExpertConfig, TrainConfig
from ..data.dataset import CacheDataset
from ..data.samples import load_split_pool
from ..data.transforms import seed_worker, to_model_input, train_augment
from ..device import autocast, num_workers, pick_device
from ..io import write_csv, write_json
from ..losses import JointLoss
from ..metrics import summary
from ..models import build_expert
from .checkpoint import data_fingerprint, load_resumable, save_checkpoint, save_last, set_rng_state
from .sampling import SeededAugmentDataset, SeededSampler

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cache_size_of(pool: pd.DataFrame) -> int:
    return int(np.load(pool.cache_path.iloc[0], mmap_mode="r").shape[1])


def cosine_with_warmup(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    model.eval()
    out = []
    for x, _, _ in loader:
        x = to_model_input(x.to(device, non_blocking=True), model.img_size, model.mean, model.std,
                           device.type == "cuda")
        with autocast(device):
            out.append(model(x)["prob"].float().cpu().numpy())
    return np.concatenate(out)


def train_expert(cfg: TrainConfig, name: str) -> tuple[dict, pd.DataFrame]:
    """Train expert ``name`` of ``cfg.experts``; save the best EMA checkpoint. Returns (best, history)."""
    if name not in cfg.experts:
        raise KeyError(f"expert {name!r} not in params train.experts (have {sorted(cfg.experts)})")
    ecfg = cfg.experts[name]
    seed_everything(ecfg.seed)
    device = pick_device()
    df = load_split_pool(cfg.splits_csv, cfg.prepared_dir, cfg.augmented_dir)
    train_df = df[(df.subset == "train") & (ecfg.use_augmented | (df.origin != "aug"))].reset_index(drop=True)
    val_df = df[(df.subset == "val") & (df.origin != "aug")].reset_index(drop=True)
    log.info("expert %s: %d train (%d generated), %d val images, device %s", name, len(train_df),
             int((train_df.origin == "aug").sum()), len(val_df), device)

    g = torch.Generator().manual_seed(ecfg.seed)  # shuffle order + per-sample augmentation seeds
    train_loader, val_loader = _loaders(cfg, ecfg, train_df, val_df, g, device)
    model = build_expert(ecfg).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ExponentialMovingAverage(model.parameters(), decay=ecfg.ema_decay)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if ecfg.loss.kl > 0 else None
    loss_fn = _loss_fn(ecfg, train_df, device)
    opt = torch.optim.AdamW(model.parameters(), lr=ecfg.lr, weight_decay=ecfg.weight_decay)
    steps_per_epoch = max(1, len(train_loader))
    sched = cosine_with_warmup(opt, int(ecfg.warmup_epochs * steps_per_epoch), ecfg.epochs * steps_per_epoch)

    out_dir = Path(cfg.models_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    desc = {**model.describe(), "cache_size": cache_size_of(df)}
    key = {"config": dataclasses.asdict(ecfg), "data": data_fingerprint(train_df, val_df, desc)}
    history: list[dict] = []
    best: dict = {"auc": -1.0}
    first = 1
    ckpt = load_resumable(out_dir, key)
    if ckpt is not None:
        _restore(ckpt, model, opt, sched, ema, teacher, g)
        history, best, first = ckpt["history"], ckpt["best"], ckpt["epoch"] + 1
    last = dict(key=key, model=model, opt=opt, sched=sched, ema=ema, loader_generator=g)
    for epoch in range(first, ecfg.epochs + 1):
        row = _train_epoch(model, teacher, ema, train_loader, loss_fn, opt, sched, device, channels_last, epoch)
        with ema.average_parameters():
            probs = predict_probs(model, val_loader, device)
            val = summary(val_df.label.to_numpy(), probs)
            row.update({f"val_{k}": v for k, v in val.items() if not k.startswith("n_")})
            if val["auc"] > best["auc"]:
                best = {**val, "epoch": epoch}
                save_checkpoint(out_dir / "best.pt", model, desc, ecfg, name, best)
        history.append(row)
        _log_epoch(name, row)
        stop = _should_stop(ecfg.patience, epoch, best)
        if stop:
            log.info("expert %s: early stop after epoch %d, no better val auc for %d epochs (best %.4f at epoch %d)",
                     name, epoch, ecfg.patience, best["auc"], best["epoch"])
        save_last(out_dir / "last.pt", epoch=epoch, finished=stop or epoch == ecfg.epochs, best=best,
                  history=history, **last)
        if stop:
            break
    return best, pd.DataFrame(history)


def _loaders(cfg: TrainConfig, ecfg: ExpertConfig, train_df: pd.DataFrame, val_df: pd.DataFrame,
             g: torch.Generator, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Training batches come from :class:`SeededSampler` (order and augmentation from ``g`` only)."""
    workers = num_workers(cfg.workers)
    train_ds = SeededAugmentDataset(CacheDataset(train_df), train_augment(ecfg.augment, ecfg.seed))
    train_loader = DataLoader(train_ds, batch_size=ecfg.batch_size, sampler=SeededSampler(len(train_ds), g),
                              drop_last=len(train_df) > ecfg.batch_size, num_workers=workers,
                              worker_init_fn=seed_worker, pin_memory=device.type == "cuda",
                              # a private generator for the workers' base seed: the global RNG stays untouched
                              generator=torch.Generator().manual_seed(ecfg.seed),
                              persistent_workers=workers > 0)
    val_loader = DataLoader(CacheDataset(val_df), batch_size=ecfg.batch_size * 2, num_workers=workers,
                            pin_memory=device.type == "cuda")
    return train_loader, val_loader


def _loss_fn(ecfg: ExpertConfig, train_df: pd.DataFrame, device: torch.device) -> JointLoss:
    counts = np.bincount(train_df.label.to_numpy(), minlength=2).astype(np.float64)
    class_weights = torch.tensor(counts.sum() / (2 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    return JointLoss(ecfg.loss, label_smoothing=ecfg.label_smoothing, temperature=ecfg.temperature,
                     kl_temperature=ecfg.kl_temperature, class_weights=class_weights)


def _restore(ckpt: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, sched, ema,
             teacher: torch.nn.Module | None, g: torch.Generator) -> None:
    """Load a ``last.pt`` state; the KL teacher is rebuilt from the EMA (+ the student's buffers)."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    ema.load_state_dict(ckpt["ema"])
    if teacher is not None:
        _sync_teacher(teacher, ema, model)
    set_rng_state(ckpt["rng"], g)


def _sync_teacher(teacher: torch.nn.Module, ema, model: torch.nn.Module) -> None:
    """The teacher runs the EMA weights (+ the student's BN statistics)."""
    ema.copy_to(teacher.parameters())
    for tb, sb in zip(teacher.buffers(), model.buffers()):
        tb.copy_(sb)


def _should_stop(patience: int, epoch: int, best: dict) -> bool:
    """Early stopping: ``patience`` epochs in a row without a better val AUC (0 = never)."""
    return patience > 0 and "epoch" in best and epoch - best["epoch"] >= patience


def _log_epoch(name: str, row: dict) -> None:
    log.info("expert %s epoch %d: loss %.4f (ce %.4f kl %.4f nce %.4f) val auc %.4f tpr@1e-3 %.3f, %.0f img/s",
             name, row["epoch"], row["loss"], row["ce"], row["kl"], row["nce"], row["val_auc"],
             row["val_tpr_at_fpr_1e-3"], row["images_per_s"])


def _train_epoch(model, teacher, ema, loader, loss_fn, opt, sched, device, channels_last, epoch) -> dict:
    model.train()
    sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "nce": 0.0}
    n_seen, t0 = 0, time.perf_counter()
    for x, y, _ in tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False):
        x = to_model_input(x.to(device, non_blocking=True), model.img_size, model.mean, model.std, channels_last)
        y = y.to(device, non_blocking=True)
        with autocast(device):
            out = model(x)  # {"logits": (B, 2), "prob": (B,), "feat": (B, D)}
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)["logits"].float()
        out = {k: v.float() for k, v in out.items()}  # losses in fp32
        losses = loss_fn(out, y, teacher_logits=teacher_logits)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)
        opt.step()
        sched.step()
        ema.update()
        if teacher is not None:
            _sync_teacher(teacher, ema, model)
        b = len(y)
        n_seen += b
        sums["loss"] += float(losses["total"].detach()) * b
        for k in ("ce", "kl", "nce"):
            sums[k] += float(losses[k]) * b
    elapsed = time.perf_counter() - t0
    row = {"epoch": epoch, **{k: v / max(1, n_seen) for k, v in sums.items()},
           "lr": opt.param_groups[0]["lr"], "images_per_s": n_seen / max(elapsed, 1e-9)}
    return row


def run_train(cfg: TrainConfig, name: str, history_csv: str | Path, metrics_json: str | Path) -> dict:
    best, history = train_expert(cfg, name)
    write_csv(history_csv, history)
    write_json(metrics_json, {k: v for k, v in best.items()})
    return best
