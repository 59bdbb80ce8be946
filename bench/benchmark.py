"""The development benchmark (``make benchmark``): leave-one-source-out grid over ../shared/data.

Subcommands (docs/benchmark.md):
  queue  every cell as a DVC experiment (``dvc exp run --queue`` + ``dvc queue start``), then the table
  run    every cell in this process, then the table (the default: ``benchmark.py --grid ...`` as before)
  cell   one cell: the ``cell`` stage of bench/grid/dvc.yaml (params from bench/grid/params.yaml)
  table  the table of the finished cells (and their missing robustness passes); trains nothing
  readme the generated blocks of README.md and docs/*.md (benchmark tables among them) rewritten from reports/
         (python -m dfpipe.docs, make docs; --check: only list stale ones)

All write ``<out>/grid.json`` and ``<out>/table.md``; finished cells are kept under ``--work`` and reused, so an
interrupted run resumes whichever way it ran. See dfbench/ for the protocol and bench/grid.yaml for
the grid.

A grid's ``train_on`` trains on several sources at once (``a+b``: one cell per pair, scored in-source on each
held-out part and cross-source on the rest); bench/grid_pairs.yaml is the three pairs, in the same work folder
as bench/grid.yaml (its single-source cells are read for the "alone" comparison, never retrained):
  bench/benchmark.py run --grid bench/grid_pairs.yaml --work data/benchmark --out reports/benchmark/pairs
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from dfpipe import harness  # its import sets the offline env vars (dfpipe.OFFLINE_ENV)
from dfpipe.errors import ConfigError

COMMANDS = ("queue", "run", "cell", "table", "readme")


def _grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default="bench/grid.yaml", help="the grid file (bench/grid_pairs.yaml: pairs of sources)")
    p.add_argument("--work", default="data/benchmark", help="cells' work folders (reused: resume)")
    p.add_argument("--out", default="reports/benchmark", help="grid.json and table.md go here")
    p.add_argument("--recipes", nargs="*", help="a subset of the grid's recipes (the baseline is always run)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["run", *argv]  # the former interface: benchmark.py --grid ... --work ... --out ...
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="every cell as a DVC experiment, then the table")
    _grid_args(q)
    q.add_argument("--poll", type=float, default=30.0, help="seconds between `dvc queue status` checks")
    _grid_args(sub.add_parser("run", help="every cell in this process, then the table"))
    _grid_args(sub.add_parser("table", help="the table of the finished cells; trains nothing"))
    c = sub.add_parser("cell", help="one cell (the cell stage of bench/grid/dvc.yaml)")
    c.add_argument("--params", default="bench/grid/params.yaml")
    c.add_argument("--metrics", default="bench/grid/metrics.json")
    r = sub.add_parser("readme", help="README.md's and docs/*.md's tables and numbers from reports/ (dfpipe.docs)")
    r.add_argument("--readme", default=None, help="only this page (default: README.md and docs/*.md)")
    r.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is stale")
    for s in sub.choices.values():
        s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def check_dfbench() -> None:
    """The benchmark lives in dfbench/ beside dfpipe/: an editable install made before that exposes dfpipe only
    (this script's folder, not the repository root, is on sys.path). Say the fix instead of a traceback."""
    if importlib.util.find_spec("dfbench") is None:
        raise ConfigError("dfbench: not importable (the installed dfpipe predates the benchmark package beside it): "
                          "run make setup, which reinstalls when pyproject.toml changes, or set PYTHONPATH=.")


def run(args: argparse.Namespace) -> None:
    if args.command != "readme":  # readme needs dfpipe.docs only
        check_dfbench()
    if args.command == "readme":
        from dfpipe.docs import sync, sync_all

        if args.readme:  # one page
            stale = {args.readme: sync(args.readme, ".", check=args.check)}
        else:
            stale = sync_all(".", check=args.check)
        stale = {page: s for page, s in stale.items() if s}
        if args.check and stale:
            raise SystemExit("; ".join(f"{page}: {len(s)} block(s) differ from reports/: {'; '.join(s)}"
                                       for page, s in stale.items()) + " (bench/benchmark.py readme rewrites them)")
    elif args.command == "cell":
        from dfbench.queue import run_cell_stage

        run_cell_stage(args.params, args.metrics)
    elif args.command == "queue":
        from dfbench.queue import queue_grid

        res = queue_grid(args.grid, args.work, args.out, args.recipes, poll_s=args.poll)
        if res["failed"]:
            raise SystemExit(f"{len(res['failed'])} cell(s) failed: {', '.join(res['failed'])}")
    else:
        from dfbench import load_grid, run_grid

        run_grid(load_grid(args.grid), args.work, args.out, args.recipes, train=args.command == "run")


def main(argv: list[str] | None = None) -> None:
    """Parse, then run with the stages' harness: a bad setting or input is one line and exit code 2."""
    harness.run(run, parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
