"""k-means over embeddings and folds made of whole clusters, balanced in size.

The winners' observation: the official train and val sets look alike, so val AUC saturates. Holding
out whole clusters of the embedding space makes validation measure generalisation to kinds of real
and fake images the model did not train on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError

# MINIBATCH_ABOVE and kmeans_labels are re-exported: they lived here before .kmeans
from .kmeans import MINIBATCH_ABOVE, KMeansEngine, kmeans_labels  # noqa: F401
from .features import n_rows, take

log = logging.getLogger(__name__)

DEFAULT_K_CANDIDATES = (4, 6, 8, 12, 16)


def choose_k(feats: np.ndarray, candidates: Sequence[int], seed: int, sample_size: int = 2000,
             engine: KMeansEngine | None = None, rows: np.ndarray | None = None) -> tuple[int, dict[str, float]]:
    """The candidate k with the best (sampled) silhouette score, and every candidate's score.

    Candidates are clamped to 2..N-1 (where a silhouette is defined) and deduplicated; ties go to the
    smaller k. With fewer than 3 samples there is nothing to choose: k = 1. ``feats`` may be the features file;
    ``rows`` selects a subset (see :mod:`dfpipe.cluster_split.kmeans`).
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
    features file of any size is never loaded whole.
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


def settle_near_duplicates(clusters: np.ndarray, dup_groups: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Clusters after moving every near-duplicate group whole into the cluster holding most of it.

    Frames of one video or fakes made from one photo are near-duplicates (stage 1's ``dup_group``)
    that k-means may scatter over several clusters. Joining those clusters into one fold unit (the
    former rule) can chain most clusters of real data into a single unit, so folds collapse; moving
    the few members instead keeps every cluster a unit of its own. Ties go to the smaller cluster id.
    ``dup_group`` -1 = unknown (never moved).

    Returns:
        (cluster per sample, number of groups whose members were in more than one cluster)
    """
    clusters = np.asarray(clusters).copy()
    if dup_groups is None:
        return clusters, 0
    dup_groups = np.asarray(dup_groups)
    known = dup_groups >= 0
    d = pd.DataFrame({"g": dup_groups[known], "c": clusters[known]})
    counts = d.groupby(["g", "c"]).size().rename("n").reset_index()
    major = (counts.sort_values(["g", "n", "c"], ascending=[True, False, True], kind="stable")
             .drop_duplicates("g").set_index("g").c)
    n_spanning = int((counts.groupby("g").size() > 1).sum())
    clusters[known] = major.loc[d.g].to_numpy()
    return clusters, n_spanning


def assign_folds(clusters: np.ndarray, labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold per sample: whole clusters, largest first, each into the fold it unbalances least.

    Greedy bin packing over two loads per fold, its share of the real and of the fake samples: a
    cluster goes where the sum of squared shares grows least (ties: the fold with fewer samples). Both
    classes spread evenly, so each fold holds near ``1/n_folds`` of the samples and of each class, and
    a val fold of per-class clusters gets real and fake ones. StratifiedGroupKFold (the former rule)
    balanced labels, not sizes: up to twice a fold's share in one fold. Equal-size clusters are taken
    in a seeded order and fold numbers are a seeded permutation, so which fold gets the largest
    cluster depends on ``seed``. A cluster is never cut: one larger than a fold's share leaves the
    folds unbalanced, and a warning says to raise ``cluster_split.n_clusters``.
    """
    ids, inv, sizes = np.unique(clusters, return_inverse=True, return_counts=True)
    if len(ids) < n_folds:
        raise ConfigError(f"{len(ids)} clusters cannot fill {n_folds} folds: raise cluster_split.n_clusters or lower "
                          f"cluster_split.n_folds")
    fake = np.asarray(labels) == 1
    counts = np.stack([np.bincount(inv, weights=~fake, minlength=len(ids)),
                       np.bincount(inv, weights=fake, minlength=len(ids))], axis=1)  # (clusters, [real, fake])
    scale = 1.0 / np.maximum(counts.sum(axis=0), 1)
    rng = np.random.default_rng(seed)
    load = np.zeros((n_folds, 2))  # (folds, [real, fake]) samples so far
    unit_fold = np.empty(len(ids), dtype=np.int64)
    for u in np.lexsort((rng.permutation(len(ids)), -sizes)):  # largest first, seeded among equals
        growth = (((load + counts[u]) * scale) ** 2 - (load * scale) ** 2).sum(axis=1)
        f = int(np.lexsort((load.sum(axis=1), growth))[0])
        unit_fold[u] = f
        load[f] += counts[u]
    warn_unbalanced(load, sizes, ids)
    return rng.permutation(n_folds)[unit_fold[inv]]


def warn_unbalanced(load: np.ndarray, sizes: np.ndarray, ids: np.ndarray) -> None:
    """Log what a cluster-whole split could not balance: a fold far above its share, a class missing."""
    total = load.sum(axis=1)
    if total.max() > 1.5 * total.sum() / len(total):
        log.warning("folds are unbalanced (%s samples): cluster %s alone holds %.0f%% of them; raise "
                    "cluster_split.n_clusters", total.astype(int).tolist(), ids[sizes.argmax()],
                    100 * sizes.max() / sizes.sum())
    for c, name in enumerate(("real", "fake")):
        if load[:, c].sum() and (load[:, c] == 0).any():
            log.warning("some folds have no %s image (fewer %s clusters than folds): raise cluster_split.n_clusters",
                        name, name)


def attach_generated(orig: pd.DataFrame, derived: pd.DataFrame,
                     val_fold: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generated images in their source's fold, minus those whose splice donor would leak.

    A donor (``donor_uid``, "" = none) lends pixels to the fake, so a fake whose donor sits in another
    fold than its source cannot be placed without leaking when one of the two folds is ``val_fold``:
    val pixels would enter training, or a val fake would be made of training pixels. Those fakes are
    dropped (stage 2 draws donors before the split exists). ``val_fold`` None: any fold may become
    val, so every cross-fold donor is dropped.

    Returns:
        (kept generated rows with cluster, kmeans_cluster and fold; dropped rows)
    """
    src = orig.set_index("uid")
    missing = sorted(set(derived.source_uid) - set(src.index))
    if missing:
        raise DataError(f"generated images derive from unknown sources, e.g. {missing[:3]}")
    donors = donor_uids(derived)
    unknown = sorted(set(donors[donors != ""]) - set(src.index))
    if unknown:
        raise DataError(f"generated images take pixels from unknown donors, e.g. {unknown[:3]}; rerun stage 2")
    derived = derived.assign(**{c: src[c].loc[derived.source_uid].to_numpy()
                                for c in ("cluster", "kmeans_cluster", "fold") if c in src})
    has = donors != ""
    donor_fold = np.full(len(derived), -1, dtype=np.int64)
    donor_fold[has] = src.fold.loc[donors[has]].to_numpy()
    leak = has & donor_leaks(derived.fold.to_numpy(), donor_fold, val_fold)
    return derived[~leak], derived[leak]


def donor_uids(df: pd.DataFrame) -> np.ndarray:
    """``donor_uid`` per row as strings, "" where there is none (or no such column)."""
    if "donor_uid" not in df:
        return np.full(len(df), "", dtype=object)
    return df.donor_uid.fillna("").astype(str).to_numpy(dtype=object)


def donor_leaks(fold: np.ndarray, donor_fold: np.ndarray, val_fold: int | None) -> np.ndarray:
    """Rows whose donor sits in another fold, one of the two being ``val_fold`` (None: any fold)."""
    cross = fold != donor_fold
    return cross if val_fold is None else cross & ((fold == val_fold) | (donor_fold == val_fold))


def split_pool(pool: pd.DataFrame, feats: np.ndarray, n_clusters: int | Sequence[int], per_class: bool,
               n_folds: int, seed: int, k_candidates: Sequence[int] = DEFAULT_K_CANDIDATES,
               engine: KMeansEngine | None = None, val_fold: int | None = None) -> pd.DataFrame:
    """Cluster and fold the original images of ``pool``; generated ones inherit their source's fold.

    ``n_clusters`` 0: k chosen by silhouette among ``k_candidates`` (:func:`select_k`).

    ``feats`` holds one row per *original* image (origin != 'aug'), in pool order (an array or stage 3's
    features file, :class:`dfpipe.cluster_split.features.FeatureFile`). With a ``dup_group`` column (stage 1),
    near-duplicates always share a fold (:func:`settle_near_duplicates`; ``kmeans_cluster`` keeps k-means'
    own id).
    Generated images whose donor would leak into or out of ``val_fold`` are left out
    (:func:`attach_generated`). ``engine``: where k-means runs (default sklearn on CPU).
    """
    if val_fold is not None and not 0 <= val_fold < n_folds:
        raise ConfigError(f"cluster_split.val_fold {val_fold} is not a fold: folds are 0..{n_folds - 1}")
    orig = pool[pool.origin != "aug"].reset_index(drop=True)
    if len(orig) != len(feats):
        raise ValueError(f"{len(feats)} embeddings for {len(orig)} original images")
    labels = orig.label.to_numpy()
    if np.isscalar(n_clusters) and n_clusters == 0:
        n_clusters, _ = select_k(feats, labels, per_class, k_candidates, seed, engine=engine)
    kmeans = cluster_ids(feats, labels, n_clusters, per_class, seed, engine)
    dups = orig.dup_group.to_numpy() if "dup_group" in orig else None
    clusters, n_spanning = settle_near_duplicates(kmeans, dups)
    if n_spanning:
        log.info("%d near-duplicate groups spanned clusters: %d images moved to their group's majority cluster",
                 n_spanning, int((clusters != kmeans).sum()))
    orig = orig.assign(cluster=clusters, kmeans_cluster=kmeans,
                       fold=assign_folds(clusters, labels, n_folds, seed))
    derived, dropped = attach_generated(orig, pool[pool.origin == "aug"], val_fold)
    if len(dropped):
        log.info("left out %d generated images whose donor is in another fold than their source, one of "
                 "them val", len(dropped))
    out = pd.concat([orig, derived], ignore_index=True)
    check_split(out, val_fold)
    return out


def check_split(df: pd.DataFrame, val_fold: int | None = None) -> None:
    """Assert the leak-proof properties; raises AssertionError naming the first one broken.

    Every sample in one fold; clusters and near-duplicate groups never split over folds; a generated
    image in its source's fold; its donor in the same fold, or at least neither of the two in
    ``val_fold`` (None: in the same fold, whatever fold becomes val).
    """
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
    fold = df.set_index("uid").fold
    derived = df[df.source_uid != df.uid]
    if not derived.source_uid.isin(fold.index).all():
        raise AssertionError("a generated image's source is not in the split")
    if (fold.loc[derived.source_uid].to_numpy() != derived.fold.to_numpy()).any():
        raise AssertionError("a generated image is not in its source's fold")
    donors = donor_uids(derived)
    has = donors != ""
    if not pd.Series(donors[has]).isin(fold.index).all():
        raise AssertionError("a generated image's donor is not in the split")
    if donor_leaks(derived.fold.to_numpy()[has], fold.loc[donors[has]].to_numpy(), val_fold).any():
        raise AssertionError("a generated image's donor is in another fold, one of them val: its pixels leak")


def cluster_report(df: pd.DataFrame, val_fold: int, dropped: pd.DataFrame | None = None) -> dict:
    """Clusters, folds (sizes of originals and their share), near-duplicate moves and left-out fakes."""
    orig = df[df.origin != "aug"]
    clusters = {
        str(c): {"n": int(len(g)), "n_fake": int(g.label.sum()), "fold": int(g.fold.iloc[0]),
                 "origins": {k: int(v) for k, v in g.origin.value_counts().items()}}
        for c, g in orig.groupby("cluster")
    }
    n_orig = orig.fold.value_counts()
    folds = {
        str(f): {"n": int(len(g)), "n_original": int(n_orig.get(f, 0)),
                 "share_original": float(n_orig.get(f, 0) / max(len(orig), 1)), "n_fake": int(g.label.sum()),
                 "n_generated": int((g.origin == "aug").sum()), "n_clusters": int(g.cluster.nunique())}
        for f, g in df.groupby("fold")
    }
    val = orig[orig.fold == val_fold]
    by_method = dropped.method.value_counts() if dropped is not None and "method" in dropped else pd.Series()
    return {"n_clusters": len(clusters), "val_fold": val_fold, "n_val": int(len(val)),
            "val_fake_share": float(val.label.mean()) if len(val) else 0.0,
            "near_duplicates": near_duplicate_report(orig),
            "generated_dropped_for_donor_leak": {
                "n": int(0 if dropped is None else len(dropped)),
                "by_method": {str(k): int(v) for k, v in by_method.items()},
                "why": "splice donor and source in different folds, one of them val"},
            "clusters": clusters, "folds": folds}


def near_duplicate_report(orig: pd.DataFrame) -> dict:
    """How many near-duplicate groups k-means scattered over clusters, and how many images moved."""
    if "dup_group" not in orig or "kmeans_cluster" not in orig:
        return {"n_groups": 0, "n_spanning_clusters": 0, "n_moved": 0}
    known = orig[orig.dup_group >= 0]
    spans = known.groupby("dup_group").kmeans_cluster.nunique()
    return {"n_groups": int((known.dup_group.value_counts() > 1).sum()),
            "n_spanning_clusters": int((spans > 1).sum()),
            "n_moved": int((orig.cluster != orig.kmeans_cluster).sum())}
