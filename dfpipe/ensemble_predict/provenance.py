"""What the ensemble card says about where its model and its numbers come from: the training data (stage 1's data
card), whether that is the synthetic demo data, and the code's commit (the CLI, the API and the page show them,
:mod:`dfpipe.serve.identity`, so a demo model is never taken for a real detector); and which of its numbers were
measured on data that selected something (:func:`protocol`)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from ..data.datacard import read_data_card

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


def code_version(root: Path = REPO, paths: tuple[str, ...] = ("dfpipe",)) -> str:
    """The commit of the code (12 hex digits, ``-dirty`` when one of ``paths`` differs from it: the benchmark adds
    its own package), or ``unknown`` outside git (an installed package, no git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=root, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip()[:12] + ("-dirty" if dirty.stdout.strip() else "")


def provenance(prepared: str | Path) -> dict:
    """The card's ``demo``, ``training_data`` and ``commit``: from the data card of the image store ``prepared``
    (None for both when the store predates it: readers then say "unknown")."""
    data = read_data_card(prepared)
    if data is None:
        log.warning("%s has no data card (made before stage 1 wrote one): the ensemble card will say the training "
                    "data is unknown; rerun stage 1 (dvc repro)", prepared)
    elif data.get("demo"):
        log.warning("trained on %s: this model's scores say nothing about real fakes", data.get("summary"))
    return {"demo": None if data is None else bool(data.get("demo")), "training_data": data,
            "commit": code_version()}


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
