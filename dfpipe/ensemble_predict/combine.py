"""Combining the experts' probabilities over a set: mean of probabilities or logits, ranks, logistic stacking."""

from __future__ import annotations

import typing

import numpy as np
from scipy.special import expit, logit
from scipy.stats import rankdata

from ..config import Combine
from ..errors import ConfigError
from ..metrics import EPS, MetricError

COMBINE = typing.get_args(Combine)  # ("mean_prob", "mean_logit", "rank", "stack")


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
    raise ConfigError(f"unknown combine {method!r}; choose one of {COMBINE}")


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


def combine_val(method: str, names: list[str], per_expert: np.ndarray, labels: np.ndarray,
                folds: int) -> tuple[dict | None, np.ndarray, dict]:
    """Stage 5's combination on the val fold: the stacking weights (``stack``: fitted on all of val, else None),
    the val ensemble scores (out-of-fold for ``stack``) and the combination as numbers for metrics.json."""
    if method == "stack":
        stack, scores = fit_stacking(per_expert, labels, folds)
        return stack, scores, {"stack": {"intercept": stack["intercept"],
                                         **{f"coef_{n}": c for n, c in zip(names, stack["coef"])}}}
    return None, combine_scores(per_expert, method), {method: {f"w_{n}": 1.0 / len(names) for n in names}}


def with_generated(method: str, stack: dict | None, val_pe: np.ndarray, val_scores: np.ndarray,
                   gen_pe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(val scores, generated-image scores) on one scale: per-image combinations score the generated images alone
    (``stack`` val scores stay out-of-fold); ranks are relative, so ``rank`` ranks both sets together."""
    if method != "rank":
        return val_scores, combine_scores(gen_pe, method, stack)
    joint = combine_scores(np.concatenate([val_pe, gen_pe], axis=1), method, stack)
    return joint[:val_pe.shape[1]], joint[val_pe.shape[1]:]
