"""Atomic output writes and logging set-up shared by every stage."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pandas as pd
from tqdm import tqdm


def work_dir(out_dir: str | Path) -> Path:
    """``<out_dir>.work``: where a resumable stage keeps finished work. It sits beside the declared
    output, not inside it, so it survives dvc deleting the outs before a rerun."""
    out = Path(out_dir)
    return out.with_name(out.name + ".work")


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (``os.umask`` sets it as it reads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_prefix(path: str | Path) -> str:
    """The start of every temp name :func:`atomic_path` makes for ``path``: ``.<name>.`` (then random, ``.tmp``)."""
    return f".{Path(path).name}."


_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # .<name>.<mkstemp's 8 random characters>.tmp


def remove_stale_temps(outputs: Iterable[str | Path]) -> list[Path]:
    """Delete the temp files a killed :func:`atomic_path` left for ``outputs``: ``.<name>.<random>.tmp`` beside
    each, and every such name inside one that is a folder (the stage owns all of it). Nothing else is touched.
    A stage calls this as it starts (:func:`dfpipe.harness.stage`); returns what was removed."""
    removed = []
    for out in map(Path, outputs):
        beside = out.parent.glob(f"{glob_escape(temp_prefix(out))}*.tmp") if out.parent.is_dir() else []
        inside = out.rglob(".*.tmp") if out.is_dir() else []
        for p in [*beside, *inside]:
            if _TEMP_NAME.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters taken literally."""
    import glob

    return glob.escape(name)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (a unique name: two runs never share one); rename it onto ``path`` only
    if the block succeeds, with the mode a plain ``open`` would give (0644 under the usual umask; ``mkstemp``
    makes 0600, which another account could not read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=_json_default)
        fh.write("\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_csv(path: str | Path, df: pd.DataFrame, **kwargs: Any) -> None:
    kwargs.setdefault("index", False)
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        df.to_csv(fh, **kwargs)


def write_png(path: str | Path, fig: Any, dpi: float | str = "figure") -> None:
    """A matplotlib figure as a PNG (at its own dpi unless ``dpi`` is given), atomically (a failed plot never leaves
    half a file under the real name); no date or version in the file, so the same figure gives the same bytes."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": None})


class _TqdmHandler(logging.StreamHandler):
    """Route log lines through tqdm.write so they do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once per script (stage scripts call this in ``main``)."""
    root = logging.getLogger()
    if any(isinstance(h, _TqdmHandler) for h in root.handlers):
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically and byte-reproducibly.

    Saving to a path names the zip archive's root folder after the file, and our temp files have
    random names; saving through a buffer gives a fixed archive name, so the same checkpoint gives the
    same bytes (and the same DVC hash) on every run.
    """
    import io as _io

    import torch

    buf = _io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())
