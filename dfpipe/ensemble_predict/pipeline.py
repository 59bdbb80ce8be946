"""Stage 5: score the val fold (metrics, verdict thresholds, the ensemble card) and the test set (submission)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import PredictConfig
from ..data.samples import load_manifest, load_split_pool
from ..io import write_csv, write_json
from ..layout import Layout
from ..metrics import MetricError, choose_thresholds, roc_points
from .combine import combine_val, with_generated
from .ensemble import Ensemble
from .provenance import protocol, provenance
from .reports import by_cluster, by_method, ensemble_metrics
from .roc_plot import RocSet, plot_roc
from .submission import build_submission

log = logging.getLogger(__name__)


def _val_sets(pool: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The val fold's original images (with their cluster) and its stage-2 generated images, of the split pool."""
    in_val = pool[pool.subset == "val"]
    return (in_val[in_val.origin != "aug"].reset_index(drop=True),
            in_val[in_val.origin == "aug"].reset_index(drop=True))


def _test_set(prepared: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """All listed test images of the store ``prepared`` (failed ones included), the decodable ones, and those as a
    pool to score."""
    test_all = load_manifest(prepared, ok_only=False)
    test_all = test_all[test_all.split == "test"].reset_index(drop=True)
    test_ok = test_all[test_all.cache_index >= 0].reset_index(drop=True)
    test_pool = pd.DataFrame({"cache_path": [str(Path(prepared) / f) for f in test_ok.cache_file],
                              "cache_index": test_ok.cache_index, "label": -1})
    return test_all, test_ok, test_pool


def _failures(test_all: pd.DataFrame) -> pd.DataFrame:
    """The test images that failed to decode, with their error (the submission gives them the fallback score)."""
    bad = test_all[test_all.cache_index < 0]
    errors = bad["error"] if "error" in bad else pd.Series([""] * len(bad), dtype=str)
    return pd.DataFrame({"img_name": bad.img_name.to_numpy(), "error": errors.to_numpy()})


def _test_labels(path: str) -> str:
    """The test set's label file ``path`` when it is there (a challenge releases them later; the demo has them)."""
    if path and not Path(path).is_file():
        log.info("no test labels at %s: the test set is scored without metrics", path)
        return ""
    return path


def _val_metrics(val: pd.DataFrame, val_pe: np.ndarray, val_scores: np.ndarray, names: list[str], t_decision: float,
                 generated: tuple[pd.DataFrame, np.ndarray, np.ndarray] | None) -> tuple[dict, dict[str, float]]:
    """metrics.json's ``val`` block and each scorer's decision threshold chosen on val (the ensemble's is
    ``t_decision``); ``generated``: the val fold's generated images and (val, their) scores on one scale."""
    y = val.label.to_numpy()
    thr = {"ensemble": t_decision, **{n: choose_thresholds(y, p)["t_decision"] for n, p in zip(names, val_pe)}}
    out = ensemble_metrics(y, val_pe, val_scores, names, thr)
    out["by_cluster"] = by_cluster(val, val_scores, t_decision)
    if generated is not None:
        gen, val_joint, gen_scores = generated
        out["by_method"] = by_method(val, val_joint, gen_scores, gen, t_decision)
    out["selection_biased"] = 1  # dvc metrics show: numbers only; the card says why (protocol)
    return out, thr


def run(cfg: PredictConfig, layout: Layout) -> dict:
    """Run stage 5: score val (metrics, thresholds) and test (the submission); returns the metrics.

    One way down: the ensemble and the inputs are read first, every set is scored in one go, then combined,
    measured and turned into the outputs, which are written last (nothing is half-written when a step fails)."""
    # the ensemble first: its config (experts, views, combine) and checkpoints are checked before any data is read
    ens = Ensemble.load(layout.models, cfg.experts, cfg.tta, cfg.combine)
    if cfg.combine == "rank":
        log.warning("combine 'rank': scores are ranks within each scored set, so the thresholds chosen on val "
                    "(verdicts, accuracy) do not carry over to other sets or to single images")
    # the inputs, read once: the images to score, the test labels, the training data's card
    test_all, test_ok, test_pool = _test_set(layout.prepared)
    val, gen = _val_sets(load_split_pool(layout.splits, layout.prepared, layout.augmented if cfg.per_method else None))
    test_labels = _test_labels(layout.data("test_labels"))
    origin = {"protocol": protocol(cfg.combine, bool(test_labels)), **provenance(layout.prepared)}

    val_pe = ens.score_pool(val, cfg.batch_size, "score val")
    gen_pe = ens.score_pool(gen, cfg.batch_size, "score gen") if len(gen) else None
    test_pe = ens.score_pool(test_pool, cfg.batch_size, "score test")
    names = ens.names

    # the combination, fitted on val (stack) and applied to the other sets; the thresholds, chosen on val
    y = val.label.to_numpy()
    ens.stack, val_scores, combination = combine_val(cfg.combine, names, val_pe, y, cfg.stack_folds)
    generated = None if gen_pe is None else (gen, *with_generated(cfg.combine, ens.stack, val_pe, val_scores, gen_pe))
    test_scores = ens.combine_experts(test_pe) if len(test_ok) else np.zeros(0)  # the CLI's and the API's path
    thresholds = choose_thresholds(y, val_scores, cfg.max_fpr, cfg.max_fnr)

    metrics: dict[str, Any] = {}
    metrics["val"], thr = _val_metrics(val, val_pe, val_scores, names, thresholds["t_decision"], generated)
    metrics["combine"], metrics["thresholds"], metrics["n_tta_views"] = combination, thresholds, len(ens.views)
    roc_sets = [RocSet("val", "selection-biased (epochs, thresholds chosen on it)", y,
                       {"ensemble": val_scores, **dict(zip(names, val_pe))})]
    # test: every listed image gets a row
    sub = build_submission(test_all, test_scores, cfg.fallback_score)
    failures = _failures(test_all)
    metrics["n_test"], metrics["n_test_failed"] = len(test_all), len(failures)
    if test_labels and len(test_ok):
        known, y_test = _known_test_labels(test_labels, test_ok)
        metrics["test"] = ensemble_metrics(y_test, test_pe[:, known], test_scores[known], names, thr)
        roc_sets.append(RocSet("test", "held out", y_test,
                               {"ensemble": test_scores[known], **dict(zip(names, test_pe[:, known]))}))
    card = ens.card(thresholds, {"fallback_score": cfg.fallback_score, "val": metrics["val"]["ensemble"], **origin})

    plot_roc(layout.roc_png, roc_sets)
    write_csv(layout.roc, pd.DataFrame(roc_points(y, val_scores)))
    write_csv(layout.submission, sub, float_format="%.6f")
    write_csv(layout.failures, failures)
    write_json(layout.metrics, metrics)
    write_json(layout.card, card)
    if len(failures):
        log.warning("%d test image(s) failed to decode and get the fallback score %s: see %s",
                    len(failures), failures.img_name.iloc[0], layout.failures)
    log.info("val AUC %.4f (selection-biased: epochs and thresholds were chosen on val), TPR@FPR=1e-3 %.3f "
             "(%d images); wrote %d test rows to %s",
             metrics["val"]["ensemble"]["auc"], metrics["val"]["ensemble"]["tpr_at_fpr_1e-3"], len(val),
             len(sub), layout.submission)
    return metrics


def _known_test_labels(labels_csv: str, test_ok: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Which test images have a known label (e.g. released after the challenge), and those labels; the metrics
    on them use the thresholds chosen on val."""
    from ..data.labels import read_labels

    labels = read_labels(labels_csv).set_index("img_name").label
    known = test_ok.img_name.isin(labels.index).to_numpy()
    if not known.any():
        raise MetricError(f"{labels_csv}: none of its names are test images")
    return known, labels.loc[test_ok.img_name[known]].to_numpy()
