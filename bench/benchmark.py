"""The development benchmark (``make benchmark``): leave-one-source-out grid over ../shared/data.

Writes ``<out>/grid.json`` and ``<out>/table.md``; finished cells are kept under ``--work`` and reused,
so an interrupted run resumes. See dfpipe/benchmark.py for the protocol and bench/grid.yaml for the grid.
"""

from __future__ import annotations

import argparse
import logging
import os

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_ALBUMENTATIONS_UPDATE", "DVC_NO_ANALYTICS"):
    os.environ.setdefault(_k, "1")

from dfpipe.benchmark import load_grid, run_grid  # noqa: E402
from dfpipe.io import setup_logging  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--grid", default="bench/grid.yaml")
    p.add_argument("--work", default="data/benchmark", help="cells' work folders (reused: resume)")
    p.add_argument("--out", default="reports/benchmark", help="grid.json and table.md go here")
    p.add_argument("--recipes", nargs="*", help="a subset of the grid's recipes (the baseline is always run)")
    args = p.parse_args()
    setup_logging(logging.INFO)
    run_grid(load_grid(args.grid), args.work, args.out, args.recipes)


if __name__ == "__main__":
    main()
