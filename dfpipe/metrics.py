"""Detection metrics: ROC AUC, TPR at a fixed FPR (the challenge's tie-breaker), EER, ROC points.

TPR@FPR=x is read off the ROC curve as the highest TPR among operating points with FPR <= x
(a threshold on the score). With n negatives the smallest non-zero FPR is 1/n, so with fewer than
1/x negatives (e.g. < 1000 for 1e-3) only FPR = 0 qualifies: the metric then means "fakes caught
with not a single false alarm", a strict, noisy number; ``n_neg`` is reported beside it.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


class MetricError(ValueError):
    """Metrics that are undefined for the given labels (e.g. one class only)."""


def _check(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(int).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise MetricError(f"{len(y_true)} labels but {len(y_score)} scores")
    if not np.isin(y_true, (0, 1)).all():
        raise MetricError("labels must be 0 (real) or 1 (fake)")
    if len(np.unique(y_true)) < 2:
        raise MetricError(f"ROC metrics need both classes; got only label {y_true[0] if len(y_true) else 'none'}")
    if not np.isfinite(y_score).all():
        raise MetricError("scores contain NaN or inf")
    return y_true, y_score


def roc_auc(y_true, y_score) -> float:
    y_true, y_score = _check(y_true, y_score)
    return float(roc_auc_score(y_true, y_score))


def tpr_at_fpr(y_true, y_score, max_fpr: float = 1e-3) -> float:
    """Highest TPR over thresholds whose FPR <= max_fpr (ties in score move together)."""
    y_true, y_score = _check(y_true, y_score)
    fpr, tpr, _ = roc_curve(y_true, y_score, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())


def eer(y_true, y_score) -> float:
    """Equal error rate: where FPR = 1 - TPR, linearly interpolated between ROC points."""
    y_true, y_score = _check(y_true, y_score)
    fpr, tpr, _ = roc_curve(y_true, y_score, drop_intermediate=False)
    fnr = 1.0 - tpr
    diff = fpr - fnr  # increasing along the curve: from <= 0 to >= 0
    i = int(np.argmax(diff >= 0))
    if i == 0 or diff[i] == 0:
        return float(fpr[i])
    # interpolate between point i-1 (diff < 0) and i (diff > 0)
    w = diff[i] / (diff[i] - diff[i - 1])
    return float(w * fpr[i - 1] + (1 - w) * fpr[i])


def summary(y_true, y_score) -> dict[str, float]:
    """The metrics every report shows, as a flat dict for ``dvc metrics``."""
    y_true, y_score = _check(y_true, y_score)
    return {
        "auc": roc_auc(y_true, y_score),
        "tpr_at_fpr_1e-3": tpr_at_fpr(y_true, y_score, 1e-3),
        "tpr_at_fpr_1e-2": tpr_at_fpr(y_true, y_score, 1e-2),
        "eer": eer(y_true, y_score),
        "n_pos": int(y_true.sum()),
        "n_neg": int((1 - y_true).sum()),
    }


def roc_points(y_true, y_score) -> dict[str, np.ndarray]:
    y_true, y_score = _check(y_true, y_score)
    fpr, tpr, thr = roc_curve(y_true, y_score)
    return {"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)}
