"""Stage 3 orchestration: embed originals, cluster, fold, write splits, report and a picture."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import SplitConfig
from ..data.samples import load_pool
from ..io import atomic_path, write_csv, write_json
from .cluster import cluster_report, split_pool
from .embed import embed_pool

log = logging.getLogger(__name__)
SPLIT_COLUMNS = ["uid", "img_name", "label", "origin", "source_uid", "method", "cluster", "dup_group", "fold",
                 "subset"]


def run_split(cfg: SplitConfig) -> pd.DataFrame:
    pool = load_pool(cfg.prepared_dir, cfg.augmented_dir)
    orig = pool[pool.origin != "aug"].reset_index(drop=True)
    feats = embed_pool(orig, cfg.backbone, cfg.pretrained, cfg.img_size, cfg.batch_size)
    with atomic_path(cfg.features) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, feats)
    df = split_pool(pool, feats, cfg.n_clusters, cfg.per_class, cfg.n_folds, cfg.seed)
    if not ((df.fold == cfg.val_fold) & (df.origin != "aug")).any():
        raise ValueError(f"val_fold {cfg.val_fold} is empty; folds are 0..{cfg.n_folds - 1}")
    df["subset"] = np.where(df.fold == cfg.val_fold, "val", "train")
    write_csv(cfg.out_csv, df[SPLIT_COLUMNS])
    report = cluster_report(df, cfg.val_fold)
    write_json(cfg.report, report)
    plot_path = Path(cfg.report).with_suffix(".png")
    plot_embedding(feats, df[df.origin != "aug"], plot_path)
    log.info("split %d originals + %d generated into %d folds over %d clusters; val fold %d: %d images",
             len(orig), len(df) - len(orig), cfg.n_folds, report["n_clusters"], cfg.val_fold, report["n_val"])
    return df


def plot_embedding(feats: np.ndarray, orig: pd.DataFrame, path: Path) -> None:
    """2-D PCA of the embeddings, coloured by cluster (left) and by label (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    xy = PCA(n_components=2, random_state=0).fit_transform(feats.astype(np.float32))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    axes[0].scatter(xy[:, 0], xy[:, 1], c=orig.cluster, cmap="tab20", s=8)
    axes[0].set_title("clusters (colour) - PCA of embeddings")
    for lab, colour, name in ((0, "tab:blue", "real"), (1, "tab:red", "fake")):
        m = orig.label.to_numpy() == lab
        axes[1].scatter(xy[m, 0], xy[m, 1], c=colour, s=8, label=name, alpha=0.7)
    axes[1].legend()
    axes[1].set_title("labels")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
