"""Load the experts and score images: the ONE scoring path of the submission (and later CLI/API).

Input is always uint8 RGB. Images from the stage-1 cache are already ``cache_size`` square; any other
image (a file given to a CLI) is first resized exactly as stage 1 does, so every path sees the same
pixels. Each expert then resizes/normalises on the device (:func:`to_model_input`), runs every TTA
view, and averages its probabilities over the views; experts are combined over the whole set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import PredictConfig
from .data.dataset import CacheDataset
from .data.images import resize_square
from .data.samples import load_manifest, load_pool
from .data.transforms import to_model_input
from .device import autocast, num_workers, pick_device
from .io import write_csv, write_json
from .metrics import MetricError, roc_points, summary
from .models import expert_from_description

log = logging.getLogger(__name__)
TTA_VIEWS = ("identity", "hflip")
COMBINE = ("mean_prob", "mean_logit", "rank")


@dataclass
class LoadedExpert:
    name: str
    model: torch.nn.Module
    description: dict


def load_expert(path: str | Path, device: torch.device) -> LoadedExpert:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (train it: dvc repro train_experts)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = expert_from_description(ckpt["description"])
    model.load_state_dict(ckpt["state_dict"])
    model = model.eval().requires_grad_(False).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return LoadedExpert(ckpt["name"], model, ckpt["description"])


def combine_scores(per_expert: np.ndarray, method: str) -> np.ndarray:
    """(E, N) expert probabilities -> (N,) ensemble score in [0, 1]."""
    if method == "mean_prob":
        return per_expert.mean(axis=0)
    if method == "mean_logit":
        p = np.clip(per_expert, 1e-7, 1 - 1e-7)
        return 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)).mean(axis=0)))
    if method == "rank":  # each expert's scores -> ranks in [0, 1]; needs a whole set, not one image
        n = per_expert.shape[1]
        ranks = np.stack([(rankdata(s) - 1) / max(1, n - 1) for s in per_expert])
        return ranks.mean(axis=0)
    raise ValueError(f"unknown combine {method!r}; choose one of {COMBINE}")


class Ensemble:
    def __init__(self, experts: list[LoadedExpert], tta: list[str], combine: str, device: torch.device):
        if not experts:
            raise ValueError("the ensemble needs at least one expert")
        bad = [v for v in tta if v not in TTA_VIEWS]
        if bad or not tta:
            raise ValueError(f"unknown TTA view(s) {bad or tta}; choose from {TTA_VIEWS}")
        if combine not in COMBINE:
            raise ValueError(f"unknown combine {combine!r}; choose one of {COMBINE}")
        sizes = {e.description["cache_size"] for e in experts}
        if len(sizes) > 1:
            raise ValueError(f"experts were trained on different cache sizes {sorted(sizes)}")
        self.experts, self.tta, self.combine, self.device = experts, list(tta), combine, device
        self.cache_size = sizes.pop()

    @classmethod
    def load(cls, models_dir: str | Path, names: list[str], tta: list[str], combine: str,
             device: torch.device | None = None) -> "Ensemble":
        device = device or pick_device()
        if not names:
            raise ValueError("predict.experts is empty: list the experts to ensemble")
        experts = [load_expert(Path(models_dir) / n / "best.pt", device) for n in names]
        return cls(experts, tta, combine, device)

    @torch.inference_mode()
    def score_batch(self, x: torch.Tensor) -> np.ndarray:
        """uint8 (B, S, S, 3) -> (E, B) per-expert probabilities, averaged over TTA views."""
        x = x.to(self.device, non_blocking=True)
        cl = self.device.type == "cuda"
        out = []
        for e in self.experts:
            m = e.model
            inp = to_model_input(x, m.img_size, m.mean, m.std, cl)  # shared by the views of this expert
            views = [inp if v == "identity" else torch.flip(inp, dims=[3]) for v in self.tta]
            with autocast(self.device):
                probs = torch.stack([m(v)["prob"].float() for v in views]).mean(0)
            out.append(probs.cpu().numpy())
        return np.stack(out)

    def score_loader(self, loader: DataLoader, desc: str = "score") -> np.ndarray:
        """(E, N) per-expert probabilities over a loader of uint8 batches (order kept)."""
        parts = [self.score_batch(x) for x, _, _ in tqdm(loader, desc=desc, unit="batch")]
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(self.experts), 0))

    def score_images(self, images: list[np.ndarray]) -> np.ndarray:
        """Ensemble scores (N,) of uint8 RGB images of any size (same resize as stage 1)."""
        if not images:
            return np.zeros(0)
        x = torch.from_numpy(np.stack([resize_square(im, self.cache_size) for im in images]))
        return combine_scores(self.score_batch(x), self.combine)


def _loader(pool: pd.DataFrame, batch_size: int, device: torch.device) -> DataLoader:
    return DataLoader(CacheDataset(pool), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers(-1), pin_memory=device.type == "cuda")


def build_submission(test_manifest: pd.DataFrame, scores: np.ndarray, fallback: float) -> pd.DataFrame:
    """One row per test image (sorted by name); images that failed to decode get ``fallback``."""
    sub = test_manifest[["img_name", "cache_index"]].copy()
    sub["y_pred"] = fallback
    ok = sub.cache_index.to_numpy() >= 0
    if ok.sum() != len(scores):
        raise ValueError(f"{len(scores)} scores for {int(ok.sum())} decodable test images")
    sub.loc[ok, "y_pred"] = scores
    sub = sub.sort_values("img_name", kind="stable")[["img_name", "y_pred"]].reset_index(drop=True)
    check_submission(sub, test_manifest.img_name)
    return sub


def check_submission(sub: pd.DataFrame, expected_names: pd.Series) -> None:
    """Refuse a submission whose names differ from the test list or whose scores are not in [0, 1]."""
    if list(sub.columns) != ["img_name", "y_pred"]:
        raise ValueError(f"submission columns {list(sub.columns)}; expected ['img_name', 'y_pred']")
    if sub.img_name.duplicated().any():
        raise ValueError(f"duplicate names in submission, e.g. {sub.img_name[sub.img_name.duplicated()].iloc[0]}")
    expected = set(expected_names)
    got = set(sub.img_name)
    if got != expected:
        raise ValueError(f"submission names differ from the test list: {len(expected - got)} missing "
                         f"(e.g. {sorted(expected - got)[:3]}), {len(got - expected)} unexpected")
    y = sub.y_pred.to_numpy(dtype=np.float64)
    if not (np.isfinite(y).all() and (y >= 0).all() and (y <= 1).all()):
        raise ValueError("submission scores must be finite and in [0, 1]")


def _metrics(labels: np.ndarray, per_expert: np.ndarray, ens: np.ndarray, names: list[str]) -> dict:
    return {"ensemble": summary(labels, ens),
            "experts": {n: summary(labels, p) for n, p in zip(names, per_expert)}}


def run_predict(cfg: PredictConfig) -> dict:
    ens = Ensemble.load(cfg.models_dir, cfg.experts, cfg.tta, cfg.combine)
    names = [e.name for e in ens.experts]
    # validation: the cluster-held-out fold, original images only
    splits = pd.read_csv(cfg.splits_csv, keep_default_na=False, dtype={"img_name": str})
    val_uids = splits.uid[(splits.subset == "val") & (splits.origin != "aug")]
    pool = load_pool(cfg.prepared_dir)
    val = pool[pool.uid.isin(set(val_uids))].reset_index(drop=True)
    val_pe = ens.score_loader(_loader(val, cfg.batch_size, ens.device), "score val")
    val_scores = combine_scores(val_pe, cfg.combine)
    metrics: dict = {"val": _metrics(val.label.to_numpy(), val_pe, val_scores, names)}
    roc = roc_points(val.label.to_numpy(), val_scores)
    write_csv(cfg.roc, pd.DataFrame(roc))

    # test: every listed image gets a row
    test_all = load_manifest(cfg.prepared_dir, ok_only=False)
    test_all = test_all[test_all.split == "test"].reset_index(drop=True)
    test_ok = test_all[test_all.cache_index >= 0].reset_index(drop=True)
    test_pool = pd.DataFrame({"cache_path": [str(Path(cfg.prepared_dir) / f) for f in test_ok.cache_file],
                              "cache_index": test_ok.cache_index, "label": -1})
    test_pe = ens.score_loader(_loader(test_pool, cfg.batch_size, ens.device), "score test")
    test_scores = combine_scores(test_pe, cfg.combine) if len(test_ok) else np.zeros(0)
    sub = build_submission(test_all, test_scores, cfg.fallback_score)
    write_csv(cfg.submission, sub, float_format="%.6f")
    metrics["n_test"] = len(test_all)
    metrics["n_test_failed"] = int((test_all.cache_index < 0).sum())
    if cfg.test_labels and len(test_ok):
        metrics["test"] = _test_metrics(cfg.test_labels, test_ok, test_pe, test_scores, names)
    write_json(cfg.metrics, metrics)
    log.info("val AUC %.4f, TPR@FPR=1e-3 %.3f (%d images); wrote %d test rows to %s",
             metrics["val"]["ensemble"]["auc"], metrics["val"]["ensemble"]["tpr_at_fpr_1e-3"], len(val),
             len(sub), cfg.submission)
    return metrics


def _test_metrics(labels_csv: str, test_ok: pd.DataFrame, per_expert: np.ndarray, scores: np.ndarray,
                  names: list[str]) -> dict:
    """Metrics on test images whose labels are known (e.g. released after the challenge)."""
    from .data.labels import read_labels

    labels = read_labels(labels_csv).set_index("img_name").label
    known = test_ok.img_name.isin(labels.index).to_numpy()
    if not known.any():
        raise MetricError(f"{labels_csv}: none of its names are test images")
    y = labels.loc[test_ok.img_name[known]].to_numpy()
    return _metrics(y, per_expert[:, known], scores[known], names)
