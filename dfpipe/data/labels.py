"""Read and validate the label CSVs (``img_name,target``; 1 = deepfake) and unlabelled name lists.

Every refusal is a :class:`LabelError` whose one-line message names ``file:line``, the problem and the
fix, so a bad row in a 500k-line file is found at once. Tolerated (they are encoding accidents, not
label problems): a UTF-8 BOM, CRLF line ends, blank lines and spaces around fields.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path, PurePosixPath

import pandas as pd

from ..errors import DataError

log = logging.getLogger(__name__)

EXPECTED_HEADER = ("img_name", "target")
NAMES_HEADER = ("img_name",)


class LabelError(DataError):  # a UserError and a ValueError
    """A label file that cannot be used; the message names the file, the line and the fix."""


def read_labels(csv_path: str | Path) -> pd.DataFrame:
    """Parse a label CSV into columns ``img_name`` (str), ``label`` (int 0/1) and ``line`` (1-based).

    Refused with a :class:`LabelError` naming ``file:line``: a missing/other header, a row without two
    fields, a label outside {0, 1}, a duplicate name (same or conflicting label), a name that escapes
    the image root, a file that is not UTF-8 text.
    """
    path = Path(csv_path)
    rows = _rows(path)
    if not rows:
        raise LabelError(f"{path}: empty label file; expected header 'img_name,target' and one row per image")
    line, header = rows[0]
    if tuple(c.strip().lower() for c in header) != EXPECTED_HEADER:
        raise LabelError(
            f"{path}:{line}: header is {','.join(header)!r}; expected 'img_name,target' "
            "(add or rename the header row)"
        )
    if len(rows) == 1:
        raise LabelError(f"{path}: header but no rows; add one line 'img_name,target' per image "
                         "(or point params.yaml at the right label file)")
    names: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    first_seen: dict[str, int] = {}
    for line, row in rows[1:]:
        if len(row) != 2:
            raise LabelError(f"{path}:{line}: expected 2 fields 'img_name,target', got {len(row)}: {row!r} "
                             "(one image per row; quote names that contain a comma)")
        name, target = row[0].strip(), row[1].strip()
        _check_name(path, line, name)
        if target not in ("0", "1"):
            raise LabelError(f"{path}:{line}: label {target!r} for {name!r} is not 0 (real) or 1 (fake); "
                             "write 0 or 1")
        if name in first_seen:
            _duplicate(path, line, name, first_seen[name], labels[names.index(name)], int(target))
        first_seen[name] = line
        names.append(name)
        labels.append(int(target))
        lines.append(line)
    return pd.DataFrame({"img_name": names, "label": labels, "line": lines})


def read_names(list_path: str | Path) -> pd.DataFrame:
    """Parse an unlabelled name list (e.g. ``testset1_seen_nolabel.txt``): columns ``img_name``, ``line``.

    One name per line; an optional first line ``img_name`` is the header. Same checks as
    :func:`read_labels` for names (duplicates, escaping paths); a row with a comma is refused.
    """
    path = Path(list_path)
    rows = _rows(path)
    if rows and tuple(c.strip().lower() for c in rows[0][1]) == NAMES_HEADER:
        rows = rows[1:]
    names: list[str] = []
    lines: list[int] = []
    first_seen: dict[str, int] = {}
    for line, row in rows:
        if len(row) != 1:
            raise LabelError(f"{path}:{line}: expected one image name per line, got {len(row)} fields {row!r} "
                             "(a name list has no labels; use a label CSV 'img_name,target' for labelled data)")
        name = row[0].strip()
        _check_name(path, line, name)
        if name in first_seen:
            raise LabelError(f"{path}:{line}: duplicate img_name {name!r} (first on line {first_seen[name]}); "
                             "delete one of the two lines")
        first_seen[name] = line
        names.append(name)
        lines.append(line)
    return pd.DataFrame({"img_name": names, "line": lines})


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank CSV rows with their 1-based line numbers."""
    if not path.is_file():
        raise LabelError(f"{path}: label file not found (check the path in params.yaml)")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig strips a BOM
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise LabelError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    # newline="" semantics: the csv module handles CRLF itself; line numbers count physical lines
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            if any(c.strip() for c in row):
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise LabelError(f"{path}:{reader.line_num}: malformed CSV ({exc}); check the quotes on that line") from None
    return rows


def _duplicate(path: Path, line: int, name: str, first: int, first_label: int, label: int) -> None:
    if first_label == label:
        raise LabelError(f"{path}:{line}: duplicate img_name {name!r} (first on line {first}, same label {label}); "
                         "delete one of the two rows")
    raise LabelError(f"{path}:{line}: duplicate img_name {name!r} (first on line {first}) with conflicting labels "
                     f"{first_label} and {label}; keep only the row with the right label")


def _check_name(path: Path, line: int, name: str) -> None:
    if not name:
        raise LabelError(f"{path}:{line}: empty img_name; give the image's path relative to the image folder")
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
        raise LabelError(f"{path}:{line}: img_name {name!r} escapes the image folder; use a relative path inside it")
