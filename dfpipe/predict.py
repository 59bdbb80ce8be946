"""Load the experts and score images: the ONE scoring path of the submission (and later CLI/API).

Input is always uint8 RGB. Images from the stage-1 cache are already ``cache_size`` square; any other
image (a file given to a CLI, :meth:`Ensemble.score_files`) is decoded and resized exactly as stage 1
does (:class:`FileDataset`), so every path sees the same pixels. A batch is decoded once for all
experts; each expert then resizes/normalises it on the device (:func:`to_model_input`, shared by
experts with the same size and normalisation), runs every TTA view and averages its probabilities
over the views; experts are combined over the whole set (:func:`combine_scores`).

TTA views (``predict.tta``): ``identity``, ``hflip``, ``vflip``, ``rot90``, ``rot180``, ``rot270``
(``torch.rot90`` of the model input), ``scale<f>`` (the model input resized to ``round(f * img_size)``
pixels instead of ``img_size``; the backbones pool globally, so any size works), and ``+``-joined
combinations (``hflip+scale1.25``). The 3rd-place team's 6-view TTA is e.g.
``[identity, hflip, scale0.875, hflip+scale0.875, scale1.125, hflip+scale1.125]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.fx
from scipy.special import expit, logit
from scipy.stats import rankdata
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .config import PredictConfig
from .data.dataset import CacheDataset
from .data.images import DEFAULT_MAX_PIXELS, decode_image, resize_square
from .data.samples import load_manifest, load_pool, load_split_pool
from .data.transforms import to_model_input
from .device import autocast, num_workers, pick_device
from .io import write_csv, write_json
from .metrics import EPS, MetricError, choose_thresholds, roc_auc, roc_points, summary, verdict
from .models import expert_from_description

log = logging.getLogger(__name__)
GEOMETRIC = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270")
TTA_VIEWS = GEOMETRIC + ("scale<f>",)
COMBINE = ("mean_prob", "mean_logit", "rank", "stack")
_SCALE = re.compile(r"^scale(\d+(?:\.\d+)?)$")
CARD_FORMAT = 1

__all__ = ["Ensemble", "FileDataset", "LoadedExpert", "View", "build_submission", "check_submission",
           "combine_scores", "fit_stacking", "fold_batchnorm", "load_expert", "parse_view", "run_predict", "verdict"]


# ----------------------------------------------------------------------------- experts
@dataclass
class LoadedExpert:
    name: str
    model: torch.nn.Module
    description: dict
    sha256: str = ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _ConvBnTracer(torch.fx.Tracer):
    """Keeps every Conv2d / BatchNorm2d (subclasses too: timm's Conv2dSame, BatchNormAct2d) a leaf."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution's
    weights (in place; inference only). timm's BatchNormAct2d keeps its activation. Returns how many
    were folded; 0 when the model cannot be traced (nothing changed then)."""
    try:
        graph = _ConvBnTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - an untraceable custom expert is simply not folded
        log.debug("BatchNorm folding skipped: %s", exc)
        return 0
    mods = dict(model.named_modules())
    folded = 0
    for node in graph.nodes:
        src = node.args[0] if node.args else None
        if not (node.op == "call_module" and isinstance(mods[node.target], torch.nn.BatchNorm2d)
                and isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(mods[src.target], torch.nn.Conv2d)):
            continue
        _fold_pair(model, mods[src.target], mods[node.target], node.target)
        folded += 1
    return folded


@torch.no_grad()
def _fold_pair(model: torch.nn.Module, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, bn_name: str) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = torch.nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
    keep = [getattr(bn, a) for a in ("drop", "act") if isinstance(getattr(bn, a, None), torch.nn.Module)]
    parent, _, attr = bn_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr,
            torch.nn.Sequential(*keep) if keep else torch.nn.Identity())


def load_expert(path: str | Path, device: torch.device) -> LoadedExpert:
    """Rebuild an expert from its self-describing checkpoint (EMA weights, saved as the state_dict).

    The model is for inference only: eval mode, frozen, BatchNorm folded into the convolutions, on
    ``device``, channels_last (faster convolutions on CPU (oneDNN) and GPU alike). Scores agree with
    the plain NCHW model to ~1e-6.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (train it: dvc repro train_experts)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = expert_from_description(ckpt["description"])
    model.load_state_dict(ckpt["state_dict"])
    model = model.eval().requires_grad_(False)
    fold_batchnorm(model)
    model = model.to(device).to(memory_format=torch.channels_last)
    return LoadedExpert(ckpt["name"], model, ckpt["description"], _sha256(path))


# ----------------------------------------------------------------------------- TTA views
@dataclass(frozen=True)
class View:
    """One TTA view: a geometric transform of the model input at ``scale`` x the expert's size."""

    name: str
    geo: str = "identity"
    scale: float = 1.0

    def size(self, img_size: int) -> int:
        return max(8, int(round(self.scale * img_size)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the same batch seen through this view's flip/rotation."""
        if self.geo == "hflip":
            return torch.flip(x, dims=[3])
        if self.geo == "vflip":
            return torch.flip(x, dims=[2])
        if self.geo.startswith("rot"):
            return torch.rot90(x, int(self.geo[3:]) // 90, dims=(2, 3))
        return x


def parse_view(name: str) -> View:
    """``identity`` | ``hflip`` | ``vflip`` | ``rot90`` | ``rot180`` | ``rot270`` | ``scale<f>``, or two
    of them (one geometric, one scale) joined by ``+``; f in [0.25, 4]."""
    geo, scale = None, None
    for part in name.split("+"):
        m = _SCALE.match(part)
        if m and scale is None and 0.25 <= float(m.group(1)) <= 4:
            scale = float(m.group(1))
        elif part in GEOMETRIC and geo is None:
            geo = part
        else:
            raise ValueError(f"unknown TTA view {name!r}; choose from {TTA_VIEWS} or one geometric + one "
                             "scale joined by '+', with f in [0.25, 4]")
    return View(name, geo or "identity", 1.0 if scale is None else scale)


# ----------------------------------------------------------------------------- combination
def _logit(p: np.ndarray) -> np.ndarray:
    return logit(np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS))  # clipped: no inf at 0 or 1


def combine_scores(per_expert: np.ndarray, method: str, stack: dict | None = None) -> np.ndarray:
    """(E, N) expert probabilities -> (N,) ensemble score in [0, 1].

    ``stack`` = ``{"coef": [E floats], "intercept": float}`` (from :func:`fit_stacking`): a logistic
    regression on the experts' logits, needed when ``method == "stack"``.
    """
    if method == "mean_prob":
        return per_expert.mean(axis=0)
    if method == "mean_logit":
        return expit(_logit(per_expert).mean(axis=0))
    if method == "rank":  # each expert's scores -> ranks in [0, 1]; needs a whole set, not one image
        n = per_expert.shape[1]
        ranks = np.stack([(rankdata(s) - 1) / max(1, n - 1) for s in per_expert])
        return ranks.mean(axis=0)
    if method == "stack":
        if stack is None:
            raise ValueError("combine 'stack' needs weights fitted on validation data (fit_stacking)")
        coef = np.asarray(stack["coef"], dtype=np.float64)
        if len(coef) != per_expert.shape[0]:
            raise ValueError(f"stacking weights for {len(coef)} experts, scores from {per_expert.shape[0]}")
        return expit(coef @ _logit(per_expert) + float(stack["intercept"]))
    raise ValueError(f"unknown combine {method!r}; choose one of {COMBINE}")


def fit_stacking(per_expert: np.ndarray, labels: np.ndarray, folds: int = 5,
                 seed: int = 0) -> tuple[dict, np.ndarray]:
    """Logistic regression on the experts' logits (E, N) of labelled validation images.

    Returns the weights fitted on all of them (to score new images) and honest out-of-fold scores
    for these same images (``cross_val_predict`` over stratified folds), to report metrics with.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = np.asarray(labels).astype(int)
    n_min = int(min((y == 0).sum(), (y == 1).sum()))
    if n_min < 2:
        raise MetricError(f"stacking needs at least 2 validation images of each class; the rarer has {n_min}")
    x = _logit(per_expert).T  # (N, E)
    cv = StratifiedKFold(n_splits=min(folds, n_min), shuffle=True, random_state=seed)
    oof = cross_val_predict(LogisticRegression(), x, y, cv=cv, method="predict_proba")[:, 1]
    lr = LogisticRegression().fit(x, y)
    return {"coef": [float(c) for c in lr.coef_[0]], "intercept": float(lr.intercept_[0])}, oof


# ----------------------------------------------------------------------------- decoding files
class FileDataset(Dataset):
    """Image files -> uint8 (S, S, 3) tensors with stage 1's exact pixels (decode_image + resize_square).

    A file that cannot be decoded gives a black image and its error message instead of raising, so
    one bad upload never stops a batch; items are ``(image, index, error)`` with ``error == ""`` if OK.
    """

    def __init__(self, paths: list[str | Path], cache_size: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths = [str(p) for p in paths]
        self.cache_size = int(cache_size)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            img = resize_square(decode_image(self.paths[i], max_pixels=self.max_pixels), self.cache_size)
            return torch.from_numpy(np.ascontiguousarray(img)), i, ""
        except Exception as exc:  # noqa: BLE001 - any failure becomes a reported row, never a crash
            blank = torch.zeros((self.cache_size, self.cache_size, 3), dtype=torch.uint8)
            return blank, i, str(exc) or type(exc).__name__


# ----------------------------------------------------------------------------- the ensemble
class Ensemble:
    def __init__(self, experts: list[LoadedExpert], tta: list[str], combine: str, device: torch.device,
                 stack: dict | None = None, thresholds: dict | None = None):
        if not experts:
            raise ValueError("the ensemble needs at least one expert")
        if not tta:
            raise ValueError(f"no TTA view given; choose from {TTA_VIEWS}")
        self.views = [parse_view(v) for v in tta]
        if combine not in COMBINE:
            raise ValueError(f"unknown combine {combine!r}; choose one of {COMBINE}")
        sizes = {e.description["cache_size"] for e in experts}
        if len(sizes) > 1:
            raise ValueError(f"experts were trained on different cache sizes {sorted(sizes)}")
        self.experts, self.tta, self.combine, self.device = experts, list(tta), combine, device
        self.cache_size = int(sizes.pop())
        self.stack, self.thresholds = stack, thresholds

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    @classmethod
    def load(cls, models_dir: str | Path, names: list[str], tta: list[str], combine: str,
             device: torch.device | None = None, stack: dict | None = None) -> "Ensemble":
        device = device or pick_device()
        if not names:
            raise ValueError("predict.experts is empty: list the experts to ensemble")
        experts = [load_expert(Path(models_dir) / n / "best.pt", device) for n in names]
        return cls(experts, tta, combine, device, stack=stack)

    @classmethod
    def from_card(cls, card_path: str | Path, models_dir: str | Path,
                  device: torch.device | None = None) -> "Ensemble":
        """The ensemble stage 5 evaluated, as its card describes it (weights, thresholds included).

        Refuses checkpoints that differ from those the card was made with (retrained since).
        """
        card = json.loads(Path(card_path).read_text())
        if card.get("format") != CARD_FORMAT:
            raise ValueError(f"{card_path}: unknown ensemble card format {card.get('format')!r}")
        ens = cls.load(models_dir, [e["name"] for e in card["experts"]], card["tta"], card["combine"],
                       device, stack=card.get("stack"))
        for e, want in zip(ens.experts, card["experts"]):
            if want.get("sha256") and e.sha256 != want["sha256"]:
                raise ValueError(f"{models_dir}/{e.name}/best.pt is not the checkpoint {card_path} was made "
                                 "with (retrained?): rerun stage 5 (dvc repro ensemble_predict)")
        ens.thresholds = card["thresholds"]
        return ens

    def card(self, thresholds: dict, extra: dict | None = None) -> dict:
        """Everything a CLI/API needs to score and give verdicts as stage 5 did (JSON-serialisable)."""
        return {"format": CARD_FORMAT, "cache_size": self.cache_size, "tta": self.tta, "combine": self.combine,
                "stack": self.stack, "thresholds": thresholds,
                "experts": [{"name": e.name, "checkpoint": f"{e.name}/best.pt", "sha256": e.sha256,
                             "description": e.description} for e in self.experts],
                **(extra or {})}

    # -- scoring
    def _expert_probs(self, m: torch.nn.Module, x: torch.Tensor, inputs: dict) -> torch.Tensor:
        """(B,) probability of one expert, averaged over the views; ``inputs`` caches the resized,
        normalised batches by (size, mean, std) so experts that share them compute them once."""
        by_size: dict[int, list[View]] = {}
        for v in self.views:
            by_size.setdefault(v.size(m.img_size), []).append(v)
        probs = []
        for size, views in by_size.items():
            key = (size, tuple(m.mean), tuple(m.std))
            if key not in inputs:
                inputs[key] = to_model_input(x, size, m.mean, m.std, channels_last=True)
            batch = torch.cat([v.apply(inputs[key]) for v in views]) if len(views) > 1 else views[0].apply(inputs[key])
            batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(self.device):
                probs.append(m(batch)["prob"].float().view(len(views), -1))
        return torch.cat(probs).mean(0)

    @torch.inference_mode()
    def score_batch(self, x: torch.Tensor) -> np.ndarray:
        """uint8 (B, S, S, 3) -> (E, B) per-expert probabilities, averaged over TTA views."""
        x = x.to(self.device, non_blocking=True)
        inputs: dict = {}
        return np.stack([self._expert_probs(e.model, x, inputs).cpu().numpy() for e in self.experts])

    def score_loader(self, loader: DataLoader, desc: str = "score") -> np.ndarray:
        """(E, N) per-expert probabilities over a loader of uint8 batches (order kept)."""
        parts = [self.score_batch(batch[0]) for batch in tqdm(loader, desc=desc, unit="batch")]
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(self.experts), 0))

    def combine_experts(self, per_expert: np.ndarray) -> np.ndarray:
        return combine_scores(per_expert, self.combine, self.stack)

    def score_images(self, images: list[np.ndarray]) -> np.ndarray:
        """Ensemble scores (N,) of uint8 RGB images of any size (same resize as stage 1)."""
        if not images:
            return np.zeros(0)
        x = torch.from_numpy(np.stack([resize_square(im, self.cache_size) for im in images]))
        return self.combine_experts(self.score_batch(x))

    def score_files(self, paths: list[str | Path], batch_size: int = 64,
                    workers: int = -1) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Ensemble scores (N,) of image files, decoded in ``workers`` DataLoader processes (-1 = auto).

        A file that fails to decode scores NaN (the caller picks a fallback) and is listed in the
        returned ``[(path, error)]``.
        """
        ds = FileDataset(paths, self.cache_size)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers(workers),
                            pin_memory=self.device.type == "cuda")
        per_expert = np.full((len(self.experts), len(ds)), np.nan)
        errors: list[tuple[str, str]] = []
        for x, idx, err in loader:
            ok = np.array([e == "" for e in err])
            errors += [(ds.paths[int(i)], e) for i, e in zip(idx, err) if e]
            if ok.any():
                per_expert[:, idx.numpy()[ok]] = self.score_batch(x[torch.from_numpy(ok)])
        scores = np.full(len(ds), np.nan)
        good = ~np.isnan(per_expert[0])
        if good.any():
            scores[good] = self.combine_experts(per_expert[:, good])
        return scores, errors

    def verdict(self, score: float) -> str:
        if self.thresholds is None:
            raise ValueError("no thresholds: load the ensemble with Ensemble.from_card")
        return verdict(score, self.thresholds)


# ----------------------------------------------------------------------------- submission
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


# ----------------------------------------------------------------------------- reports
def _metrics(labels: np.ndarray, per_expert: np.ndarray, ens: np.ndarray, names: list[str],
             thr: dict[str, float]) -> dict:
    """Ensemble and per-expert summaries; accuracy at each one's threshold chosen on val (``thr``)."""
    return {"ensemble": summary(labels, ens, thr["ensemble"]),
            "experts": {n: summary(labels, p, thr[n]) for n, p in zip(names, per_expert)}}


def _group_report(labels: np.ndarray, scores: np.ndarray, t: float) -> dict[str, float]:
    """n, fakes, fraction flagged fake at ``t`` and (with both classes) AUC of one group of images."""
    out = {"n": int(len(labels)), "n_fake": int(labels.sum()), "flagged_rate": float(np.mean(scores >= t))}
    if 0 < labels.sum() < len(labels):
        out["auc"] = roc_auc(labels, scores)
    return out


def by_cluster(val: pd.DataFrame, scores: np.ndarray, t: float) -> dict[str, dict]:
    """Per stage-3 cluster of the val fold: AUC when it holds both classes; always n and flagged rate."""
    y, cluster = val.label.to_numpy(), val.cluster.to_numpy()
    out = {}
    for c in sorted(np.unique(cluster)):
        m = cluster == c
        out[f"cluster_{c}"] = _group_report(y[m], scores[m], t)
    return out


def by_method(val: pd.DataFrame, val_scores: np.ndarray, gen_scores: np.ndarray, gen: pd.DataFrame,
              t: float) -> dict[str, dict]:
    """AUC of each kind of fake against all val reals: ``original`` (the dataset's own fakes) and each
    stage-2 method (val-fold generated images), with the fraction of them flagged at ``t``."""
    reals = val_scores[val.label.to_numpy() == 0]
    kinds = [("original", val_scores[val.label.to_numpy() == 1])]
    kinds += [(m, gen_scores[(gen.method == m).to_numpy()]) for m in sorted(gen.method.unique())]
    out = {}
    for name, fakes in kinds:
        if len(fakes) and len(reals):
            y = np.r_[np.zeros(len(reals)), np.ones(len(fakes))]
            out[name] = {"auc": roc_auc(y, np.r_[reals, fakes]), "n": int(len(fakes)),
                         "flagged_rate": float(np.mean(fakes >= t))}
    return out


def plot_roc(path: str | Path, labels: np.ndarray, curves: dict[str, np.ndarray]) -> None:
    """ROC of each named score vector; linear and log-FPR panels (the tie-breaker lives at 1e-3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for name, s in curves.items():
        r = roc_points(labels, s)
        for ax in axes:
            ax.plot(r["fpr"], r["tpr"], label=f"{name} (AUC {roc_auc(labels, s):.3f})",
                    lw=2 if name == "ensemble" else 1)
    floor = 1.0 / max(1, int((labels == 0).sum()))
    axes[1].set_xscale("log")
    axes[1].set_xlim(min(1e-3, floor) / 2, 1)
    for ax, title in zip(axes, ("ROC (validation fold)", "log FPR")):
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- stage 5
def _val_sets(cfg: PredictConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The val fold's original images (with their cluster) and its stage-2 generated images."""
    df = load_split_pool(cfg.splits_csv, cfg.prepared_dir, cfg.augmented_dir or None)
    in_val = df[df.subset == "val"]
    return (in_val[in_val.origin != "aug"].reset_index(drop=True),
            in_val[in_val.origin == "aug"].reset_index(drop=True))


def _combine_val(ens: Ensemble, cfg: PredictConfig, val_pe: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict]:
    """Val ensemble scores (out-of-fold for ``stack``, which is then fitted on all of val) and the
    combination as numbers for metrics.json."""
    if cfg.combine == "stack":
        ens.stack, scores = fit_stacking(val_pe, y, cfg.stack_folds)
        weights = {"intercept": ens.stack["intercept"],
                   **{f"coef_{n}": c for n, c in zip(ens.names, ens.stack["coef"])}}
        return scores, {"stack": weights}
    weights = {f"w_{n}": 1.0 / len(ens.names) for n in ens.names}
    return ens.combine_experts(val_pe), {cfg.combine: weights}


def _with_generated(ens: Ensemble, val_pe: np.ndarray, val_scores: np.ndarray,
                    gen_pe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(val scores, generated-image scores) on one scale: per-image combinations score the generated
    images alone (``stack`` val scores stay out-of-fold); ranks are relative, so ``rank`` ranks both
    sets together."""
    if ens.combine != "rank":
        return val_scores, ens.combine_experts(gen_pe)
    joint = ens.combine_experts(np.concatenate([val_pe, gen_pe], axis=1))
    return joint[:val_pe.shape[1]], joint[val_pe.shape[1]:]


def _score_test(ens: Ensemble, cfg: PredictConfig) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """All listed test images, the decodable ones, their per-expert and ensemble scores."""
    test_all = load_manifest(cfg.prepared_dir, ok_only=False)
    test_all = test_all[test_all.split == "test"].reset_index(drop=True)
    test_ok = test_all[test_all.cache_index >= 0].reset_index(drop=True)
    test_pool = pd.DataFrame({"cache_path": [str(Path(cfg.prepared_dir) / f) for f in test_ok.cache_file],
                              "cache_index": test_ok.cache_index, "label": -1})
    test_pe = ens.score_loader(_loader(test_pool, cfg.batch_size, ens.device), "score test")
    test_scores = ens.combine_experts(test_pe) if len(test_ok) else np.zeros(0)
    return test_all, test_ok, test_pe, test_scores


def _write_failures(path: str, test_all: pd.DataFrame) -> int:
    bad = test_all[test_all.cache_index < 0]
    errors = bad["error"] if "error" in bad else pd.Series([""] * len(bad), dtype=str)
    write_csv(path, pd.DataFrame({"img_name": bad.img_name.to_numpy(), "error": errors.to_numpy()}))
    if len(bad):
        log.warning("%d test image(s) failed to decode and get the fallback score %s: see %s",
                    len(bad), bad.img_name.iloc[0], path)
    return len(bad)


def run_predict(cfg: PredictConfig) -> dict:
    ens = Ensemble.load(cfg.models_dir, cfg.experts, cfg.tta, cfg.combine)
    names = ens.names
    if cfg.combine == "rank":
        log.warning("combine 'rank': scores are ranks within each scored set, so the thresholds chosen on val "
                    "(verdicts, accuracy) do not carry over to other sets or to single images")
    val, gen = _val_sets(cfg)
    y = val.label.to_numpy()
    val_pe = ens.score_loader(_loader(val, cfg.batch_size, ens.device), "score val")
    val_scores, combination = _combine_val(ens, cfg, val_pe, y)
    thresholds = choose_thresholds(y, val_scores, cfg.max_fpr, cfg.max_fnr)
    thr = {"ensemble": thresholds["t_decision"], **{n: choose_thresholds(y, p)["t_decision"]
                                                    for n, p in zip(names, val_pe)}}
    metrics: dict[str, Any] = {"val": _metrics(y, val_pe, val_scores, names, thr)}
    metrics["val"]["by_cluster"] = by_cluster(val, val_scores, thresholds["t_decision"])
    if len(gen):
        gen_pe = ens.score_loader(_loader(gen, cfg.batch_size, ens.device), "score gen")
        metrics["val"]["by_method"] = by_method(val, *_with_generated(ens, val_pe, val_scores, gen_pe), gen,
                                                thresholds["t_decision"])
    metrics["combine"], metrics["thresholds"], metrics["n_tta_views"] = combination, thresholds, len(ens.views)
    write_csv(cfg.roc, pd.DataFrame(roc_points(y, val_scores)))
    plot_roc(cfg.roc_png, y, {"ensemble": val_scores, **dict(zip(names, val_pe))})

    # test: every listed image gets a row
    test_all, test_ok, test_pe, test_scores = _score_test(ens, cfg)
    sub = build_submission(test_all, test_scores, cfg.fallback_score)
    write_csv(cfg.submission, sub, float_format="%.6f")
    metrics["n_test"] = len(test_all)
    metrics["n_test_failed"] = _write_failures(cfg.failures, test_all)
    if cfg.test_labels and len(test_ok):
        metrics["test"] = _test_metrics(cfg.test_labels, test_ok, test_pe, test_scores, names, thr)
    write_json(cfg.metrics, metrics)
    write_json(cfg.card, ens.card(thresholds, {"fallback_score": cfg.fallback_score,
                                               "val": metrics["val"]["ensemble"]}))
    log.info("val AUC %.4f, TPR@FPR=1e-3 %.3f (%d images); wrote %d test rows to %s",
             metrics["val"]["ensemble"]["auc"], metrics["val"]["ensemble"]["tpr_at_fpr_1e-3"], len(val),
             len(sub), cfg.submission)
    return metrics


def _test_metrics(labels_csv: str, test_ok: pd.DataFrame, per_expert: np.ndarray, scores: np.ndarray,
                  names: list[str], thr: dict[str, float]) -> dict:
    """Metrics on test images whose labels are known (e.g. released after the challenge), with the
    thresholds chosen on val."""
    from .data.labels import read_labels

    labels = read_labels(labels_csv).set_index("img_name").label
    known = test_ok.img_name.isin(labels.index).to_numpy()
    if not known.any():
        raise MetricError(f"{labels_csv}: none of its names are test images")
    y = labels.loc[test_ok.img_name[known]].to_numpy()
    return _metrics(y, per_expert[:, known], scores[known], names, thr)
