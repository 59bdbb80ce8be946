"""Detection metrics: ROC AUC, TPR at a fixed FPR (the challenge's tie-breaker), EER, AP, log loss,
accuracy at a threshold, ROC points, and thresholds chosen on validation data.

TPR@FPR=x is read off the ROC curve as the highest TPR among operating points with FPR <= x
(a threshold on the score). With n negatives the smallest non-zero FPR is 1/n, so with fewer than
1/x negatives (e.g. < 1000 for 1e-3) only FPR = 0 qualifies: the metric then means "fakes caught
with not a single false alarm", a strict, noisy number; ``n_neg`` is reported beside it.

Scores are "higher = more likely fake", in [0, 1]. Log loss treats them as probabilities (clipped to
[1e-7, 1 - 1e-7]); for a rank-averaged ensemble they are not, and its log loss means little.
Every metric needs both classes: one class only is a :class:`MetricError`, never a silent NaN.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from sklearn.metrics import log_loss as sk_log_loss

from .errors import DataError

EPS = 1e-7


class MetricError(DataError):  # a UserError and a ValueError
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


def average_precision(y_true, y_score) -> float:
    """Area under the precision-recall curve (fake = positive), as scikit-learn's step-wise sum."""
    y_true, y_score = _check(y_true, y_score)
    return float(average_precision_score(y_true, y_score))


def log_loss(y_true, y_score) -> float:
    """Mean binary cross-entropy of scores read as P(fake), clipped to [EPS, 1 - EPS]."""
    y_true, y_score = _check(y_true, y_score)
    return float(sk_log_loss(y_true, np.clip(y_score, EPS, 1 - EPS), labels=[0, 1]))


def accuracy(y_true, y_score, threshold: float = 0.5) -> float:
    """Fraction right when ``score >= threshold`` means fake."""
    y_true, y_score = _check(y_true, y_score)
    return float(np.mean((y_score >= threshold).astype(int) == y_true))


def summary(y_true, y_score, threshold: float = 0.5) -> dict[str, float]:
    """The metrics every report shows, as a flat dict for ``dvc metrics``; accuracy at ``threshold``."""
    y_true, y_score = _check(y_true, y_score)
    return {
        "auc": roc_auc(y_true, y_score),
        "tpr_at_fpr_1e-3": tpr_at_fpr(y_true, y_score, 1e-3),
        "tpr_at_fpr_1e-2": tpr_at_fpr(y_true, y_score, 1e-2),
        "eer": eer(y_true, y_score),
        "ap": average_precision(y_true, y_score),
        "log_loss": log_loss(y_true, y_score),
        "accuracy": accuracy(y_true, y_score, threshold),
        "threshold": float(threshold),
        "n_pos": int(y_true.sum()),
        "n_neg": int((1 - y_true).sum()),
    }


def eer_threshold(y_true, y_score) -> float:
    """The score threshold (``score >= t`` = fake) where FPR and FNR are closest: a balanced decision."""
    y_true, y_score = _check(y_true, y_score)
    fpr, tpr, thr = roc_curve(y_true, y_score, drop_intermediate=False)
    gap = np.abs(fpr - (1.0 - tpr))[1:]  # point 0 is the "nothing flagged" threshold (inf)
    return float(thr[1:][int(np.argmin(gap))])


def choose_thresholds(y_true, y_score, max_fpr: float = 0.01, max_fnr: float = 0.01) -> dict[str, float]:
    """Thresholds for the verdicts, chosen on validation data (``score >= t`` = flagged fake).

    - ``t_fake``: the lowest threshold with FPR <= ``max_fpr``: above it, "likely fake". With fewer
      than 1 / max_fpr reals this is "above every validation real".
    - ``t_real``: the highest threshold that still flags >= 1 - ``max_fnr`` of the fakes: below it,
      "likely real". Capped at ``t_fake`` so the bands never overlap; in between, "uncertain".
    - ``t_decision``: the EER threshold, for a forced binary answer (accuracy is reported at it).
    They are chosen on the data they are then evaluated on, so validation accuracy there is optimistic.
    """
    y_true, y_score = _check(y_true, y_score)
    fpr, tpr, thr = roc_curve(y_true, y_score, drop_intermediate=False)
    thr = np.minimum(thr, 1.0)  # sklearn's first threshold is inf ("flag nothing")
    t_fake = float(thr[fpr <= max_fpr].min())
    t_real = float(thr[tpr >= 1.0 - max_fnr].max())
    return {"t_fake": t_fake, "t_real": min(t_real, t_fake), "t_decision": eer_threshold(y_true, y_score),
            "max_fpr": max_fpr, "max_fnr": max_fnr}


def verdict(score: float, thresholds: dict) -> str:
    """'likely fake' (score >= t_fake), 'likely real' (score < t_real) or 'uncertain' in between."""
    if score >= thresholds["t_fake"]:
        return "likely fake"
    if score < thresholds["t_real"]:
        return "likely real"
    return "uncertain"


def roc_points(y_true, y_score) -> dict[str, np.ndarray]:
    y_true, y_score = _check(y_true, y_score)
    fpr, tpr, thr = roc_curve(y_true, y_score)
    return {"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)}
