"""The grid's results: flat metrics per cell, grid.json and the markdown tables."""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dfpipe.io import atomic_open, write_json

from .grid import GridSpec, held_out_source, is_combined, set_parts, training_sets
from .paired import paired_auc_diff, paired_seed_deltas  # noqa: F401 (paired_auc_diff: re-exported)

log = logging.getLogger(__name__)


def cell_metrics(result: dict, robustness: dict | None = None) -> dict[str, Any]:
    """One cell as flat numbers for ``dvc metrics`` / ``dvc exp show``: AUC and TPR at FPR 1e-2 per eval set, the
    in-source AUC (a combined set's: the mean over its sources' held-out parts), the mean cross-source AUC (over
    the sources not trained on) and, with a robustness record, the mean cross-source AUC per degradation."""
    ev, trained = result["eval"], set_parts(result["train_source"])
    sets = [s for s in ev if s != "mean"]
    held = [s for s in sets if s in trained]
    cross = [s for s in sets if s not in trained]
    out: dict[str, Any] = {"in_source_auc": float(np.mean([ev[s]["clean"]["auc"] for s in held])) if held else None,
                           "mean_cross_auc": float(np.mean([ev[s]["clean"]["auc"] for s in cross])) if cross else None,
                           "auc": {s: float(ev[s]["clean"]["auc"]) for s in sets},
                           "tpr_at_fpr_1e-2": {s: float(ev[s]["clean"]["tpr_at_fpr_1e-2"]) for s in sets},
                           "train_seconds": float(result.get("train_seconds", 0.0))}
    if robustness:
        degs = ["clean", *robustness["degradations"]]
        out["robustness_cross_auc"] = {d: float(np.mean([robustness["auc"][s][d] for s in robustness["sets"]]))
                                       for d in degs}
    return out


def write_grid(cells: list[dict], spec: GridSpec, out: Path, seconds: float, missing: list[str] | None = None,
               reference: list[dict] | None = None) -> dict:
    """``grid.json`` (every cell; ``reference``: the single-source cells read for the combined sets' "alone"
    numbers, when any) and ``table.md``, rewritten after each cell so partial results show."""
    grid = {"spec": dataclasses.asdict(spec), "cells": cells, "seconds": seconds}
    if missing:
        grid["missing"] = list(missing)
    if reference:
        grid["reference"] = list(reference)
    write_json(out / "grid.json", grid)
    table = grid_table(cells, spec, reference)
    if missing:
        table = f"Not finished, left out: {', '.join(missing)}.\n\n" + table
    with atomic_open(out / "table.md", "w", encoding="utf-8") as fh:
        fh.write(table)
    return grid


def _auc(cell: dict, eval_set: str, degradation: str = "clean") -> float:
    return float(cell["eval"][eval_set][degradation]["auc"])


def _tpr(cell: dict, eval_set: str) -> float:
    return float(cell["eval"][eval_set]["clean"]["tpr_at_fpr_1e-2"])


def _md_row(cells: list[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _md_head(head: list[str]) -> list[str]:
    """A markdown table's header row and its separator."""
    return [_md_row(head), "|" + "---|" * len(head)]


def _cells_frame(cells: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"train": c["train_source"], "recipe": c["recipe"], "seed": c["seed"], "cell": c}
                         for c in cells], columns=["train", "recipe", "seed", "cell"])


def _combined_mask(df: pd.DataFrame) -> pd.Series:
    """Which rows of a cells frame are combined-set cells (bool even when empty)."""
    return df.train.map(is_combined).astype(bool)


