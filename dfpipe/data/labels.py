"""Read and validate the competition label CSVs (``img_name,target``; 1 = deepfake)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path, PurePosixPath

import pandas as pd

log = logging.getLogger(__name__)

EXPECTED_HEADER = ("img_name", "target")


class LabelError(ValueError):
    """A label file that cannot be used; the message names the file, the line and the fix."""


def read_labels(csv_path: str | Path) -> pd.DataFrame:
    """Parse a label CSV into a DataFrame with columns ``img_name`` (str) and ``label`` (int 0/1).

    Tolerated: a UTF-8 BOM, CRLF line ends, blank lines, spaces around fields. Refused with a
    :class:`LabelError` naming ``file:line``: a missing/other header, a row without two fields,
    a label outside {0, 1}, a duplicate name, a name that escapes the image root.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise LabelError(f"{path}: label file not found")
    text = path.read_text(encoding="utf-8-sig")  # -sig strips a BOM
    rows = [(n, r) for n, r in enumerate(csv.reader(io.StringIO(text)), start=1) if any(c.strip() for c in r)]
    if not rows:
        raise LabelError(f"{path}: empty label file; expected header 'img_name,target'")
    line, header = rows[0]
    if tuple(c.strip().lower() for c in header) != EXPECTED_HEADER:
        raise LabelError(
            f"{path}:{line}: header is {','.join(header)!r}; expected 'img_name,target' "
            "(add or rename the header row)"
        )
    names: list[str] = []
    labels: list[int] = []
    first_seen: dict[str, int] = {}
    for line, row in rows[1:]:
        if len(row) != 2:
            raise LabelError(f"{path}:{line}: expected 2 fields 'img_name,target', got {len(row)}: {row!r}")
        name, target = row[0].strip(), row[1].strip()
        _check_name(path, line, name)
        if target not in ("0", "1"):
            raise LabelError(f"{path}:{line}: label {target!r} for {name!r} is not 0 (real) or 1 (fake)")
        if name in first_seen:
            raise LabelError(
                f"{path}:{line}: duplicate img_name {name!r} (first on line {first_seen[name]}); "
                "keep one row per image"
            )
        first_seen[name] = line
        names.append(name)
        labels.append(int(target))
    return pd.DataFrame({"img_name": names, "label": labels})


def _check_name(path: Path, line: int, name: str) -> None:
    if not name:
        raise LabelError(f"{path}:{line}: empty img_name")
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
        raise LabelError(f"{path}:{line}: img_name {name!r} escapes the image folder; use a relative path inside it")
