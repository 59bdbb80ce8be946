"""Stage 5: score the val fold (metrics, verdict thresholds, the ensemble card) and the test set (submission)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from ..config import PredictConfig
from ..data.dataset import StoreDataset
from ..data.samples import load_manifest, load_split_pool
from ..io import write_csv, write_json
from ..layout import Layout
from ..metrics import MetricError, choose_thresholds, roc_points
from .combine import fit_stacking
from .ensemble import Ensemble, scoring_workers
from .provenance import provenance
from .reports import by_cluster, by_method, ensemble_metrics
from .roc_plot import RocSet, plot_roc
from .submission import build_submission

log = logging.getLogger(__name__)


def _loader(pool: pd.DataFrame, ens: Ensemble, batch_size: int) -> DataLoader:
    """Stored images cut to every input policy of the ensemble's experts, decoded in workers."""
    return DataLoader(StoreDataset(pool, ens.policies), batch_size=batch_size, shuffle=False,
                      num_workers=scoring_workers(-1, ens.device), pin_memory=ens.device.type == "cuda")


def _val_sets(cfg: PredictConfig, layout: Layout) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The val fold's original images (with their cluster) and its stage-2 generated images."""
    df = load_split_pool(layout.splits, layout.prepared, layout.augmented if cfg.per_method else None)
    in_val = df[df.subset == "val"]
    return (in_val[in_val.origin != "aug"].reset_index(drop=True),
            in_val[in_val.origin == "aug"].reset_index(drop=True))


def _combine_val(ens: Ensemble, cfg: PredictConfig, val_pe: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict]:
    """Val ensemble scores (out-of-fold for ``stack``, which is then fitted on all of val) and the
    combination as numbers for metrics.json."""
    if cfg.combine == "stack":
        ens.stack, scores = fit_stacking(val_pe, y, cfg.stack_folds)
        weights = {"intercept": ens.stack["intercept"],
                   **{f"coef_{n}": c for n, c in zip(ens.names, ens.stack["coef"])}}
        return scores, {"stack": weights}
    weights = {f"w_{n}": 1.0 / len(ens.names) for n in ens.names}
    return ens.combine_experts(val_pe), {cfg.combine: weights}