def grid_table(cells: list[dict], spec: GridSpec, reference: list[dict] | None = None) -> str:
    """Markdown: the single-source summary, the combined-sets summary (when the grid has combined cells; their
    "alone" numbers from these cells and ``reference``), then one block per training set; rows = recipes;
    columns = eval sets (in-source first)."""
    df = _cells_frame(cells)
    single = df[~_combined_mask(df)]
    others = "".join(f", {n} {e}" for n, e in sorted(spec.recipe_epochs.items()))
    lines = [f"Budget: {spec.epochs} epochs per expert{others}, seeds {spec.seeds}. Cells: ROC AUC seed "
             + " / seed ".join(str(s) for s in spec.seeds) + " (mean), TPR at FPR 1e-2 of the mean run below it. "
             "Every column is a set that no training or selection step saw; the in-source column is the training "
             "source's held-out part. delta = mean AUC minus the baseline's, paired bootstrap 95% interval of seed "
             f"{spec.seeds[0]}'s difference."
             + (" A combined training set (a + b) has an in-source column per source: its held-out part."
                if _combined_mask(df).any() else ""), ""]
    lines += [_provenance(cells), ""]
    if spec.ensembles:
        members = "; ".join(f"{n} = {' + '.join(m)}"
                            + "".join(f", {k} {v}" for k, v in spec.ensemble_predict_of.get(n, {}).items())
                            for n, m in spec.ensembles.items())
        lines += [f"Ensemble rows (no training): {members}"
                  + ", each the members' cells of the same training set and seed combined by stage 5 "
                  f"({spec.ensemble_predict.get('combine', 'mean_prob')}) and scored by stage 6 on the same sets.", ""]
    if not single.empty:
        lines += _summary(single, spec)
    if spec.leave_one_out:  # every training set holds out one source: one column per held-out source
        lines += loso_summary(df, spec)
    else:
        lines += _combined_summary(df, _cells_frame(reference or []), spec)
    for train in training_sets(spec):
        sub = df[df.train == train]
        if sub.empty:
            continue
        trained = set_parts(train)
        cross = [s for s in spec.sources if s not in trained]
        parts = [s for s in trained if all(s in c["eval"] for c in sub.cell)]  # none when in_source_eval is off
        sets = parts + cross
        head = ["recipe"] + [f"{s} (in-source)" if s in parts else s for s in sets] + ["mean cross", "delta mean cross"]
        lines += [f"### trained on {' + '.join(trained)}", "", *_md_head(head)]
        base = _mean_cross(sub[sub.recipe == spec.baseline], cross)
        for recipe in dict.fromkeys(sub.recipe):
            runs = sub[sub.recipe == recipe].sort_values("seed")
            row = [recipe]
            for s in sets:
                aucs = [_auc(c, s) for c in runs.cell]
                tprs = [_tpr(c, s) for c in runs.cell]
                row.append(" / ".join(f"{a:.3f}" for a in aucs) + f" ({np.mean(aucs):.3f}); "
                           f"TPR@1e-2 {np.mean(tprs):.3f}")
            mc = _mean_cross(runs, cross)
            row.append(f"{mc:.3f}")
            row.append("-" if recipe == spec.baseline else f"{mc - base:+.3f}")
            lines.append(_md_row(row))
        lines.append("")
        lines += _deltas(sub, sets, spec)
    lines += _robustness_table(cells, spec)
    return "\n".join(lines) + "\n"


def _provenance(cells: list[dict]) -> str:
    """Which code trained the table's cells (:func:`code_version`; ensembles are scoring only, not counted)."""
    trained = [c for c in cells if "members" not in c]
    counts = collections.Counter(c.get("code", "not recorded") for c in trained)  # first-seen order
    parts = ", ".join(f"{code} ({n})" for code, n in counts.items())
    return (f"Code that trained the {len(trained)} cells: {parts}. Cells trained by different code are not "
            "comparable to the last bit: the same cell rerun by other code moved single cross-source AUCs by up to "
            "0.2; read the means and compare rows trained by the same code.")


