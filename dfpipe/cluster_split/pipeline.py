"""Stage 3 orchestration: embed originals, cluster, fold, write the splits, the report and the pictures."""

from __future__ import annotations

import logging
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import Embedder, SplitConfig
from ..data.samples import load_pool
from ..errors import ConfigError
from ..io import write_csv, write_json
from ..layout import Layout
from .cluster import cluster_report, select_k, split_pool
from .embed import embed_to_file, load_backbone
from .features import FeatureFile
from .kmeans import make_engine
from .pictures import cluster_contact_sheet, plot_embedding

log = logging.getLogger(__name__)
SPLIT_COLUMNS = ["uid", "img_name", "label", "origin", "source_uid", "donor_uid", "method", "cluster", "dup_group",
                 "fold", "subset"]
EMBEDDERS = typing.get_args(Embedder)  # ("pretrained", "finetune")
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
    pool = load_pool(layout.prepared, layout.augmented)
    orig = pool[pool.origin != "aug"].reset_index(drop=True)
    engine = make_engine(cfg.kmeans_backend, cfg.minibatch_above)  # checked before the slow part
    kmeans_info = engine.describe(len(orig))  # the path k-means takes for this many rows: known now
    model, embedder_info = build_embedder(cfg, orig)
    _, embedder_info["dim"] = embed_to_file(orig, model, cfg.img_size, cfg.batch_size, layout.features,
                                            index_path=layout.features_index)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU to torch k-means
    feats = FeatureFile(layout.features)  # rows read on demand: k-means reads it in chunks when the pool is large
    k, k_selection = cfg.n_clusters, None
    if k == 0:  # choose k by silhouette score
        k, k_selection = select_k(feats, orig.label.to_numpy(), cfg.per_class, cfg.k_candidates, cfg.seed,
                                  cfg.silhouette_sample, engine)
    df = split_pool(pool, feats, k, cfg.per_class, cfg.n_folds, cfg.seed, engine=engine, val_fold=cfg.val_fold)
    df["subset"] = np.where(df.fold == cfg.val_fold, "val", "train")
    write_csv(layout.splits, df[SPLIT_COLUMNS])
    report = cluster_report(df, cfg.val_fold, dropped=pool[~pool.uid.isin(df.uid)])
    report["embedding"] = embedder_info
    report["kmeans"] = kmeans_info
    if k_selection is not None:
        report["k_selection"] = k_selection
    write_json(layout.cluster_report, report)
    plot_embedding(feats, df[df.origin != "aug"], Path(layout.cluster_plot), cfg.seed, cfg.val_fold)
    cluster_contact_sheet(pool, df, layout.cluster_examples, cfg.contact_sheet_per_cluster, cfg.seed, cfg.val_fold)
    log.info("split %d originals + %d generated into %d folds over %d clusters; val fold %d: %d images",
             len(orig), len(df) - len(orig), cfg.n_folds, report["n_clusters"], cfg.val_fold, report["n_val"])
    return df
