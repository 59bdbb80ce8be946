"""Score every image under a folder into a CSV (``path,score,verdict,error,model``), resumably.

Rows are appended and flushed to disk chunk by chunk, so a killed scan keeps every row it wrote and a
rerun skips the paths already in the CSV (a row cut short by the kill is dropped and redone). A row scored by
another model (``model``: the experts and the card's digest, :func:`dfpipe.serve.service.model_id`) or that
ended in an error is scored again: the CSV is first rewritten without it. ``path`` is relative to the scanned
folder (POSIX separators), so a moved folder still resumes.
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
from ..io import atomic_open
from .service import ServeError

log = logging.getLogger(__name__)
COLUMNS = ["path", "score", "verdict", "error", "model"]
OLD_COLUMNS = COLUMNS[:4]  # scans written before the model column: every row is scored again


def score_paths(ens: Any, paths: list[Path], batch_size: int = 64, workers: int = -1, decode: str = "workers",
                progress: Any = None) -> tuple[np.ndarray, dict[str, str]]:
    """Scores (NaN where unreadable) and ``{path: error}``: :meth:`Ensemble.score_files`, which decodes in
    ``workers`` processes and applies the checkpoints' preprocessing (stage 1: ``max_side`` and face crop,
    then each expert's input policy), exactly as stage 5 and the HTTP API do. ``decode="device"``: plain
    JPEGs are decoded on the device in batches (nvJPEG on a GPU; see :mod:`dfpipe.ensemble_predict.gpu_decode`)."""
    scores, errors = ens.score_files(paths, batch_size=batch_size, workers=workers, decode=decode, progress=progress)
    return scores, dict(errors)


def done_paths(out_csv: Path, model: str) -> set[str]:
    """Paths already in a scan CSV, scored by ``model`` without error. A last row cut short by a kill is removed
    first; rows of another model or with an error are dropped (the file rewritten atomically without them) so
    that they are scored again."""
    if not out_csv.exists() or out_csv.stat().st_size == 0:
        return set()
    raw = out_csv.read_bytes()
    header = raw.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
    if header not in (",".join(COLUMNS), ",".join(OLD_COLUMNS)):  # checked first: never damage another file
        raise ServeError(f"{out_csv}: exists and is not a scan CSV (first line {header[:60]!r}, expected "
                         f"{','.join(COLUMNS)!r}); choose another --out")
    if not raw.endswith(b"\n"):
        with out_csv.open("r+b") as fh:
            fh.truncate(raw.rfind(b"\n") + 1)
    with out_csv.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("path")]
    keep = [r for r in rows if r.get("model") == model and r["verdict"] != "error"]
    if len(keep) < len(rows) or header != ",".join(COLUMNS):
        log.info("%s: %d row(s) from another model or with an error will be scored again", out_csv,
                 len(rows) - len(keep))
        with atomic_open(out_csv, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(keep)
    return {r["path"] for r in keep}


def plan_scan(root: str | Path, out_csv: str | Path, model: str) -> tuple[list[Path], list[Path]]:
    """(every image under ``root``, those not yet in ``out_csv`` as ``model`` scored them); a ServeError if there is
    nothing to scan or ``out_csv`` is some other file. Cheap: call it before loading the models."""
    root, out_csv = Path(root), Path(out_csv)
    if not root.is_dir():
        raise ServeError(f"{root}: folder not found")
    if out_csv.is_dir():
        raise ServeError(f"--out {out_csv}: is a folder; give the CSV file to write, e.g. --out {out_csv / 'scan.csv'}")
    paths = list_images(root)
    if not paths:
        raise ServeError(f"{root}: no images in it or below (looked for {', '.join(IMAGE_EXTENSIONS)})")
    done = done_paths(out_csv, model)
    return paths, [p for p in paths if p.relative_to(root).as_posix() not in done]


def scan_folder(ens: Any, root: str | Path, out_csv: str | Path, batch_size: int = 64, workers: int = -1,
                chunk: int = 512, decode: str = "workers", model: str = "") -> dict[str, Any]:
    """Score every image under ``root`` into ``out_csv`` (appending; skips rows already there).

    Returns counts: ``n_images``, ``n_skipped`` (already in the CSV), ``n_scored``, ``n_errors`` and
    one per verdict among the rows written now.
    """
    root, out_csv = Path(root), Path(out_csv)
    paths, todo = plan_scan(root, out_csv, model)
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
            scores, errors = score_paths(ens, part, batch_size, workers, decode, progress=bar.update)
            for p, s in zip(part, scores):
                row = _row(ens, p.relative_to(root).as_posix(), s, errors.get(str(p), ""), model)
                counts["n_errors" if row[2] == "error" else "n_scored"] += 1
                counts[row[2]] += 1
                writer.writerow(row)
            fh.flush()
            os.fsync(fh.fileno())
    return dict(counts)


def _row(ens: Any, rel: str, score: float, error: str, model: str) -> list[str]:
    if error or not np.isfinite(score):
        return [rel, "", "error", " ".join((error or "no score").split()), model]  # one line per row
    return [rel, f"{score:.6f}", ens.verdict(float(score)), "", model]
