"""Stage 5's ROC picture (``roc_png``): the val curves (selection-biased) and, when the test labels exist, the test
curves (held out), on a linear and a log-FPR panel, with the chance diagonal. Each ensemble curve's legend entry
gives its TPR at FPR 1e-2 and 1e-3 and the number of real images behind them: with n reals the lowest FPR
above 0 is 1/n, so with fewer than 1,000 reals TPR@1e-3 is read at FPR = 0 (see :mod:`dfpipe.metrics`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import write_png
from ..metrics import roc_auc, roc_points, tpr_at_fpr

STYLE = {"val": "-", "test": "--"}  # line style per set; colour per scorer
ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class RocSet:
    """One labelled, scored set: ``name`` ("val" / "test"), what it may be read as (``note``), the labels and
    each scorer's scores (``ensemble`` and the experts)."""

    name: str
    note: str
    labels: np.ndarray
    scores: Mapping[str, np.ndarray]

    @property
    def n_neg(self) -> int:
        return int((np.asarray(self.labels) == 0).sum())


def curve_label(s: RocSet, scorer: str) -> str:
    """Legend text: AUC for every curve; the ensemble's also has TPR@FPR 1e-2 / 1e-3 and the reals behind them."""
    y, p = s.labels, s.scores[scorer]
    text = f"{scorer}, {s.name}: AUC {roc_auc(y, p):.3f}"
    if scorer == ENSEMBLE:
        text += (f"\n  TPR@1e-2 {tpr_at_fpr(y, p, 1e-2):.2f}, @1e-3 {tpr_at_fpr(y, p, 1e-3):.2f}"
                 f" over {s.n_neg} reals (lowest FPR > 0: 1/{s.n_neg})")
    return text


def roc_figure(sets: Sequence[RocSet]):
    """The ROC figure (a matplotlib Figure, not saved): a curve per set and scorer, the ensemble's bold, the
    chance diagonal on both panels, FPR 1e-2 / 1e-3 marked on the log panel."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.4), dpi=100, layout="constrained")
    lin, log = fig.subplots(1, 2)
    scorers = list(dict.fromkeys(k for s in sets for k in s.scores))
    colour = {k: f"C{i % 10}" for i, k in enumerate(scorers)}
    for s in sets:
        for scorer, p in s.scores.items():
            r = roc_points(s.labels, p)
            kw = dict(color=colour[scorer], ls=STYLE.get(s.name, ":"), lw=2.2 if scorer == ENSEMBLE else 1,
                      alpha=1.0 if scorer == ENSEMBLE else 0.7)
            lin.plot(r["fpr"], r["tpr"], label=curve_label(s, scorer), **kw)
            log.plot(r["fpr"], r["tpr"], **kw)
    floor = min([1e-3, *(1.0 / max(1, s.n_neg) for s in sets)]) / 2
    grid = np.geomspace(floor, 1, 200)
    curves = lin.get_legend_handles_labels()
    diagonal = lin.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance (AUC 0.5)")
    log.plot(grid, grid, color="grey", ls=":", lw=1)
    for x in (1e-2, 1e-3):
        log.axvline(x, color="black", lw=0.6, alpha=0.4)
    log.set_xscale("log")
    log.set_xlim(floor, 1)
    notes = "; ".join(f"{s.name} ({STYLE.get(s.name, ':')}): {s.note}" for s in sets)
    for ax, title in ((lin, "ROC"), (log, "log FPR (grey lines: FPR 1e-2, 1e-3)")):
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    lin.legend(handles=diagonal, loc="lower right", fontsize=8)
    fig.legend(*curves, loc="outside lower center", ncol=len(sets), fontsize=8)  # a column per set
    fig.suptitle(notes, fontsize=9)
    return fig


def plot_roc(path: str | Path, sets: Sequence[RocSet]) -> None:
    """:func:`roc_figure` written to ``path`` (:func:`dfpipe.io.write_png`: atomic, the same scores give the same
    bytes)."""
    write_png(path, roc_figure(sets))
