"""Stage 4's training logs, written through DVC's logger DVCLive: one directory per expert.

``live_dir`` (``reports/train/<name>`` under ``dvc repro``) holds what dvc.yaml declares, nothing else:

- ``plots/metrics/<metric>.tsv``: one row per epoch (DVCLive ``step`` = the epoch) of the loss terms,
  ``lr``, ``images_per_s`` and the val metrics: ``dvc plots show`` draws them against ``step``.
- ``plots/metrics/curves.png``: the loss and val AUC per epoch as a picture that shows offline (:mod:`.curves`).
- ``metrics.json``: DVCLive's summary, set to the **best** epoch's metrics (that of ``best.pt``, not
  the last epoch's): ``best_epoch``, that epoch's loss terms, ``lr`` and ``val_*`` metrics (with the
  val class counts), and ``step``, the last epoch logged. ``dvc metrics show`` / ``dvc exp show``
  read it. Timings stay out of it, so it is the same from run to run.

DVCLive is used as a plain logger: it writes no ``dvc.yaml`` (``dvcyaml=None``; the stage's outputs are
declared in the project's dvc.yaml) and saves no DVC experiment (``save_dvc_exp=False``: inside
``dvc repro`` / ``dvc exp run`` it would ignore the flag anyway, outside DVC it would commit one).

DVCLive looks at the repository it runs in (inside ``dvc repro`` / ``dvc exp run``, for Studio); where that
fails (DVCLive 3.49 raises on a Git repository without commits, e.g. ``git init; dvc init; dvc repro``) it
goes on as a plain logger: see :class:`_Live`.

A resumed run rewrites the directory from scratch: the history rows restored from ``last.pt`` are logged
again first, so its logs equal an uninterrupted run's. Their timings (never in ``last.pt``) come back from
the killed run's logs when those are that run's (same epochs, same losses).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..io import write_csv
from .checkpoint import TIMING_KEYS
from .curves import CURVES_PNG, write_curves

log = logging.getLogger(__name__)

METRICS_SUBDIR = Path("plots") / "metrics"  # DVCLive's layout: <live_dir>/plots/metrics/<name>.tsv


class TrainLog:
    """Per-epoch logs of one run: DVCLive in ``live_dir`` and/or a plain CSV ``history_csv`` (both optional;
    neither on the non-main ranks of a DDP run)."""

    def __init__(self, live_dir: str | Path | None = None, history_csv: str | Path | None = None):
        self.live_dir = None if live_dir is None else Path(live_dir)
        self.history_csv = None if history_csv is None else Path(history_csv)
        self._live = None

    def start(self, history: list[dict], best: dict) -> list[dict]:
        """Open the logs. ``history``: the rows of a resumed run (else empty), logged again first;
        returned with their timings back when the previous logs are those of the run that was killed."""
        if history:
            for old in (self._old_live_rows(), self._old_csv_rows()):
                history = with_timings(history, old)
        if self.live_dir is not None:
            self._live = _live_class()(dir=str(self.live_dir), resume=False, save_dvc_exp=False, dvcyaml=None,
                                       report=None, monitor_system=False)
            for i in range(len(history)):
                self._log_live(history[: i + 1], best)
        if history:
            self._write_csv(history)
            self._draw(history, best)
        return history

    def epoch(self, history: list[dict], best: dict) -> None:
        """Log the last row of ``history`` (one DVCLive step) and the best metrics so far; redraw the curves."""
        self._log_live(history, best)
        self._write_csv(history)
        self._draw(history, best)

    def _draw(self, history: list[dict], best: dict) -> None:
        """The curves as a PNG beside DVCLive's .tsv files (after DVCLive's start, which empties that folder)."""
        if self._live is not None and self.live_dir is not None:
            write_curves(self.live_dir / CURVES_PNG, history, best.get("epoch"), self.live_dir.name)

    def end(self) -> None:
        if self._live is not None:
            self._live.end()  # the summary again, no experiment saved (save_dvc_exp=False)
            self._live = None

    def _log_live(self, history: list[dict], best: dict) -> None:
        live = self._live
        if live is None:
            return
        row = history[-1]
        live.step = int(row["epoch"])
        for k, v in row.items():
            if k != "epoch" and _loggable(v):
                live.log_metric(k, float(v))
        live.summary = best_summary(history, best)
        live.next_step()  # writes metrics.json (+ "step") and moves on

    def _write_csv(self, history: list[dict]) -> None:
        if self.history_csv is not None:
            write_csv(self.history_csv, pd.DataFrame(history))

    def _old_live_rows(self) -> pd.DataFrame | None:
        return None if self.live_dir is None else read_live_history(self.live_dir)

    def _old_csv_rows(self) -> pd.DataFrame | None:
        path = self.history_csv
        if path is None or not path.is_file():
            return None
        try:
            return pd.read_csv(path)
        except (ValueError, pd.errors.ParserError):
            return None


def _live_class() -> type:
    """:class:`dvclive.Live` that survives a failure to inspect the repository (imported here: it imports dvc)."""
    from dvclive import Live

    class _Live(Live):
        def _init_dvc(self) -> None:
            try:
                super()._init_dvc()  # catches DvcException only
            except Exception as e:  # noqa: BLE001 - e.g. scmrepo's SCMError("Empty git repo")
                log.warning("DVCLive: cannot inspect the repository (%s): logging to %s only", e, self.dir)
                self._dvc_repo, self._inside_dvc_exp, self._save_dvc_exp = None, False, False
                self._dvc_file = "dvc.yaml"  # never written: dvcyaml=None

    return _Live


def best_summary(history: list[dict], best: dict) -> dict[str, Any]:
    """DVCLive's summary: the metrics of the best epoch (``best["epoch"]``) without timings; {} before one."""
    epoch = best.get("epoch")
    rows = [r for r in history if r["epoch"] == epoch]
    if not rows:
        return {}
    out = {"best_epoch": int(epoch)}
    out.update({k: float(v) for k, v in rows[0].items() if k != "epoch" and k not in TIMING_KEYS})
    out.update({f"val_{k}": int(best[k]) for k in ("n_pos", "n_neg") if k in best})
    return out