def _robustness_table(cells: list[dict], spec: GridSpec) -> list[str]:
    """Per recipe: the cross-source AUC clean and under each degradation (each cell's mean over its cross-source
    sets, then the mean over the recipe's cells: seeds and training sources), and the drop from clean."""
    degs = list(spec.robustness.degradations)
    done = [c for c in cells if c.get("robustness")]
    if not degs or not done:
        return []
    single = [c for c in done if not is_combined(c["train_source"])]
    combined = [c for c in done if is_combined(c["train_source"])]
    head = ["recipe", "cells", "clean", *[f"{d} (drop)" for d in degs]]
    out = ["### robustness (cross-source ROC AUC under degradations)", "",
           "Each finished cell's ensemble scored again on its cross-source sets, each degradation applied to the "
           "full-size decoded image before the checkpoint's preprocessing (stage 6). Mean over each cell's "
           "cross-source sets, then over the recipe's cells (seeds and training sources); drop = degraded minus "
           "clean. No retraining: the cells of the table above.", "",
           *_md_head(head)]
    for group, suffix in ((single, ""), (combined, " (combined sets)")):
        for recipe in dict.fromkeys(c["recipe"] for c in group):
            out.append(_robustness_row(f"{recipe}{suffix}", [c["robustness"] for c in group if c["recipe"] == recipe],
                                       degs))
    return out + [""]


def _robustness_row(label: str, runs: list[dict], degs: list[str]) -> str:
    """One row of the robustness block: ``runs`` (robustness records) averaged per cell, then over the cells."""
    mean = {d: float(np.mean([np.mean([r["auc"][s][d] for s in r["sets"]]) for r in runs])) for d in ["clean", *degs]}
    row = [label, str(len(runs)), f"{mean['clean']:.3f}",
           *[f"{mean[d]:.3f} ({mean[d] - mean['clean']:+.3f})" for d in degs]]
    return _md_row(row)


def _summary(df: pd.DataFrame, spec: GridSpec) -> list[str]:
    """One row per recipe: per training source the in-source AUC and the mean AUC on the other sources
    (each the mean of the seeds), then the mean of all leave-one-source-out columns and its difference
    to the baseline's."""
    trains = [t for t in spec.sources if (df.train == t).any()]
    head = ["recipe", *[f"{t}: in-source / cross" for t in trains], "mean cross", "delta vs baseline"]
    out = ["### summary (ROC AUC, mean of seeds)", "", *_md_head(head)]
    base = None
    for recipe in dict.fromkeys(df.recipe):
        cells, crosses = [recipe], []
        for t in trains:
            runs = df[(df.train == t) & (df.recipe == recipe)]
            if runs.empty:
                cells.append("-")
                continue
            cross = _mean_cross(runs, [s for s in spec.sources if s != t])
            crosses.append(cross)
            cells.append(f"{np.mean([_auc(c, t) for c in runs.cell]):.3f} / {cross:.3f}")
        mean = float(np.mean(crosses)) if len(crosses) == len(trains) else float("nan")
        if recipe == spec.baseline:
            base = mean
        delta = "-" if recipe == spec.baseline or base is None else f"{mean - base:+.3f}"
        out.append(_md_row([*cells, f"{mean:.3f}", delta]))
    return out + [""]


