"""``dfpipe``: score images with the stage-5 ensemble from the command line, or serve it over HTTP.

    dfpipe predict IMG [IMG...] [--json]         score and verdict per image
    dfpipe scan DIR --out results.csv            every image under DIR -> CSV (resumable)
    dfpipe serve --host 127.0.0.1 --port 8080    HTTP API + web page

Every command loads the ensemble from ``--card`` (default: the detector shipped in dfpipe/assets/detector; the
DAG writes submissions/ensemble.json) and the experts'
checkpoints from ``--models`` (default models/). How an image is prepared for the experts (``max_side``,
face crop, each expert's input policy) comes from the checkpoints (:mod:`dfpipe.data.preprocess`), never
from a command-line option: every command scores a file exactly as stage 5 and the HTTP API do.

Exit codes (docs/serving.md): 0 done; 1 ``predict`` scored some images but not all (each refused one is a line
on stderr: unreadable, or outside the size rule stage 1 and the API apply, in the same words); 2 a problem the
user can fix before anything is scored (missing card or model folder, missing input, empty folder: a
:class:`~dfpipe.errors.UserError`, one line on stderr, as for the stage scripts; ``DFPIPE_DEBUG=1`` shows its
traceback) or a bad command line (argparse); 130 interrupted. A bug keeps its traceback (Python's exit 1).

A model trained on the synthetic demo data (its card says ``demo: true``) is said so on stderr, one warning line,
whenever ``predict`` or ``scan`` scores with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .harness import USER_ERROR_EXIT
from .serve.service import DEFAULT_CARD, DEFAULT_MAX_BYTES, DEFAULT_MODELS, resolve_model

if TYPE_CHECKING:
    from .serve.identity import Identity

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--card", default=None, help="ensemble card: one written by stage 5 (the DAG's is "
                   f"{DEFAULT_CARD}); default: the detector shipped in dfpipe/assets/detector (its MODEL_CARD.md)")
    p.add_argument("--models", default=None, help=f"folder of the card's experts (default: {DEFAULT_MODELS} for a "
                   "named card, the shipped detector's own folder otherwise)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and details")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dfpipe", description="Deepfake image detector (the stage-5 ensemble).")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="score one or more images")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text lines")
    _common(p)
    s = sub.add_parser("scan", help="score every image under a folder into a CSV (resumable)")
    s.add_argument("folder", help="folder scanned recursively")
    s.add_argument("--out", required=True, help="CSV to write or resume (columns path,score,verdict,error,model)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=-1, help="decoding processes (-1 = auto)")
    s.add_argument("--decode", choices=("workers", "device"), default="workers",
                   help="workers: decode in CPU processes (the preprocessing contract's exact pixels); device: "
                        "plain JPEGs in batches on the GPU (nvJPEG), scores within ~1e-4 (default: %(default)s)")
    _common(s)
    v = sub.add_parser("serve", help="HTTP API (POST /predict, /predict/batch, /explain) and web page at /")
    v.add_argument("--host", default="127.0.0.1", help="(default: %(default)s; 0.0.0.0 to listen on every interface)")
    v.add_argument("--port", type=int, default=8080)
    v.add_argument("--max-mb", type=float, default=DEFAULT_MAX_BYTES / 2**20, help="upload size limit per image "
                                                                                    "(default: %(default)s)")
    v.add_argument("--max-pixels", type=int, default=None,
                   help="pixel limit per image, to bound memory: only lower than the model's own applies "
                        "(default: the model's, as stage 1 and predict apply it; 100 MP unless stage 1 set another)")
    v.add_argument("--max-batch", type=int, default=16, help="images per model call (default: %(default)s)")
    v.add_argument("--max-memory", type=float, default=1024, metavar="MB",
                   help="memory for request bodies and decoded images at once, the model aside; requests beyond it "
                        "wait, then get 503 (default: %(default)s)")
    v.add_argument("--max-queue", type=int, default=256, help="images waiting for the model before 503 "
                                                              "(default: %(default)s)")
    v.add_argument("--limit-concurrency", type=int, default=256,
                   help="connections + requests at once; uvicorn answers 503 above it (default: %(default)s)")
    v.add_argument("--header-timeout", type=float, default=10, metavar="S",
                   help="a request's headers must be complete this long after the connection or its first byte, "
                        "else the connection is closed (default: %(default)s)")
    v.add_argument("--request-timeout", type=float, default=60, metavar="S",
                   help="a request's body must be complete this long after its headers, else 408 "
                        "(default: %(default)s)")
    v.add_argument("--token", default=None, help="API token required on every route but /health "
                                                 "(default: $DFPIPE_TOKEN); needed to listen beyond loopback")
    v.add_argument("--insecure", action="store_true",
                   help="listen on a non-loopback address without a token (anyone who reaches it may use it)")
    _common(v)
    r = sub.add_parser("report", help="the DAG's results in one short table: val, test and held-out AUC, TPR@1e-2")
    r.add_argument("--params", default="params.yaml", help="params file whose paths: catalog names the reports")
    r.add_argument("-v", "--verbose", action="store_true", help="log details")
    return ap


def check_inputs(paths: list[Path]) -> None:
    """Every image argument of ``predict`` exists and is a file: one line naming the bad ones, and the command for a
    folder."""
    from .serve.service import ServeError

    missing = [str(p) for p in paths if not p.exists()]
    folders = [str(p) for p in paths if p.is_dir()]
    if missing:
        raise ServeError(f"not found: {', '.join(missing)}")
    if folders:
        raise ServeError(f"{', '.join(folders)}: a folder; score every image in it with `dfpipe scan "
                         f"{folders[0]} --out scores.csv`")


def cmd_predict(args: argparse.Namespace) -> int:
    from .serve.identity import card_identity
    from .serve.scan import score_paths
    from .serve.service import load_ensemble

    paths = [Path(p) for p in args.images]
    check_inputs(paths)  # before the models load (seconds): a typo fails at once
    identity = card_identity(args.card)
    ens = load_ensemble(args.card, args.models, args.device)
    warn_if_demo(identity)
    scores, errors = score_paths(ens, paths, workers=0)
    rows = []
    for p, s in zip(paths, scores):
        err = errors.get(str(p), "")
        rows.append({"path": str(p), "score": None if err else round(float(s), 6),
                     "verdict": "error" if err else ens.verdict(float(s)), "error": err or None,
                     "demo": identity.demo})
    if args.json:
        print(json.dumps(rows, indent=2))
    for r in rows:
        if r["error"]:
            print(f"dfpipe: error: {r['path']}: {r['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{r['path']}\t{r['score']:.4f}\t{r['verdict']}")
    return 1 if errors else 0


def cmd_scan(args: argparse.Namespace) -> int:
    from .serve.identity import card_identity
    from .serve.scan import plan_scan, scan_folder
    from .serve.service import load_ensemble

    identity = card_identity(args.card)  # the card alone: rows of another model are scored again
    model = identity.id
    paths, todo = plan_scan(args.folder, args.out, model)  # before loading the models: bad input fails fast
    if not todo:
        print(f"{args.out}: all {len(paths)} images already scored by {model}; nothing to do")
        return 0
    ens = load_ensemble(args.card, args.models, args.device)
    warn_if_demo(identity)
    counts = scan_folder(ens, args.folder, args.out, args.batch_size, args.workers, decode=args.decode,
                         model=model)
    verdicts = ", ".join(f"{counts[k]} {k}" for k in ("likely real", "uncertain", "likely fake") if counts.get(k))
    print(f"{args.out}: {counts['n_scored']} scored ({verdicts or 'none'}), {counts['n_errors']} errors, "
          f"{counts['n_skipped']} already there")
    return 0


def warn_if_demo(identity: Identity) -> None:
    """One warning line on stderr when a demo model is about to score (the API and page say it too)."""
    log.info("model %s: %s", identity.id, identity.header)
    if identity.warning:
        log.warning("%s", identity.warning)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .serve.api import ServeSettings, create_app
    from .serve.server import return_freed_memory_to_the_os, uvicorn_config
    from .serve.service import ServeError, load_ensemble

    token = args.token or os.environ.get("DFPIPE_TOKEN") or None
    if not (token or args.insecure or is_loopback(args.host)):
        raise ServeError(f"--host {args.host} listens beyond this machine: set an API token (--token or "
                         "DFPIPE_TOKEN), or pass --insecure to serve without one")
    settings = ServeSettings(models_dir=args.models, card=args.card, device=args.device,
                             max_bytes=int(args.max_mb * 2**20), max_pixels=args.max_pixels, max_batch=args.max_batch,
                             max_memory=int(args.max_memory * 2**20), max_queue=args.max_queue,
                             request_timeout_s=args.request_timeout, token=token)
    # here, so a bad card (or one that cannot be served) is one line, not a traceback
    ens = load_ensemble(args.card, args.models, args.device, serving=True)
    return_freed_memory_to_the_os()
    # the app logs one access line per request (dfpipe.serve.access); uvicorn's own is off
    config = uvicorn_config(create_app(settings, ens), args.host, args.port, limit_concurrency=args.limit_concurrency,
                            header_timeout=args.header_timeout)
    uvicorn.Server(config).run()
    return 0


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_report(args: argparse.Namespace) -> int:
    from .layout import Layout
    from .report import render

    print(render(Layout.load(args.params)), end="")
    return 0


COMMANDS = {"predict": cmd_predict, "scan": cmd_scan, "serve": cmd_serve, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .io import setup_logging

    setup_logging()
    # per command: scan and serve report progress, predict keeps stderr for errors
    logging.getLogger().setLevel(logging.INFO if args.verbose or args.command != "predict" else logging.WARNING)
    if hasattr(args, "card"):  # the scoring commands: no card named = the shipped detector
        args.card, args.models = resolve_model(args.card, args.models)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:  # ServeError included; any other exception is a bug, its traceback shown
        if os.environ.get("DFPIPE_DEBUG"):
            raise
        print(f"dfpipe: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("dfpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
