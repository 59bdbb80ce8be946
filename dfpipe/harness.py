"""What every numbered stage script shares: argument parsing, logging, clean errors.

A :class:`~dfpipe.errors.UserError` (bad params, missing input, unusable data) is one line naming the
file or key and the fix, exit code 2. Anything else is a bug: its full traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from .errors import UserError
from .io import setup_logging

# Nothing may wait on the network (set before heavy imports in the stage functions).
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_ALBUMENTATIONS_UPDATE", "DVC_NO_ANALYTICS"):
    os.environ.setdefault(_k, "1")

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