def _combined_summary(df: pd.DataFrame, ref: pd.DataFrame, spec: GridSpec) -> list[str]:
    """One row per recipe: per combined training set its cross-source AUC (mean over seeds and the sources it does
    not hold) "together", and "alone": the same recipe's single-source cells of its sources on the same sets (from
    this grid's cells and ``ref``, whichever are finished); then the means over the combined sets, the delta to the
    baseline's and together minus alone. Empty when the grid has no combined cell."""
    combined = [t for t in training_sets(spec) if is_combined(t) and (df.train == t).any()]
    if not combined:
        return []
    alone = pd.concat([df[~_combined_mask(df)], ref], ignore_index=True)
    cross = {t: [s for s in spec.sources if s not in set_parts(t)] for t in combined}
    head = ["recipe", *[f"{' + '.join(set_parts(t))} -> {', '.join(cross[t])}: together / alone" for t in combined],
            "mean together", "delta vs baseline", "mean alone", "together minus alone"]
    out = ["### summary of combined training sets (cross-source ROC AUC, mean of seeds)", "",
           "Each column: a training set of several sources (stage 1 on their training parts at once), scored on the "
           "sources it does not hold (their cross parts). together = that cell's AUC; alone = the same recipe trained "
           "on each of those sources by itself (the single-source cells finished in the work folder, same seeds), "
           "on the same sets; - = none finished. Means over the combined sets (only when every one has a value).", "",
           *_md_head(head)]
    recipes = dict.fromkeys(df[df.train.isin(combined)].recipe)
    rows = {r: _together_alone(df, alone, r, combined, cross) for r in recipes}
    base = rows.get(spec.baseline, ([], []))[0]
    base_mean = _complete_mean(base, len(combined))
    for recipe, (together, alone_aucs) in rows.items():
        mean_t, mean_a = _complete_mean(together, len(combined)), _complete_mean(alone_aucs, len(combined))
        delta = "-" if recipe == spec.baseline else _fmt(mean_t - base_mean, "+.3f")
        out.append(_md_row([recipe, *[f"{_fmt(t)} / {_fmt(a)}" for t, a in zip(together, alone_aucs)],
                            _fmt(mean_t), delta, _fmt(mean_a), _fmt(mean_t - mean_a, "+.3f")]))
    return out + [""]


LOSO_BOOT = 1000  # paired bootstrap resamples of the leave-one-source-out summary's intervals


def loso_summary(df: pd.DataFrame, spec: GridSpec, n_boot: int = LOSO_BOOT) -> list[str]:
    """One row per recipe, one column per held-out source (the cell trained on every other source, scored on the
    whole of that one): ROC AUC and TPR at FPR 1e-2, each the mean of the seeds; then their means over the columns,
    the recipe's AUC minus the baseline's with a paired bootstrap 95% interval over images (the same resampled
    images for both rows and every seed; :func:`paired_seed_deltas`), and on how many columns its AUC is above the
    baseline's. A column the recipe has not finished is "-" (and no mean)."""
    by_source = {held_out_source(spec, t): t for t in training_sets(spec)}
    cols = [s for s in spec.sources if s in by_source and (df.train == by_source[s]).any()]
    if not cols:
        return []
    head = ["recipe", *[f"{s} held out" for s in cols], "mean", "delta mean AUC vs baseline", "AUC above baseline"]
    out = ["### leave-one-source-out summary (ROC AUC; TPR at FPR 1e-2; mean of seeds)", "",
           "Each column: the cells trained on every other source (their training parts together), scored on the whole "
           "held-out source. Cell: AUC (TPR@1e-2), then for a recipe its AUC minus the baseline's on the same images "
           "with a paired bootstrap 95% interval (images resampled, the same for both rows and each common seed; the "
           "difference averaged over those seeds). mean: over the columns; its interval from the same resamples.", "",
           *_md_head(head)]
    base_auc = {s: held_out_means(df.cell, spec.baseline, s)["auc"] for s in cols}
    for recipe in dict.fromkeys(df[df.train.isin([by_source[s] for s in cols])].recipe):
        means = [held_out_means(df.cell, recipe, s) for s in cols]
        aucs, tprs = [m["auc"] for m in means], [m[TPR] for m in means]
        row, boots, deltas = [recipe], [], []
        for i, s in enumerate(cols):
            text = f"{_fmt(aucs[i])} ({_fmt(tprs[i])})"
            if recipe != spec.baseline:
                pairs = _seed_pairs(df, recipe, spec.baseline, by_source[s])
                if pairs:
                    d, b = paired_seed_deltas(pairs, s, n_boot, seed=i)
                    deltas.append(d)
                    boots.append(b)
                    text += f" {_interval(d, b)}"
            row.append(text)
        row.append(f"{_fmt(_complete_mean(aucs, len(cols)))} ({_fmt(_complete_mean(tprs, len(cols)))})")
        if recipe == spec.baseline:
            row += ["-", "-"]
        else:
            whole = len(deltas) == len(cols)
            row.append(_interval(float(np.mean(deltas)), np.mean(boots, axis=0)) if whole else "-")
            above = sum(a > base_auc[s] for a, s in zip(aucs, cols) if not np.isnan(a) and not np.isnan(base_auc[s]))
            row.append(f"{above}/{len(cols)}")
        out.append(_md_row(row))
    return out + [""]


