"""Score every image under a folder into a CSV (``path,score,verdict,error``), resumably.

Rows are appended and flushed to disk chunk by chunk, so a killed scan keeps every row it wrote and a
rerun skips the paths already in the CSV (a row cut short by the kill is dropped and redone).
``path`` is relative to the scanned folder (POSIX separators), so a moved folder still resumes.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..data.images import IMAGE_EXTENSIONS, list_images
from .service import ServeError

log = logging.getLogger(__name__)
COLUMNS = ["path", "score", "verdict", "error"]


def score_paths(ens: Any, paths: list[Path], batch_size: int = 64, workers: int = -1, decode: str = "workers",
                ) -> tuple[np.ndarray, dict[str, str]]:
    """Scores (NaN where unreadable) and ``{path: error}``: :meth:`Ensemble.score_files`, which decodes in
    ``workers`` processes and applies the checkpoints' preprocessing (stage 1: ``max_side`` and face crop,
    then each expert's input policy), exactly as stage 5 and the HTTP API do. ``decode="device"``: plain
    JPEGs are decoded on the device in batches (nvJPEG on a GPU; see :mod:`dfpipe.ensemble_predict.gpu_decode`)."""
    scores, errors = ens.score_files(paths, batch_size=batch_size, workers=workers, decode=decode)
    return scores, dict(errors)


def done_paths(out_csv: Path) -> set[str]:
    """Paths already in a scan CSV; a last row cut short by a kill is removed first."""
    if not out_csv.exists() or out_csv.stat().st_size == 0:
        return set()
    raw = out_csv.read_bytes()
    header = raw.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
    if header != ",".join(COLUMNS):  # checked before anything is cut: never damage someone else's file
        raise ServeError(f"{out_csv}: exists and is not a scan CSV (first line {header[:60]!r}, expected "
                         f"{','.join(COLUMNS)!r}); choose another --out")
    if not raw.endswith(b"\n"):
        with out_csv.open("r+b") as fh:
            fh.truncate(raw.rfind(b"\n") + 1)
    with out_csv.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        return {row[0] for row in reader if row}


def plan_scan(root: str | Path, out_csv: str | Path) -> tuple[list[Path], list[Path]]:
    """(every image under ``root``, those not yet in ``out_csv``); a ServeError if there is nothing to
    scan or ``out_csv`` is some other file. Cheap: call it before loading the models."""
    root, out_csv = Path(root), Path(out_csv)
    if not root.is_dir():
        raise ServeError(f"{root}: folder not found")
    if out_csv.is_dir():
        raise ServeError(f"--out {out_csv}: is a folder; give the CSV file to write, e.g. --out {out_csv / 'scan.csv'}")
    paths = list_images(root)
    if not paths:
        raise ServeError(f"{root}: no images in it or below (looked for {', '.join(IMAGE_EXTENSIONS)})")
    done = done_paths(out_csv)
    return paths, [p for p in paths if p.relative_to(root).as_posix() not in done]


def scan_folder(ens: Any, root: str | Path, out_csv: str | Path, batch_size: int = 64, workers: int = -1,
                chunk: int = 512, decode: str = "workers") -> dict[str, Any]:
    """Score every image under ``root`` into ``out_csv`` (appending; skips rows already there).

    Returns counts: ``n_images``, ``n_skipped`` (already in the CSV), ``n_scored``, ``n_errors`` and
    one per verdict among the rows written now.
    """
    root, out_csv = Path(root), Path(out_csv)
    paths, todo = plan_scan(root, out_csv)
    counts: Counter = Counter(n_images=len(paths), n_skipped=len(paths) - len(todo), n_scored=0, n_errors=0)
    if counts["n_skipped"]:
        log.info("%s: %d of %d images already scanned; scoring the other %d", out_csv, counts["n_skipped"],
                 len(paths), len(todo))
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    # An append-only log rather than dfpipe.io's atomic rewrite: a kill must keep the rows written so far.
    with out_csv.open("a", newline="", encoding="utf-8") as fh, \
            tqdm(total=len(paths), initial=counts["n_skipped"], desc="scan", unit="img") as bar:
        writer = csv.writer(fh, lineterminator="\n")
        if fh.tell() == 0:
            writer.writerow(COLUMNS)
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            scores, errors = score_paths(ens, part, batch_size, workers, decode)
            for p, s in zip(part, scores):
                row = _row(ens, p.relative_to(root).as_posix(), s, errors.get(str(p), ""))
                counts["n_errors" if row[2] == "error" else "n_scored"] += 1
                counts[row[2]] += 1
                writer.writerow(row)
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(part))
    return dict(counts)


def _row(ens: Any, rel: str, score: float, error: str) -> list[str]:
    if error or not np.isfinite(score):
        return [rel, "", "error", " ".join((error or "no score").split())]  # one line per row
    return [rel, f"{score:.6f}", ens.verdict(float(score)), ""]
