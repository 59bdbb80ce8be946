"""k-means over embeddings and folds made of whole clusters.

The winners' observation: the official train and val sets look alike, so val AUC saturates. Holding
out whole clusters of the embedding space makes validation measure generalisation to kinds of real
and fake images the model did not train on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import ConfigError, DataError

# MINIBATCH_ABOVE and kmeans_labels are re-exported: they lived here before .kmeans
from .kmeans import MINIBATCH_ABOVE, KMeansEngine, kmeans_labels, n_rows, take  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_K_CANDIDATES = (4, 6, 8, 12, 16)


def choose_k(feats: np.ndarray, candidates: Sequence[int], seed: int, sample_size: int = 2000,
             engine: KMeansEngine | None = None, rows: np.ndarray | None = None) -> tuple[int, dict[str, float]]:
    """The candidate k with the best (sampled) silhouette score, and every candidate's score.

    Candidates are clamped to 2..N-1 (where a silhouette is defined) and deduplicated; ties go to the
    smaller k. With fewer than 3 samples there is nothing to choose: k = 1. ``feats`` may be a memmap;
    ``rows`` selects a subset (see :mod:`dfpipe.split.kmeans`).
    """
    n = n_rows(feats, rows)
    ks = sorted({min(max(int(k), 2), n - 1) for k in candidates}) if n >= 3 else []
    if not ks:
        return 1, {}
    scores: dict[str, float] = {}
    for k in ks:
        lab = kmeans_labels(feats, k, seed, rows=rows, engine=engine)
        if len(np.unique(lab)) < 2:  # degenerate (e.g. identical points): no silhouette
            scores[str(k)] = -1.0
            continue
        scores[str(k)] = sampled_silhouette(feats, rows, lab, sample_size, seed)
    best = max(ks, key=lambda k: (scores[str(k)], -k))
    return best, scores


def sampled_silhouette(feats: np.ndarray, rows: np.ndarray | None, labels: np.ndarray, sample_size: int,
                       seed: int) -> float:
    """``silhouette_score(x, labels, sample_size, random_state=seed)``, reading only the sampled rows.

    Same sample (sklearn draws ``RandomState(seed).permutation(n)[:sample_size]``) and same value, but a
    memmap of any size is never loaded whole.
    """
    from sklearn.metrics import silhouette_samples

    n = len(labels)
    idx = np.random.RandomState(seed).permutation(n)[:sample_size] if 0 < sample_size < n else np.arange(n)
    x = take(feats, idx if rows is None else rows[idx])
    return float(np.mean(silhouette_samples(x, labels[idx])))


def select_k(feats: np.ndarray, labels: np.ndarray, per_class: bool, candidates: Sequence[int], seed: int,
             sample_size: int = 2000, engine: KMeansEngine | None = None) -> tuple[int | tuple[int, int], dict]:
    """k for :func:`cluster_ids` chosen by silhouette: one k jointly, or (k_real, k_fake) per class."""
    if not per_class:
        k, scores = choose_k(feats, candidates, seed, sample_size, engine)
        log.info("k by silhouette: %d (scores %s)", k, scores)
        return k, {"criterion": "silhouette", "candidates": list(candidates), "k": k, "scores": scores}
    ks, report = [], {"criterion": "silhouette", "candidates": list(candidates), "per_class": {}}
    for c, name in ((0, "real"), (1, "fake")):
        k, scores = choose_k(feats, candidates, seed, sample_size, engine, rows=np.flatnonzero(labels == c))
        log.info("k by silhouette for %s: %d (scores %s)", name, k, scores)
        ks.append(k)
        report["per_class"][name] = {"k": k, "scores": scores}
    return (ks[0], ks[1]), report


def cluster_ids(feats: np.ndarray, labels: np.ndarray, k: int | Sequence[int], per_class: bool,
                seed: int, engine: KMeansEngine | None = None) -> np.ndarray:
    """Global cluster ids. Per class: real clusters 0..k-1, fake clusters k..2k-1 (fakes vary more).

    Per class, ``k`` may also be a pair (k_real, k_fake): real 0..k_real-1, fake from k_real on.
    """
    if not per_class:
        return kmeans_labels(feats, int(k), seed, engine=engine)
    k_real, k_fake = (k, k) if np.isscalar(k) else (int(k[0]), int(k[1]))
    ids = np.empty(len(feats), dtype=np.int64)
    for c, kc, offset in ((0, k_real, 0), (1, k_fake, k_real)):
        sel = labels == c
        if sel.any():
            ids[sel] = kmeans_labels(feats, kc, seed, rows=np.flatnonzero(sel), engine=engine) + offset
    return ids


def assign_folds(clusters: np.ndarray, labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold per sample; every cluster lies in exactly one fold, class balance kept where possible."""
    n_groups = len(np.unique(clusters))
    if n_groups < n_folds:
        raise ConfigError(f"{n_groups} clusters cannot fill {n_folds} folds: raise n_clusters or lower n_folds")
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(clusters), -1, dtype=np.int64)
    for f, (_, test_idx) in enumerate(sgkf.split(np.zeros(len(labels)), labels, groups=clusters)):
        folds[test_idx] = f
    return folds


