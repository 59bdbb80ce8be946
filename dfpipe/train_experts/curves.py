"""An expert's training curves as a PNG (``<live_dir>/plots/metrics/curves.png``): the loss and its terms, and the
val AUC and TPR@FPR 1e-2, per epoch, the best epoch marked. ``dvc plots show`` draws the .tsv files beside it with
Vega-Lite, which a browser fetches from a CDN; this picture shows offline. It sits inside the folder dvc.yaml
declares (``plots/metrics``), so it is a stage output without a catalog entry of its own.

Timings (``images_per_s``) stay out: the picture is then the same bytes for the same run, resumed or not."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..io import write_png

CURVES_PNG = Path("plots") / "metrics" / "curves.png"  # in the live dir: inside DVCLive's folder, a declared output
LOSS_KEYS = ("loss", "ce", "kl", "nce", "lil", "gil")  # the total first, then the terms that were on
VAL_KEYS = ("val_auc", "val_tpr_at_fpr_1e-2")


def _series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of ``key`` over the rows that have a finite value of it."""
    pts = [(int(r["epoch"]), float(r[key])) for r in history if key in r and r[key] is not None]
    pts = [(e, v) for e, v in pts if math.isfinite(v)]
    return [e for e, _ in pts], [v for _, v in pts]


def curves_figure(history: Sequence[dict], best_epoch: int | None, name: str):
    """The figure (a matplotlib Figure, not saved): loss terms (left; a term that stayed 0 is left out) and the val
    metrics (right) per epoch; the best epoch (that of ``best.pt``) a dotted vertical line on both."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)
    for ax, keys in ((ax_loss, LOSS_KEYS), (ax_val, VAL_KEYS)):
        for key in keys:
            epochs, values = _series(history, key)
            if epochs and (key == "loss" or key in VAL_KEYS or any(v != 0 for v in values)):
                ax.plot(epochs, values, marker="o", ms=3, lw=2 if key in ("loss", "val_auc") else 1, label=key)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="black", ls=":", lw=1, label=f"best epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_loss.set(title="training loss (mean over the epoch)", ylabel="loss")
    ax_val.set(title="val fold (selection-biased)", ylabel="metric", ylim=(-0.02, 1.02))
    fig.suptitle(f"expert {name}: training curves", fontsize=11)
    return fig


def write_curves(path: str | Path, history: Sequence[dict], best_epoch: int | None, name: str) -> None:
    """:func:`curves_figure` to ``path``, atomically, with no date or version in the PNG."""
    fig = curves_figure(history, best_epoch, name)
    write_png(path, fig, dpi=80)