TPR = "tpr_at_fpr_1e-2"


def held_out_means(cells: Iterable[dict], recipe: str, held: str) -> dict[str, float | int]:
    """A leave-one-source-out column of one recipe: the mean over its cells (seeds) that did not train on ``held``
    and scored it, of their clean ``auc`` and ``tpr_at_fpr_1e-2`` (nan when there is none), and ``seeds``: how many.
    The table's summary and the shipped detector's model card (bench/build_detector.py) read the same numbers."""
    runs = [c["eval"][held]["clean"] for c in cells
            if c["recipe"] == recipe and held not in set_parts(c["train_source"]) and held in c["eval"]]
    means = {m: float(np.mean([r[m] for r in runs])) if runs else float("nan") for m in ("auc", TPR)}
    return {**means, "seeds": len(runs)}


def _seed_pairs(df: pd.DataFrame, recipe: str, baseline: str, train: str) -> list[tuple[str, str]]:
    """(recipe's scores CSV, baseline's) of every seed both finished on ``train``, in seed order."""
    mine = df[(df.train == train) & (df.recipe == recipe)].set_index("seed").cell
    base = df[(df.train == train) & (df.recipe == baseline)].set_index("seed").cell
    return [(mine[k]["scores_csv"], base[k]["scores_csv"]) for k in sorted(set(mine.index) & set(base.index))]


def _interval(d: float, boots: np.ndarray) -> str:
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _together_alone(df: pd.DataFrame, alone: pd.DataFrame, recipe: str, combined: list[str],
                    cross: dict[str, list[str]]) -> tuple[list[float], list[float]]:
    """Per combined set: the recipe's mean cross AUC trained on it, and on each of its sources alone (nan: none)."""
    together, alone_aucs = [], []
    for t in combined:
        together.append(_mean_cross(df[(df.train == t) & (df.recipe == recipe)], cross[t]))
        alone_aucs.append(_mean_cross(alone[alone.train.isin(set_parts(t)) & (alone.recipe == recipe)], cross[t]))
    return together, alone_aucs


def _complete_mean(values: list[float], n: int) -> float:
    """The mean of ``values`` when there are ``n`` of them and none is nan, else nan."""
    return float(np.mean(values)) if len(values) == n and not np.isnan(values).any() else float("nan")


def _fmt(x: float, fmt: str = ".3f") -> str:
    return "-" if np.isnan(x) else format(x, fmt)


def _mean_cross(runs: pd.DataFrame, cross_sets: list[str]) -> float:
    if runs.empty or not cross_sets:
        return float("nan")
    return float(np.mean([[_auc(c, s) for s in cross_sets] for c in runs.cell]))


def _deltas(sub: pd.DataFrame, sets: list[str], spec: GridSpec) -> list[str]:
    """Per recipe and set: paired AUC difference to the baseline (first seed), with its interval."""
    seed = spec.seeds[0]
    base = sub[(sub.recipe == spec.baseline) & (sub.seed == seed)]
    if base.empty:
        return []
    base_csv = base.cell.iloc[0]["scores_csv"]
    out = []
    for recipe in dict.fromkeys(sub.recipe):
        if recipe == spec.baseline:
            continue
        run = sub[(sub.recipe == recipe) & (sub.seed == seed)]
        if run.empty:
            continue
        parts = []
        for s in sets:
            d, lo, hi = paired_auc_diff(run.cell.iloc[0]["scores_csv"], base_csv, s)
            parts.append(f"{s} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        out.append(f"- {recipe} minus {spec.baseline} (seed {seed}): " + "; ".join(parts))
    return out + [""] if out else out
