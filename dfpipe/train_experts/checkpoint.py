"""Checkpoints of stage 4: the best EMA weights (``best.pt``) and the resumable state (``last.pt``).

``best.pt`` (format :data:`CHECKPOINT_FORMAT`) describes itself and stores each setting once: ``description``
(the expert's ``describe()``: architecture and ``input``, the input contract: size, mode, mean, std), ``stage1``
(how stage 1 made the images it trained on), ``state_dict``, ``config`` (the other training settings: the
expert's config but for ``img_size`` / ``input_mode``, which are ``description["input"]``), ``metrics`` and
``name``. :func:`dfpipe.ensemble_predict.experts.read_checkpoint` also reads format 1 (the size stored three
times) and refuses older or unknown files with one line saying to retrain.

``best.pt`` also holds ``training``: ``{"epoch": last epoch run, "epochs": planned, "finished": bool}``, rewritten
at every epoch end (:func:`mark_training`), so a run killed mid-way leaves a ``best.pt`` that says so and
:func:`dfpipe.ensemble_predict.experts.load_expert` refuses it (early stopping counts as finished). A file without
the record predates it and is taken as finished.

``last.pt`` is written atomically at the end of every epoch. It holds everything needed to continue
exactly where the run stopped: model, optimizer, scheduler and EMA states (EMA None when off), the
history rows, the best metrics so far, and the RNG states (python, numpy, torch CPU/CUDA, the DataLoader
generator; dropout is re-seeded per epoch and rank anyway, see :func:`.distributed.rank_seed`). A run
killed mid-epoch restarts that epoch from its beginning (from the state at the end of the previous one).
It holds tensors and plain values only and is read with ``weights_only=True``: a planted file cannot run code.

Both files are deterministic for a fixed seed, config and data (``models/<name>`` keeps its DVC hash
from run to run): wall-clock measurements (:data:`TIMING_KEYS`) live only in the training logs (:mod:`.logs`).
Under DDP only rank 0 writes them; ``last.pt`` holds rank 0's state, which is every rank's (but for the
torch RNG, which each rank re-seeds at the next epoch's start).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..config import ExpertConfig
from ..data.preprocess import Stage1
from ..io import save_torch
from ..models import CHECKPOINT_FORMAT

log = logging.getLogger(__name__)

INPUT_KEYS = ("img_size", "input_mode")  # ExpertConfig keys a checkpoint holds as description["input"] only

# 2: no timings in the history, CUDA RNG of the current device only, world size; 3: timm EMA; 4: plain types and
# tensors only (numpy's RNG state as a list), read with weights_only=True
LAST_FORMAT = 4
TIMING_KEYS = ("images_per_s",)  # history columns measured, not computed: kept out of last.pt


def training_record(epoch: int, epochs: int, finished: bool) -> dict:
    """``best.pt``'s ``training`` entry: the last epoch run, the planned epochs, whether the run ended."""
    return {"epoch": epoch, "epochs": epochs, "finished": finished}


def save_checkpoint(path: Path, model: torch.nn.Module, stage1: Stage1, ecfg: ExpertConfig, name: str,
                    metrics: dict, training: dict | None = None) -> None:
    """Save the weights and buffers of ``model`` (the EMA's model when there is one), its description (with
    its input contract), ``stage1``, the record of the images it was trained on, and ``training``
    (:func:`training_record`; default: a finished run of ``ecfg.epochs``)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    config = {k: v for k, v in dataclasses.asdict(ecfg).items() if k not in INPUT_KEYS}
    ckpt = {"format": CHECKPOINT_FORMAT, "name": name, "description": model.describe(),
            "stage1": dataclasses.asdict(stage1), "state_dict": state, "config": config, "metrics": metrics,
            "training": training or training_record(ecfg.epochs, ecfg.epochs, True)}
    save_torch(_canonical(ckpt), path)


def mark_training(path: Path, training: dict) -> None:
    """Rewrite ``best.pt``'s ``training`` entry (an epoch that did not beat the best still moves it on).

    Canonical pickles (:func:`_canonical`) make the rewrite's bytes depend on the values only, so a resumed
    run's ``best.pt`` is the uninterrupted run's to the byte."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["training"] = training
    save_torch(_canonical(ckpt), path)


def data_fingerprint(train_df: pd.DataFrame, val_df: pd.DataFrame, desc: dict) -> str:
    """A hash of what a run trains and validates on (uids, labels, order) and of the model input."""
    h = hashlib.sha256()
    for df in (train_df, val_df):
        h.update("\n".join(f"{u},{y}" for u, y in zip(df.uid, df.label)).encode())
        h.update(b"|")
    h.update(repr(sorted(desc.items())).encode())
    return h.hexdigest()


def rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's state as plain values: an ndarray would need unpickling arbitrary globals (weights_only=False)
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state(),
             "loader": loader_generator.get_state()}
    if torch.cuda.is_available():
        # this process's device only: under DDP rank r restores it onto its own cuda:r
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_last(path: Path, *, key: dict, epoch: int, finished: bool, model: torch.nn.Module,
              opt: torch.optim.Optimizer, sched: Any, ema: Any, best: dict, history: list[dict],
              loader_generator: torch.Generator, world: int = 1) -> None:
    """Write the resumable state of the run after ``epoch`` (atomically; timings left out of the history)."""
    history = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]
    ckpt = {"format": LAST_FORMAT, "key": key, "epoch": epoch, "finished": finished, "world": world,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "ema": None if ema is None else ema.state_dict(), "best": best, "history": history, "rng": rng_state(loader_generator)}
    save_torch(_canonical(ckpt), path)


def _canonical(obj: Any) -> Any:
    """Plain containers rebuilt with every string interned, so equal values pickle to equal bytes.

    Pickle writes an object once and then refers back to it by identity: a resumed run's strings
    (unpickled from last.pt, e.g. the optimizer's ``"lr"``) are other objects than a fresh run's
    literals, which alone changed the bytes of an otherwise equal ``last.pt``. Dict subclasses (module
    state dicts, which carry ``_metadata``) are kept as they are: their keys come from the live model.
    """
    if isinstance(obj, str):
        return sys.intern(obj)
    if type(obj) is dict:
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v) for v in obj)
    return obj


def load_resumable(out_dir: Path, key: dict) -> dict | None:
    """``last.pt`` of an unfinished run with the same ``key`` (config, data, processes), else None (the reason
    is logged)."""
    path = out_dir / "last.pt"
    if not path.is_file():
        log.info("no %s: starting fresh", path)
        return None
    try:
        # tensors and plain values only: a file that wants to run code is refused, not executed
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt, foreign or older (format < 4) file must not stop training
        log.warning("cannot read %s (%s): starting fresh", path, exc)
        return None
    if ckpt.get("format") != LAST_FORMAT or ckpt.get("key") != key:
        log.info("%s was written for another config or data (or number of processes): starting fresh", path)
        return None
    if ckpt.get("finished"):
        log.info("%s is a finished run: starting fresh", path)
        return None
    if ckpt["best"].get("epoch") is not None and not (out_dir / "best.pt").is_file():
        log.info("%s has no best.pt beside it: starting fresh", path)
        return None
    log.info("resuming from %s after epoch %d", path, ckpt["epoch"])
    return ckpt
