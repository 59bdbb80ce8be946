"""Paired comparisons of two rows of the grid on the same images: AUC differences with bootstrap intervals."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd


def paired_auc_diff(a_csv: str, b_csv: str, eval_set: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) on the same images of ``eval_set``, with a paired stratified bootstrap 95% interval
    (each resample weighs the same images for both; vectorised, see :func:`dfpipe.evaluate.weighted_auc`)."""
    from dfpipe.evaluate import resample_counts, weighted_auc
    from dfpipe.metrics import roc_auc

    a, b = (pd.read_csv(p, keep_default_na=False) for p in (a_csv, b_csv))
    a = a[(a.set == eval_set) & (a.degradation == "clean")].set_index("img_name")
    b = b[(b.set == eval_set) & (b.degradation == "clean")].set_index("img_name")
    common = a.index.intersection(b.index)
    y = a.label.loc[common].to_numpy().astype(int)
    sa, sb = a.score.loc[common].to_numpy(float), b.score.loc[common].to_numpy(float)
    diff = roc_auc(y, sa) - roc_auc(y, sb)
    rng_pos, rng_neg = np.random.default_rng(seed).spawn(2)
    w_pos, w_neg = resample_counts(rng_pos, n_boot, int(y.sum())), resample_counts(rng_neg, n_boot, int((y == 0).sum()))
    boots = (weighted_auc(sa[y == 1], sa[y == 0], w_pos, w_neg) - weighted_auc(sb[y == 1], sb[y == 0], w_pos, w_neg))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(diff), float(lo), float(hi)


def _clean_scores(csv: str, eval_set: str) -> pd.DataFrame:
    df = pd.read_csv(csv, keep_default_na=False)
    return df[(df.set == eval_set) & (df.degradation == "clean")].set_index("img_name")


def paired_seed_deltas(pairs: list[tuple[str, str]], eval_set: str, n_boot: int = 1000,
                       seed: int = 0) -> tuple[float, np.ndarray]:
    """The mean over ``pairs`` (scores CSVs of a recipe and the baseline, one pair per seed) of AUC(a) - AUC(b) on
    the images of ``eval_set`` all of them scored, and ``n_boot`` stratified bootstrap values of it: each resample
    weighs the same images for every CSV, so the interval is paired over rows and seeds.

    Memoised per file state (path, size, mtime): the grid rewrites its table after every cell, and a few seconds
    per held-out set of a few thousand images would be paid again each time for the same finished cells."""
    stamps = tuple((a, b, _stamp(a), _stamp(b)) for a, b in pairs)
    d, boots = _paired_seed_deltas(stamps, eval_set, n_boot, seed)
    return d, boots.copy()


def _stamp(path: str) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _paired_seed_deltas(stamps: tuple, eval_set: str, n_boot: int, seed: int) -> tuple[float, np.ndarray]:
    from dfpipe.evaluate import resample_counts, weighted_auc
    from dfpipe.metrics import roc_auc

    frames = [(_clean_scores(a, eval_set), _clean_scores(b, eval_set)) for a, b, _, _ in stamps]
    common = frames[0][0].index
    for a, b in frames:
        common = common.intersection(a.index).intersection(b.index)
    y = frames[0][0].label.loc[common].to_numpy().astype(int)
    rng_pos, rng_neg = np.random.default_rng(seed).spawn(2)
    w_pos, w_neg = resample_counts(rng_pos, n_boot, int(y.sum())), resample_counts(rng_neg, n_boot, int((y == 0).sum()))
    diffs, boots = [], []
    for a, b in frames:
        sa, sb = a.score.loc[common].to_numpy(float), b.score.loc[common].to_numpy(float)
        diffs.append(roc_auc(y, sa) - roc_auc(y, sb))
        boots.append(weighted_auc(sa[y == 1], sa[y == 0], w_pos, w_neg)
                     - weighted_auc(sb[y == 1], sb[y == 0], w_pos, w_neg))
    return float(np.mean(diffs)), np.mean(boots, axis=0)
