"""Stage 3 orchestration: embed originals, cluster, fold, write splits, report and a picture."""

from __future__ import annotations

import logging
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import Embedder, SplitConfig
from ..data.samples import load_pool
from ..data.store import StoreReader
from ..errors import ConfigError
from ..io import atomic_path, write_csv, write_json
from ..layout import Layout
from .cluster import cluster_report, select_k, split_pool
from .embed import embed_to_file, load_backbone, load_features, write_index
from .kmeans import make_engine

log = logging.getLogger(__name__)
SPLIT_COLUMNS = ["uid", "img_name", "label", "origin", "source_uid", "donor_uid", "method", "cluster", "dup_group",
                 "fold", "subset"]
EMBEDDERS = typing.get_args(Embedder)  # ("pretrained", "finetune")
PLOT_MAX_POINTS = 20_000  # the PCA picture uses a seeded sample of this many originals at most
FINETUNE_NOTE = ("fine-tuned on the labels of the train-origin originals it then clusters (as the winners "
                 "did): clusters follow the labels more than with a pretrained embedder")


def build_embedder(cfg: SplitConfig, orig: pd.DataFrame) -> tuple[torch.nn.Module, dict]:
    """The feature extractor ``cfg.embedder`` names, and a description of it for the report."""
    if cfg.embedder not in EMBEDDERS:
        raise ConfigError(f"unknown cluster_split.embedder {cfg.embedder!r}; choose one of {EMBEDDERS}")
    info = {"embedder": cfg.embedder, "backbone": cfg.backbone, "pretrained": cfg.pretrained,
            "img_size": cfg.img_size}
    if cfg.embedder == "pretrained":
        return load_backbone(cfg.backbone, cfg.pretrained, seed=cfg.seed), info
    from .finetune import finetune_embedder

    train = orig[orig.origin == "train"]
    model, history = finetune_embedder(train, cfg.backbone, cfg.pretrained, cfg.img_size, cfg.finetune_batch_size,
                                       cfg.finetune_epochs, cfg.finetune_lr, cfg.seed)
    info["finetune"] = {"n_images": int(len(train)), "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr,
                        "batch_size": cfg.finetune_batch_size, "history": history, "note": FINETUNE_NOTE}
    return model, info


def run(cfg: SplitConfig, layout: Layout) -> pd.DataFrame:
    """Run stage 3 on stages 1-2's stores and return the split table (also written to ``layout.splits``)."""
    engine = make_engine(cfg.kmeans_backend, cfg.minibatch_above)  # checked before the slow part
    pool = load_pool(layout.prepared, layout.augmented)
    orig = pool[pool.origin != "aug"].reset_index(drop=True)
    model, embedder_info = build_embedder(cfg, orig)
    _, embedder_info["dim"] = embed_to_file(orig, model, cfg.img_size, cfg.batch_size, layout.features)
    write_index(orig, layout.features_index)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU to torch k-means
    feats = load_features(layout.features)  # rows read on demand: k-means reads it in chunks when the pool is large
    k, k_selection = cfg.n_clusters, None
    if k == 0:  # choose k by silhouette score
        k, k_selection = select_k(feats, orig.label.to_numpy(), cfg.per_class, cfg.k_candidates, cfg.seed,
                                  cfg.silhouette_sample, engine)
    df = split_pool(pool, feats, k, cfg.per_class, cfg.n_folds, cfg.seed, engine=engine, val_fold=cfg.val_fold)
    df["subset"] = np.where(df.fold == cfg.val_fold, "val", "train")
    write_csv(layout.splits, df[SPLIT_COLUMNS])
    report = cluster_report(df, cfg.val_fold, dropped=pool[~pool.uid.isin(df.uid)])
    report["embedding"] = embedder_info
    report["kmeans"] = engine.describe(len(orig))
    if k_selection is not None:
        report["k_selection"] = k_selection
    write_json(layout.cluster_report, report)
    plot_embedding(feats, df[df.origin != "aug"], Path(layout.cluster_plot), cfg.seed)
    cluster_contact_sheet(pool, df, layout.cluster_examples, cfg.contact_sheet_per_cluster, cfg.seed)
    log.info("split %d originals + %d generated into %d folds over %d clusters; val fold %d: %d images",
             len(orig), len(df) - len(orig), cfg.n_folds, report["n_clusters"], cfg.val_fold, report["n_val"])
    return df


def plot_embedding(feats: np.ndarray, orig: pd.DataFrame, path: Path, seed: int = 0) -> None:
    """2-D PCA of the embeddings, coloured by cluster (left) and by label (right).

    ``orig`` rows match ``feats`` rows; above ``PLOT_MAX_POINTS`` a seeded sample of them is drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    if len(orig) > PLOT_MAX_POINTS:
        pick = np.sort(np.random.default_rng(seed).choice(len(orig), PLOT_MAX_POINTS, replace=False))
        feats, orig = feats[pick], orig.iloc[pick]
    xy = PCA(n_components=2, random_state=0).fit_transform(np.asarray(feats, dtype=np.float32))
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


SHEET_THUMB = 64    # thumbnail side, px
SHEET_BORDER = 3    # label border: red = fake, blue = real
SHEET_GAP = 4
SHEET_LABEL_W = 56  # left column with the cluster id


def contact_sheet_shape(n_clusters: int, per_cluster: int) -> tuple[int, int]:
    """(height, width) in px of :func:`cluster_contact_sheet`'s image."""
    cell = SHEET_THUMB + SHEET_GAP
    return n_clusters * cell + SHEET_GAP, SHEET_LABEL_W + per_cluster * cell + SHEET_GAP


def cluster_contact_sheet(pool: pd.DataFrame, df: pd.DataFrame, path: str | Path, per_cluster: int,
                          seed: int) -> Path:
    """PNG with one row per cluster (sorted by id): up to ``per_cluster`` original images of it, drawn
    from the image store (seeded choice), each framed red (fake) or blue (real). Written atomically."""
    import cv2

    orig = df[df.origin != "aug"].drop(columns=["cache_path", "cache_index"], errors="ignore")
    orig = orig.merge(pool[["uid", "cache_path", "cache_index"]], on="uid", how="left")
    clusters = sorted(orig.cluster.unique())
    h, w = contact_sheet_shape(len(clusters), per_cluster)
    sheet = np.full((h, w, 3), 255, np.uint8)  # BGR
    rng = np.random.default_rng(seed)
    reader = StoreReader()
    cell, t, b = SHEET_THUMB + SHEET_GAP, SHEET_THUMB, SHEET_BORDER
    for r, c in enumerate(clusters):
        g = orig[orig.cluster == c]
        pick = np.sort(rng.choice(len(g), size=min(per_cluster, len(g)), replace=False))
        y = SHEET_GAP + r * cell
        cv2.putText(sheet, str(c), (6, y + t // 2 + 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        for j, i in enumerate(pick):
            row = g.iloc[i]
            img = cv2.cvtColor(reader.image(row.cache_path, int(row.cache_index)), cv2.COLOR_RGB2BGR)
            thumb = cv2.resize(img, (t - 2 * b, t - 2 * b), interpolation=cv2.INTER_AREA)
            x = SHEET_LABEL_W + SHEET_GAP + j * cell
            sheet[y:y + t, x:x + t] = (0, 0, 255) if int(row.label) == 1 else (255, 0, 0)
            sheet[y + b:y + t - b, x + b:x + t - b] = thumb
    ok, buf = cv2.imencode(".png", sheet)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.tobytes())
    log.info("contact sheet of %d clusters: %s", len(clusters), path)
    return Path(path)

