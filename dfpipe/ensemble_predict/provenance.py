"""What the ensemble card says about where its model comes from: the training data (stage 1's data card), whether
that is the synthetic demo data, and the code's commit. The CLI, the API and the page show it
(:mod:`dfpipe.serve.identity`), so a demo model is never taken for a real detector."""

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
