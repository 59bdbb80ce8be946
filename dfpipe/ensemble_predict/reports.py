"""Stage 5's reports: ensemble and per-expert metrics, by stage-3 cluster, by kind of fake, and the ROC plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..io import atomic_path
from ..metrics import roc_auc, roc_points, summary


def ensemble_metrics(labels: np.ndarray, per_expert: np.ndarray, ens: np.ndarray, names: list[str],
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
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # a killed or failed plot never leaves half a png under the real name
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
