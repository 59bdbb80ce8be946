"""Stage 3's two pictures, each readable without the README: the PCA of the embeddings (``cluster_plot``) and the
contact sheet of example images per cluster (``cluster_examples``). Both mark the val fold and carry a legend."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.store import StoreReader
from ..io import atomic_path, write_png

log = logging.getLogger(__name__)
PLOT_MAX_POINTS = 20_000  # the PCA picture uses a seeded sample of this many originals at most

SHEET_THUMB = 64     # thumbnail side, px
SHEET_BORDER = 3     # label border: red = fake, blue = real
SHEET_GAP = 4
SHEET_LABEL_W = 64   # left column: the cluster id and its fold
SHEET_HEADER_H = 44  # the legend above the rows: two lines
SHEET_MIN_W = 360    # the legend's lines fit even with few thumbnails per row
# BGR, as cv2 draws
FAKE_BGR, REAL_BGR = (0, 0, 255), (255, 0, 0)
VAL_BGR = (90, 220, 255)  # the val fold's label cells: light amber, under black text


def cluster_folds(orig: pd.DataFrame) -> pd.Series:
    """cluster -> its fold (stage 3 keeps a cluster in one fold: :func:`.cluster.check_split`)."""
    return orig.groupby("cluster").fold.first()


def embedding_figure(xy: np.ndarray, orig: pd.DataFrame, val_fold: int):
    """The PCA figure (a matplotlib Figure, not saved): by cluster (left, a legend entry per cluster with its fold)
    and by label (right); the val fold's points ringed black on both."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(11, 4.8))
    ax_c, ax_l = fig.subplots(1, 2)
    val = orig.fold.to_numpy() == val_fold
    cmap = matplotlib.colormaps["tab20"]
    folds = cluster_folds(orig)
    for i, (c, f) in enumerate(folds.items()):
        m = orig.cluster.to_numpy() == c
        ax_c.scatter(xy[m, 0], xy[m, 1], color=cmap(i % 20), s=10,
                     label=f"{c}: fold {f}" + (" = val" if f == val_fold else ""))
    for lab, colour, name in ((0, "tab:blue", "real"), (1, "tab:red", "fake")):
        m = orig.label.to_numpy() == lab
        ax_l.scatter(xy[m, 0], xy[m, 1], color=colour, s=10, label=f"{name} ({int(m.sum())})", alpha=0.7)
    ring = f"val fold {val_fold} ({int(val.sum())} originals)"
    for ax in (ax_c, ax_l):
        ax.scatter(xy[val, 0], xy[val, 1], s=30, facecolors="none", edgecolors="black", linewidths=0.7)
        ax.set(xlabel="PC 1", ylabel="PC 2")
    ax_c.set_title(f"clusters (colour); ringed: {ring}", fontsize=10)
    ax_c.legend(title="cluster: fold", fontsize=7, title_fontsize=8, ncol=1 + len(folds) // 13,
                loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ring_handle = Line2D([], [], ls="", marker="o", mfc="none", mec="black", label=f"ringed: {ring}")
    ax_l.legend(handles=[*ax_l.get_legend_handles_labels()[0], ring_handle], fontsize=8, loc="best")
    ax_l.set_title("labels", fontsize=10)
    fig.suptitle("PCA of the originals' embeddings (stage 3)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_embedding(feats: np.ndarray, orig: pd.DataFrame, path: Path, seed: int = 0, val_fold: int = 0) -> None:
    """2-D PCA of the embeddings (:func:`embedding_figure`), written atomically to ``path``.

    ``orig`` rows (cluster, label, fold) match ``feats`` rows; above ``PLOT_MAX_POINTS`` a seeded sample is drawn.
    """
    from sklearn.decomposition import PCA

    if len(orig) > PLOT_MAX_POINTS:
        pick = np.sort(np.random.default_rng(seed).choice(len(orig), PLOT_MAX_POINTS, replace=False))
        feats, orig = feats[pick], orig.iloc[pick]
    xy = PCA(n_components=2, random_state=0).fit_transform(np.asarray(feats, dtype=np.float32))
    fig = embedding_figure(xy, orig, val_fold)
    write_png(path, fig, dpi=90)


def contact_sheet_shape(n_clusters: int, per_cluster: int) -> tuple[int, int]:
    """(height, width) in px of :func:`cluster_contact_sheet`'s image."""
    cell = SHEET_THUMB + SHEET_GAP
    return (SHEET_HEADER_H + n_clusters * cell + SHEET_GAP,
            max(SHEET_MIN_W, SHEET_LABEL_W + per_cluster * cell + SHEET_GAP))


def _legend(sheet: np.ndarray, val_fold: int | None) -> None:
    """The header: what the border colours and the highlighted rows mean."""
    import cv2

    def text(s: str, x: int, y: int) -> None:
        cv2.putText(sheet, s, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)

    text("border:", 6, 16)
    for x, colour, name in ((66, FAKE_BGR, "fake"), (136, REAL_BGR, "real")):
        cv2.rectangle(sheet, (x, 5), (x + 13, 18), colour, SHEET_BORDER)
        text(name, x + 19, 16)
    if val_fold is not None:
        cv2.rectangle(sheet, (6, 24), (60, 39), VAL_BGR, -1)
        text(f"val fold {val_fold}: selects epochs, thresholds", 66, 36)


def cluster_contact_sheet(pool: pd.DataFrame, df: pd.DataFrame, path: str | Path, per_cluster: int,
                          seed: int, val_fold: int | None = None) -> Path:
    """PNG with one row per cluster (sorted by id): up to ``per_cluster`` original images of it, drawn
    from the image store (seeded choice), each framed red (fake) or blue (real), under a legend. Each row's label
    gives the cluster id and its fold; the ``val_fold`` rows' labels are highlighted. Written atomically."""
    import cv2

    orig = df[df.origin != "aug"].drop(columns=["cache_path", "cache_index"], errors="ignore")
    orig = orig.merge(pool[["uid", "cache_path", "cache_index"]], on="uid", how="left")
    folds = cluster_folds(orig) if "fold" in orig else None
    clusters = sorted(orig.cluster.unique())
    h, w = contact_sheet_shape(len(clusters), per_cluster)
    sheet = np.full((h, w, 3), 255, np.uint8)  # BGR
    _legend(sheet, val_fold if folds is not None else None)
    rng = np.random.default_rng(seed)
    reader = StoreReader()
    cell, t, b = SHEET_THUMB + SHEET_GAP, SHEET_THUMB, SHEET_BORDER
    for r, c in enumerate(clusters):
        g = orig[orig.cluster == c]
        pick = np.sort(rng.choice(len(g), size=min(per_cluster, len(g)), replace=False))
        y = SHEET_HEADER_H + SHEET_GAP + r * cell
        fold = None if folds is None else int(folds[c])
        if fold is not None and fold == val_fold:
            sheet[y:y + t, 2:SHEET_LABEL_W - 2] = VAL_BGR
        cv2.putText(sheet, str(c), (6, y + t // 2 - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        if fold is not None:
            cv2.putText(sheet, f"fold {fold}", (6, y + t // 2 + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                        cv2.LINE_AA)
        for j, i in enumerate(pick):
            row = g.iloc[i]
            img = cv2.cvtColor(reader.image(row.cache_path, int(row.cache_index)), cv2.COLOR_RGB2BGR)
            thumb = cv2.resize(img, (t - 2 * b, t - 2 * b), interpolation=cv2.INTER_AREA)
            x = SHEET_LABEL_W + SHEET_GAP + j * cell
            sheet[y:y + t, x:x + t] = FAKE_BGR if int(row.label) == 1 else REAL_BGR
            sheet[y + b:y + t - b, x + b:x + t - b] = thumb
    ok, buf = cv2.imencode(".png", sheet)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.tobytes())
    log.info("contact sheet of %d clusters: %s", len(clusters), path)
    return Path(path)