def _with_generated(ens: Ensemble, val_pe: np.ndarray, val_scores: np.ndarray,
                    gen_pe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(val scores, generated-image scores) on one scale: per-image combinations score the generated
    images alone (``stack`` val scores stay out-of-fold); ranks are relative, so ``rank`` ranks both
    sets together."""
    if ens.combine != "rank":
        return val_scores, ens.combine_experts(gen_pe)
    joint = ens.combine_experts(np.concatenate([val_pe, gen_pe], axis=1))
    return joint[:val_pe.shape[1]], joint[val_pe.shape[1]:]


def _score_test(ens: Ensemble, cfg: PredictConfig, prepared: str
                ) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """All listed test images of the store ``prepared``, the decodable ones, their per-expert and ensemble
    scores."""
    test_all = load_manifest(prepared, ok_only=False)
    test_all = test_all[test_all.split == "test"].reset_index(drop=True)
    test_ok = test_all[test_all.cache_index >= 0].reset_index(drop=True)
    test_pool = pd.DataFrame({"cache_path": [str(Path(prepared) / f) for f in test_ok.cache_file],
                              "cache_index": test_ok.cache_index, "label": -1})
    test_pe = ens.score_loader(_loader(test_pool, ens, cfg.batch_size), "score test")
    test_scores = ens.combine_experts(test_pe) if len(test_ok) else np.zeros(0)
    return test_all, test_ok, test_pe, test_scores


def _write_failures(path: str, test_all: pd.DataFrame) -> int:
    bad = test_all[test_all.cache_index < 0]
    errors = bad["error"] if "error" in bad else pd.Series([""] * len(bad), dtype=str)
    write_csv(path, pd.DataFrame({"img_name": bad.img_name.to_numpy(), "error": errors.to_numpy()}))
    if len(bad):
        log.warning("%d test image(s) failed to decode and get the fallback score %s: see %s",
                    len(bad), bad.img_name.iloc[0], path)
    return len(bad)


def protocol(combine: str, test_labelled: bool) -> dict[str, str]:
    """What each block of metrics.json may be read as (the fold that selects is never reported as held-out);
    written into the card, while metrics.json (numbers only) carries ``val.selection_biased: 1``. ``val`` picked each expert's epoch (stage 4), the verdict thresholds and, with ``stack``,
    the combination weights (its val metrics are then out-of-fold, the epoch choice still is not)."""
    weights = ("out-of-fold stacking predictions; epochs still chosen here" if combine == "stack"
               else "fixed combination; epochs chosen here")
    out = {"val": f"selection-biased: each expert's epoch and the verdict thresholds were chosen on this fold "
                  f"({weights}); an optimistic number, not a held-out one",
           "held_out": "stage 6 (reports/eval): sets no training or selection step saw"}
    if test_labelled:
        out["test"] = "held out: labels read after scoring; no training or selection step used them"
    return out


def _test_labels(layout: Layout) -> str:
    """The test set's label file when there is one (a challenge releases them later; the demo has them)."""
    path = layout.data("test_labels")
    if path and not Path(path).is_file():
        log.info("no test labels at %s: the test set is scored without metrics", path)
        return ""
    return path


def run(cfg: PredictConfig, layout: Layout) -> dict:
    """Run stage 5: score val (metrics, thresholds) and test (the submission); returns the metrics."""
    ens = Ensemble.load(layout.models, cfg.experts, cfg.tta, cfg.combine)
    names = ens.names
    if cfg.combine == "rank":
        log.warning("combine 'rank': scores are ranks within each scored set, so the thresholds chosen on val "
                    "(verdicts, accuracy) do not carry over to other sets or to single images")
    val, gen = _val_sets(cfg, layout)
    y = val.label.to_numpy()
    val_pe = ens.score_loader(_loader(val, ens, cfg.batch_size), "score val")
    val_scores, combination = _combine_val(ens, cfg, val_pe, y)
    thresholds = choose_thresholds(y, val_scores, cfg.max_fpr, cfg.max_fnr)
    thr = {"ensemble": thresholds["t_decision"], **{n: choose_thresholds(y, p)["t_decision"]
                                                    for n, p in zip(names, val_pe)}}
    metrics: dict[str, Any] = {"val": ensemble_metrics(y, val_pe, val_scores, names, thr)}
    metrics["val"]["by_cluster"] = by_cluster(val, val_scores, thresholds["t_decision"])
    if len(gen):
        gen_pe = ens.score_loader(_loader(gen, ens, cfg.batch_size), "score gen")
        metrics["val"]["by_method"] = by_method(val, *_with_generated(ens, val_pe, val_scores, gen_pe), gen,
                                                thresholds["t_decision"])
    metrics["combine"], metrics["thresholds"], metrics["n_tta_views"] = combination, thresholds, len(ens.views)
    metrics["val"]["selection_biased"] = 1  # dvc metrics show: numbers only; the card says why (protocol)
    write_csv(layout.roc, pd.DataFrame(roc_points(y, val_scores)))
    roc_sets = [RocSet("val", "selection-biased (epochs, thresholds chosen on it)", y,
                       {"ensemble": val_scores, **dict(zip(names, val_pe))})]

    # test: every listed image gets a row
    test_all, test_ok, test_pe, test_scores = _score_test(ens, cfg, layout.prepared)
    sub = build_submission(test_all, test_scores, cfg.fallback_score)
    write_csv(layout.submission, sub, float_format="%.6f")
    metrics["n_test"] = len(test_all)
    metrics["n_test_failed"] = _write_failures(layout.failures, test_all)
    test_labels = _test_labels(layout)
    if test_labels and len(test_ok):
        known, y_test = _known_test_labels(test_labels, test_ok)
        metrics["test"] = ensemble_metrics(y_test, test_pe[:, known], test_scores[known], names, thr)
        roc_sets.append(RocSet("test", "held out", y_test,
                               {"ensemble": test_scores[known], **dict(zip(names, test_pe[:, known]))}))
    plot_roc(layout.roc_png, roc_sets)
    write_json(layout.metrics, metrics)
    write_json(layout.card, ens.card(thresholds, {"fallback_score": cfg.fallback_score,
                                               "val": metrics["val"]["ensemble"],
                                               "protocol": protocol(cfg.combine, bool(test_labels)),
                                               **provenance(layout.prepared)}))
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