def fold_groups(clusters: np.ndarray, dup_groups: np.ndarray | None) -> np.ndarray:
    """Units that folds are made of: clusters, joined when a near-duplicate group spans several.

    Two clusters sharing a near-duplicate pair (stage 1's ``dup_group``) become one unit, so a
    near-duplicate can never sit in train while its twin is in val. ``dup_group`` -1 = unknown.
    """
    if dup_groups is None:
        return clusters
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ids, inv = np.unique(clusters, return_inverse=True)
    links = pd.DataFrame({"c": inv, "d": dup_groups})[dup_groups >= 0]
    first = links.groupby("d").c.transform("first").to_numpy()  # link each member's cluster to the group's first
    graph = coo_matrix((np.ones(len(links)), (links.c.to_numpy(), first)), shape=(len(ids), len(ids)))
    _, unit = connected_components(graph, directed=False)
    return unit[inv]


def split_pool(pool: pd.DataFrame, feats: np.ndarray, n_clusters: int | Sequence[int], per_class: bool,
               n_folds: int, seed: int, k_candidates: Sequence[int] = DEFAULT_K_CANDIDATES,
               engine: KMeansEngine | None = None) -> pd.DataFrame:
    """Cluster and fold the original images of ``pool``; generated ones inherit their source's.

    ``n_clusters`` 0: k chosen by silhouette among ``k_candidates`` (:func:`select_k`).

    ``feats`` holds one row per *original* image (origin != 'aug'), in pool order (an array or the
    memmap of stage 3's features file). With a ``dup_group`` column (stage 1), near-duplicates always
    share a fold. ``engine``: where k-means runs (default sklearn on CPU).
    """
    orig = pool[pool.origin != "aug"].reset_index(drop=True)
    if len(orig) != len(feats):
        raise ValueError(f"{len(feats)} embeddings for {len(orig)} original images")
    labels = orig.label.to_numpy()
    if np.isscalar(n_clusters) and n_clusters == 0:
        n_clusters, _ = select_k(feats, labels, per_class, k_candidates, seed, engine=engine)
    orig = orig.assign(cluster=cluster_ids(feats, labels, n_clusters, per_class, seed, engine))
    dups = orig.dup_group.to_numpy() if "dup_group" in orig else None
    orig["fold"] = assign_folds(fold_groups(orig.cluster.to_numpy(), dups), labels, n_folds, seed)
    derived = pool[pool.origin == "aug"]
    src = orig.set_index("uid")
    missing = sorted(set(derived.source_uid) - set(src.index))
    if missing:
        raise DataError(f"generated images derive from unknown sources, e.g. {missing[:3]}")
    derived = derived.assign(cluster=src.cluster.loc[derived.source_uid].to_numpy(),
                             fold=src.fold.loc[derived.source_uid].to_numpy())
    out = pd.concat([orig, derived], ignore_index=True)
    check_split(out)
    return out


def check_split(df: pd.DataFrame) -> None:
    """Assert the leak-proof properties: every sample in one fold, clusters and sources not split."""
    if (df.fold < 0).any():
        raise AssertionError("some samples have no fold")
    if df.uid.duplicated().any():
        raise AssertionError("a sample appears twice")
    if (df.groupby("cluster").fold.nunique() > 1).any():
        raise AssertionError("a cluster spans two folds")
    if "dup_group" in df:
        dup = df[df.dup_group >= 0]
        if (dup.groupby("dup_group").fold.nunique() > 1).any():
            raise AssertionError("near-duplicates (one dup_group) span two folds")
    src_fold = df.set_index("uid").fold
    derived = df[df.source_uid != df.uid]
    if (src_fold.loc[derived.source_uid].to_numpy() != derived.fold.to_numpy()).any():
        raise AssertionError("a generated image is not in its source's fold")


def cluster_report(df: pd.DataFrame, val_fold: int) -> dict:
    orig = df[df.origin != "aug"]
    clusters = {
        str(c): {"n": int(len(g)), "n_fake": int(g.label.sum()), "fold": int(g.fold.iloc[0]),
                 "origins": {k: int(v) for k, v in g.origin.value_counts().items()}}
        for c, g in orig.groupby("cluster")
    }
    folds = {
        str(f): {"n": int(len(g)), "n_fake": int(g.label.sum()), "n_generated": int((g.origin == "aug").sum()),
                 "n_clusters": int(g.cluster.nunique())}
        for f, g in df.groupby("fold")
    }
    val = orig[orig.fold == val_fold]
    return {"n_clusters": len(clusters), "val_fold": val_fold, "n_val": int(len(val)),
            "val_fake_share": float(val.label.mean()) if len(val) else 0.0,
            "clusters": clusters, "folds": folds}
