"""Stage 5's reports: ensemble and per-expert metrics, by stage-3 cluster, by kind of fake (ROC picture: roc_plot)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..metrics import roc_auc, summary


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
