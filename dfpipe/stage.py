"""What every numbered stage script shares: argument parsing, logging, clean errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from .config import ConfigError
from .io import setup_logging

# Nothing may wait on the network (set before heavy imports in the stage functions).
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_ALBUMENTATIONS_UPDATE", "DVC_NO_ANALYTICS"):
    os.environ.setdefault(_k, "1")

log = logging.getLogger("dfpipe.stage")

# Errors that mean "bad input or configuration": one clear line, exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, KeyError, ValueError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def run(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
    """Call ``main(args)``; report user errors in one line (DFPIPE_DEBUG=1 shows the traceback)."""
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        main(args)
    except USER_ERRORS as exc:
        if os.environ.get("DFPIPE_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        log.error("%s: %s", type(exc).__name__, msg)
        sys.exit(2)