def read_live_history(live_dir: str | Path) -> pd.DataFrame | None:
    """The per-epoch rows a DVCLive directory holds (``epoch`` = step), or None (none, or unreadable)."""
    folder = Path(live_dir) / METRICS_SUBDIR
    files = sorted(folder.glob("*.tsv")) if folder.is_dir() else []
    if not files:
        return None
    try:
        cols = []
        for f in files:
            t = pd.read_csv(f, sep="\t")
            cols.append(t.set_index("step")[f.stem])
        df = pd.concat(cols, axis=1)
    except (ValueError, KeyError, pd.errors.ParserError):  # a foreign or damaged file
        return None
    return df.rename_axis("epoch").reset_index()


def with_timings(history: list[dict], old: pd.DataFrame | None) -> list[dict]:
    """Resumed ``history`` rows get back their timings from ``old`` rows (a killed run's logs) when those
    are that run's: every epoch both have, with the same loss (a run killed after writing ``last.pt`` but
    before logging may lack the last epoch). Rows that already have timings keep theirs."""
    if old is None or not history or not {"epoch", "loss"} <= set(old.columns):
        return history
    try:
        by_epoch = {int(e): row for e, (_, row) in zip(old["epoch"], old.iterrows())}
        ok = all(float(r["loss"]) == float(by_epoch[int(r["epoch"])]["loss"])
                 for r in history if int(r["epoch"]) in by_epoch)
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok or not any(int(r["epoch"]) in by_epoch for r in history):
        return history
    out = []
    for r in history:
        o = by_epoch.get(int(r["epoch"]))
        timings = {} if o is None else {k: float(o[k]) for k in TIMING_KEYS
                                        if k in o.index and k not in r and _loggable(o[k])}
        out.append({**r, **timings})
    return out


def _loggable(v: Any) -> bool:
    try:
        return v is not None and not math.isnan(float(v))
    except (TypeError, ValueError):
        return False
