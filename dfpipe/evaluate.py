"""Stage 6: score labelled sets that no training or selection step saw, clean and degraded.

Validation AUC says how well the ensemble ranks images like the ones it was tuned on; a deepfake
detector meets other generators, other cameras and images that were re-encoded or rescaled on their
way to it. This stage scores each labelled set of ``evaluate.sets`` through the ensemble's one scoring
path (:meth:`dfpipe.ensemble_predict.Ensemble.score_files`), once as stored ("clean") and once per degradation
(``jpeg<q>``, ``half``, ``blur<sigma>``) applied to the full-size decoded image *before* the
checkpoints' preprocessing (stage 1: ``max_side``, face crop; then each expert's input policy), as a
re-encode or rescale on the way to us would; and reports per set: AUC with a bootstrap 95% interval,
AP, TPR at FPR 1e-2 / 1e-3, EER, and at the card's thresholds (chosen on validation data, never on
these sets) F1, the confusion matrix and the share of each verdict.

A set is either a folder with ``real/`` and ``fake/`` sub-folders (recursive) or a folder plus a label
CSV ``img_name,target``. Files that fail to decode are counted (``n_failed``), logged and left out.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

from .config import EvalSetConfig, EvaluateConfig
from .errors import ConfigError, DataError, InputError
from .data.images import scan_folder
from .data.labels import read_labels
from .io import atomic_open, write_csv, write_json
from .layout import Layout
from .metrics import MetricError, average_precision, eer, roc_auc, roc_points, tpr_at_fpr, verdict

if TYPE_CHECKING:  # torch is imported only when a run gets past its config checks
    from .ensemble_predict import Ensemble

log = logging.getLogger(__name__)

CLEAN = "clean"
DEGRADATION_FORMS = ("jpeg<q> (q in 1..100)", "half", "blur<sigma> (sigma > 0)")
MEAN_KEYS = ("auc", "ap", "tpr_at_fpr_1e-2", "tpr_at_fpr_1e-3", "eer", "f1")
VERDICT_KEYS = {"likely fake": "share_likely_fake", "uncertain": "share_uncertain", "likely real": "share_likely_real"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_JPEG = re.compile(r"^jpeg(\d+)$")
_BLUR = re.compile(r"^blur(\d+(?:\.\d+)?)$")

__all__ = ["Degradation", "bootstrap_auc", "eval_sets", "list_class_folders", "list_set", "markdown_table",
           "parse_degradation", "run", "set_metrics", "set_paths", "weighted_auc"]


# ----------------------------------------------------------------------------- listing a set
def list_set(spec: EvalSetConfig, data_root: str | Path) -> pd.DataFrame:
    """One row per labelled file of a set: ``img_name`` (relative to its image folder), ``path``, ``label``.

    With ``spec.labels`` the label CSV decides (its names are relative to ``spec.images``; a listed
    file that is missing counts later as failed, like an undecodable one); without it ``real/**`` is 0
    and ``fake/**`` is 1. Both paths are relative to ``data_root`` unless absolute.
    """
    root, labels_csv = set_paths(spec, data_root)
    if not root.is_dir():
        raise InputError(f"evaluate set {spec.name!r}: image folder {root} not found")
    if labels_csv is not None:
        labels = read_labels(labels_csv)
        df = pd.DataFrame({"img_name": labels.img_name, "label": labels.label.astype(int)})
    else:
        df = list_class_folders(spec.name, root)
    df["path"] = [str(root / n) for n in df.img_name]
    return df[["img_name", "path", "label"]].reset_index(drop=True)


def set_paths(spec: EvalSetConfig, data_root: str | Path) -> tuple[Path, Path | None]:
    """A set's image folder and label CSV (None: labelled by ``real/`` and ``fake/``), inside ``data_root`` unless
    absolute: the paths :func:`list_set` reads."""
    return Path(data_root) / spec.images, Path(data_root) / spec.labels if spec.labels else None


def list_class_folders(name: str, root: Path) -> pd.DataFrame:
    """``real/**`` = 0, ``fake/**`` = 1; both classes must have at least one image file."""
    found = {cls: scan_folder(root / cls)[0] if (root / cls).is_dir() else [] for cls in ("real", "fake")}
    if not any(found.values()):
        raise DataError(f"evaluate set {name!r}: no images in {root}/real or {root}/fake; put real images in "
                         "real/ and fakes in fake/, or give the set a label CSV (labels: ...)")
    for cls, files in found.items():
        if not files:
            raise DataError(f"evaluate set {name!r}: {root / cls} has no images; both real/ and fake/ are needed")
    rows = [(f"{cls}/{f}", int(cls == "fake")) for cls, files in found.items() for f in files]
    return pd.DataFrame(rows, columns=["img_name", "label"])


def _check_set_names(sets: list[EvalSetConfig]) -> None:
    """Names key the metrics JSON and name the ROC files: unique, file-name safe, not ``mean``."""
    names = [s.name for s in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"evaluate.sets: duplicate set name(s) {dup}; give every set a unique name")
    for n in names:
        if not _NAME.match(n) or n == "mean":
            raise ConfigError(f"evaluate.sets: set name {n!r} must be letters, digits, '_', '.', '-' and not 'mean' "
                             "(it names the ROC file and a metrics key)")


# ----------------------------------------------------------------------------- degradations
@dataclass(frozen=True)
class Degradation:
    """A deterministic change of a uint8 RGB (H, W, 3) image, as it might happen online.

    A module-level frozen dataclass, so DataLoader worker processes can pickle it.
    """

    name: str
    kind: str  # jpeg | half | blur
    value: float = 0.0  # JPEG quality or blur sigma

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if self.kind == "jpeg":
            return _jpeg(img, int(self.value))
        if self.kind == "half":
            h, w = img.shape[:2]
            return cv2.resize(img, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
        if self.kind == "blur":
            return cv2.GaussianBlur(img, (0, 0), sigmaX=self.value, sigmaY=self.value,
                                    borderType=cv2.BORDER_REFLECT_101)
        raise ValueError(f"unknown degradation kind {self.kind!r}")


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode to JPEG at ``quality`` and decode again (libjpeg via OpenCV: same bytes every run)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding at quality {quality} failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def parse_degradation(name: str) -> Degradation:
    """``jpeg<q>`` | ``half`` | ``blur<sigma>`` -> a :class:`Degradation`; anything else is a ValueError."""
    m = _JPEG.match(name)
    if m and 1 <= int(m.group(1)) <= 100:
        return Degradation(name, "jpeg", float(int(m.group(1))))
    if name == "half":
        return Degradation(name, "half")
    m = _BLUR.match(name)
    if m and float(m.group(1)) > 0:
        return Degradation(name, "blur", float(m.group(1)))
    raise ConfigError(f"unknown degradation {name!r}; valid forms: {', '.join(DEGRADATION_FORMS)}, e.g. jpeg75, "
                     f"half, blur1 ({CLEAN!r} is always scored)")


def _degradations(names: list[str]) -> dict[str, Degradation | None]:
    """``{"clean": None, name: Degradation, ...}`` in the configured order; duplicates refused."""
    out: dict[str, Degradation | None] = {CLEAN: None}
    for n in names:
        if n in out:
            raise ConfigError(f"evaluate.degradations: {n!r} given twice (or is {CLEAN!r}, always scored)")
        out[n] = parse_degradation(n)
    return out


# ----------------------------------------------------------------------------- AUC bootstrap
def weighted_auc(pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of multiplicities: (B, P) fake weights, (B, N) real weights -> (B,).

    AUC = sum_ij w_i v_j [s_i > s_j] + 0.5 [s_i = s_j], over sum w * sum v. Negatives are sorted once;
    the weight of those below (and tied with) each positive is a cumulative sum read at its
    ``searchsorted`` positions, so one resample costs O(P + N) numpy work, not a sklearn call.
    """
    order = np.argsort(neg, kind="stable")
    neg_sorted = neg[order]
    cum = np.concatenate([np.zeros((w_neg.shape[0], 1)), np.cumsum(w_neg[:, order], axis=1)], axis=1)  # (B, N+1)
    below = cum[:, np.searchsorted(neg_sorted, pos, side="left")]  # (B, P) weight of reals scored lower
    below_or_tied = cum[:, np.searchsorted(neg_sorted, pos, side="right")]
    wins = (w_pos * 0.5 * (below + below_or_tied)).sum(axis=1)
    return wins / (w_pos.sum(axis=1) * w_neg.sum(axis=1))


def resample_counts(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """(b, n) multiplicities of ``b`` bootstrap draws of n out of n (with replacement)."""
    idx = rng.integers(0, n, size=(b, n)) + np.arange(b)[:, None] * n
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def bootstrap_auc(y_true: np.ndarray, y_score: np.ndarray, resamples: int, seed: int = 0,
                  max_cells: int = 4_000_000) -> np.ndarray:
    """AUC of ``resamples`` stratified bootstrap resamples (fakes and reals resampled separately).

    Stratified so that every resample keeps both classes at their sizes (a plain resample of a small
    set can lose one class and leave AUC undefined). Done in chunks of at most ``max_cells`` weights.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(y_score, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    # one stream per class: the draws, hence the interval, do not depend on the chunk size
    rng_pos, rng_neg = np.random.default_rng(seed).spawn(2)
    chunk = max(1, max_cells // max(1, len(s)))
    out = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        out.append(weighted_auc(pos, neg, resample_counts(rng_pos, b, len(pos)),
                                resample_counts(rng_neg, b, len(neg))))
    return np.concatenate(out) if out else np.zeros(0)


# ----------------------------------------------------------------------------- metrics of one scored set
def set_metrics(y_true: np.ndarray, y_score: np.ndarray, thresholds: dict, bootstrap: int = 1000,
                seed: int = 0) -> dict[str, float]:
    """Flat numbers for ``dvc metrics``: ranking metrics, AUC interval and decisions at the card's thresholds.

    ``y_score`` may hold NaN (files that failed to decode): they are counted in ``n_failed`` and left out.
    Ranking metrics need both classes (:class:`MetricError` otherwise).
    """
    y_all = np.asarray(y_true).astype(int)
    s_all = np.asarray(y_score, dtype=np.float64)
    ok = np.isfinite(s_all)
    y, s = y_all[ok], s_all[ok]
    out: dict[str, float] = {"n_real": int((y == 0).sum()), "n_fake": int((y == 1).sum()),
                             "n_failed": int((~ok).sum())}
    out.update({"auc": roc_auc(y, s), "ap": average_precision(y, s), "tpr_at_fpr_1e-2": tpr_at_fpr(y, s, 1e-2),
                "tpr_at_fpr_1e-3": tpr_at_fpr(y, s, 1e-3), "eer": eer(y, s)})
    if bootstrap > 0:
        lo, hi = np.percentile(bootstrap_auc(y, s, bootstrap, seed), [2.5, 97.5])
        out.update({"auc_ci_low": float(lo), "auc_ci_high": float(hi)})
    out.update(_decisions(y, s, thresholds))
    return out


def _decisions(y: np.ndarray, s: np.ndarray, thresholds: dict) -> dict[str, float]:
    """Confusion matrix and F1 at ``t_decision`` (score >= t = fake) and the share of each verdict."""
    t = float(thresholds["t_decision"])
    flagged = s >= t
    tp, fp = int((flagged & (y == 1)).sum()), int((flagged & (y == 0)).sum())
    fn, tn = int((~flagged & (y == 1)).sum()), int((~flagged & (y == 0)).sum())
    out: dict[str, float] = {"t_decision": t, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
                             "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
                             "accuracy": (tp + tn) / len(y)}
    verdicts = [verdict(float(v), thresholds) for v in s]
    out.update({key: verdicts.count(v) / len(y) for v, key in VERDICT_KEYS.items()})
    return out


# ----------------------------------------------------------------------------- the stage
def _score_set(ens: Ensemble, name: str, files: pd.DataFrame, degradations: dict[str, Degradation | None],
               batch_size: int, workers: int) -> pd.DataFrame:
    """Scores of every file of one set under each degradation: rows set, degradation, img_name, label, score."""
    parts = []
    for dname, fn in degradations.items():
        log.info("set %s: scoring %d images (%s)", name, len(files), dname)
        scores, errors = ens.score_files(list(files.path), batch_size, workers, degrade=fn)
        for path, err in errors[:5]:
            log.warning("set %s (%s): %s failed: %s", name, dname, path, err)
        if len(errors) > 5:
            log.warning("set %s (%s): ... %d files failed in all", name, dname, len(errors))
        parts.append(pd.DataFrame({"set": name, "degradation": dname, "img_name": files.img_name,
                                   "label": files.label, "score": scores}))
    return pd.concat(parts, ignore_index=True)


def _metrics_of(name: str, scored: pd.DataFrame, thresholds: dict, bootstrap: int, seed: int) -> dict[str, dict]:
    """Per degradation metrics of one set; a set left with one usable class is a clear error."""
    out = {}
    for dname, g in scored.groupby("degradation", sort=False):
        ok = g.score.notna()
        for label, cls in ((0, "real"), (1, "fake")):
            if not (ok & (g.label == label)).any():
                raise DataError(f"evaluate set {name!r} ({dname}): no usable {cls} image "
                                 f"({int((~ok & (g.label == label)).sum())} failed to decode); it needs both classes")
        try:
            out[str(dname)] = set_metrics(g.label.to_numpy(), g.score.to_numpy(), thresholds, bootstrap, seed)
        except MetricError as exc:
            raise DataError(f"evaluate set {name!r} ({dname}): {exc}") from None
    return out


def _mean_over_sets(per_set: dict[str, dict[str, dict]], degradations: list[str]) -> dict[str, dict]:
    """Unweighted mean over sets (each set counts once, whatever its size) of :data:`MEAN_KEYS`."""
    return {d: {k: float(np.mean([m[d][k] for m in per_set.values()])) for k in MEAN_KEYS} for d in degradations}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown_table(metrics: dict[str, dict], degradations: list[str]) -> str:
    """One row per set (then the mean row): clean metrics, then AUC under each degradation."""
    others = [d for d in degradations if d != CLEAN]
    head = ["set", "real/fake", "AUC [95% CI]", "AP", "TPR@1e-2", "TPR@1e-3", "EER", "F1"]
    head += [f"AUC {d}" for d in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in metrics.items():
        c = m[CLEAN]
        auc = _fmt(c["auc"])
        if "auc_ci_low" in c:
            auc += f" [{_fmt(c['auc_ci_low'])}, {_fmt(c['auc_ci_high'])}]"
        size = f"{c['n_real']}/{c['n_fake']}" if "n_real" in c else ""
        row = [name, size, auc] + [_fmt(c[k]) for k in ("ap", "tpr_at_fpr_1e-2", "tpr_at_fpr_1e-3", "eer", "f1")]
        lines.append("| " + " | ".join(row + [_fmt(m[d]["auc"]) for d in others]) + " |")
    return "\n".join(lines) + "\n"


DEFAULT_SET = "test"  # the name of the data root's own test set (evaluate.sets: [])


def eval_sets(cfg: EvaluateConfig, layout: Layout) -> list[EvalSetConfig]:
    """``cfg.sets``, or when empty the data root's test set with its labels - none while the labels are not
    there (a challenge releases them later): then there is nothing held out to score, said in a warning."""
    if cfg.sets:
        return list(cfg.sets)
    test = EvalSetConfig(DEFAULT_SET, layout.test_dir, layout.test_labels)
    images, labels = set_paths(test, layout.data_root)
    if labels is not None and labels.is_file() and images.is_dir():
        return [test]
    log.warning("evaluate: no labelled set: evaluate.sets is empty and the test set has no labels at %s; "
                "stage 6 writes empty reports (give evaluate.sets, or paths.test_labels)", labels or "(none)")
    return []


def run(cfg: EvaluateConfig, layout: Layout) -> dict:
    """Score every set of :func:`eval_sets` (inside ``layout.data_root``) clean and degraded with the ensemble of
    ``layout.card``; write metrics, ROC points, scores and table.

    Returns the metrics dict written to ``layout.eval_metrics``: ``{set: {degradation: {...}}, "mean": {...}}``
    (``{}`` when there is no labelled set).
    """
    sets = eval_sets(cfg, layout)
    _check_set_names(sets)
    degradations = _degradations(cfg.degradations)
    files = {s.name: list_set(s, layout.data_root) for s in sets}  # every listing error before any scoring
    metrics: dict[str, Any] = {}
    scored: dict[str, pd.DataFrame] = {}
    if files:
        from .ensemble_predict import Ensemble  # torch and the models only once the config and the sets are checked

        ens = Ensemble.from_card(layout.card, layout.models)
        scored = {name: _score_set(ens, name, f, degradations, cfg.batch_size, cfg.workers)
                  for name, f in files.items()}
        per_set = {name: _metrics_of(name, s, ens.thresholds, cfg.bootstrap, cfg.seed) for name, s in scored.items()}
        metrics = {**per_set, "mean": _mean_over_sets(per_set, list(degradations))}
    roc, scores, table = _outputs(metrics, scored, list(degradations))
    Path(layout.eval_roc).mkdir(parents=True, exist_ok=True)
    for name, points in roc.items():
        write_csv(Path(layout.eval_roc) / f"roc_{name}.csv", points)
    write_csv(layout.eval_scores, scores)
    write_json(layout.eval_metrics, metrics)
    with atomic_open(layout.eval_table, "w", encoding="utf-8") as fh:
        fh.write(table)
    for name in scored:
        c = metrics[name][CLEAN]
        log.info("set %s: AUC %.4f, TPR@FPR=1e-2 %.3f, F1 %.3f (%d real, %d fake, %d failed)", name, c["auc"],
                 c["tpr_at_fpr_1e-2"], c["f1"], c["n_real"], c["n_fake"], c["n_failed"])
    return metrics


def _outputs(metrics: dict, scored: dict[str, pd.DataFrame], degradations: list[str]
             ) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, str]:
    """Stage 6's declared outputs but the metrics: ROC points per set (clean), every score, the table."""
    roc = {}
    for name, s in scored.items():
        clean = s[(s.degradation == CLEAN) & s.score.notna()]
        roc[name] = pd.DataFrame(roc_points(clean.label, clean.score))
    scores = (pd.concat(scored.values(), ignore_index=True) if scored
              else pd.DataFrame(columns=["set", "degradation", "img_name", "label", "score"]))
    return roc, scores, markdown_table(metrics, degradations) if metrics else "no labelled set was scored\n"
