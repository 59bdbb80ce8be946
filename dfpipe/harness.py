"""What every numbered stage script shares: argument parsing, logging, clean errors, and one entry point.

A stage script is ``harness.stage("<name>", __doc__)``: it reads the section ``<name>`` of the params file and its
catalog (``paths:``, :class:`~dfpipe.layout.Layout`), then calls ``dfpipe.<name>.run(cfg, layout, **extra)``.

A :class:`~dfpipe.errors.UserError` (bad params, missing input, unusable data) is one line naming the
file or key and the fix, exit code 2. Anything else is a bug: its full traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from .errors import UserError
from .io import remove_stale_temps, setup_logging


log = logging.getLogger(__name__)

USER_ERROR_EXIT = 2  # like argparse's exit code for a bad command line


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def run(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
    """Call ``main(args)``; report a UserError in one line (DFPIPE_DEBUG=1 shows the traceback)."""
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        main(args)
    except UserError as exc:  # only these: a bug (a KeyError deep in pandas...) keeps its traceback
        if os.environ.get("DFPIPE_DEBUG"):
            raise
        log.error("%s: %s", type(exc).__name__, exc)
        sys.exit(USER_ERROR_EXIT)


def stage_outputs(layout, name: str, expert: str | None = None) -> list[str]:
    """The paths stage ``name`` writes (of one expert only, for ``train_experts --expert``: another expert may be
    training beside it)."""
    if name == "train_experts" and expert:
        return [os.path.join(layout.models, expert), os.path.join(layout.train_logs, expert)]
    return [getattr(layout, entry) for entry in type(layout).entries(name)]


def stage(name: str, description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Run stage ``name`` as a script: parse the command line (``extra`` adds the stage's own options, passed to
    its ``run`` as keyword arguments), load its section and the layout, call ``dfpipe.<name>.run``."""
    from .config import STAGE_CONFIGS, load_section
    from .layout import Layout

    p = parser(description)
    if extra is not None:
        extra(p)
    args = p.parse_args()

    def main(args: argparse.Namespace) -> None:
        cfg = load_section(STAGE_CONFIGS[name], name, args.params)
        layout = Layout.load(args.params)
        options = {k: v for k, v in vars(args).items() if k not in ("params", "verbose")}
        removed = remove_stale_temps(stage_outputs(layout, name, options.get("expert")))
        if removed:
            log.info("removed %d stale temp file(s) of %s (a killed run's): %s", len(removed), name,
                     ", ".join(map(str, removed[:5])) + (" ..." if len(removed) > 5 else ""))
        importlib.import_module(f"dfpipe.{name}").run(cfg, layout, **options)

    run(main, args)
