"""Every result number of README.md and docs/*.md comes from a file under reports/, never typed by hand.

A generated part of a page sits between two HTML comments (invisible once rendered); the opening one says where
it comes from, paths relative to the repository root:

    <!-- table: reports/eval/table.md -->                       the file's first markdown table
    <!-- table: reports/benchmark/table.md "### summary" -->    the first table after the first line starting so
    ...(the table)...
    <!-- /table -->
    <!-- value: reports/metrics.json val.ensemble.auc .3f -->0.723<!-- /value -->
    <!-- cell: reports/benchmark/pairs/table.md "### summary of" "baseline" "mean together" -->0.703<!-- /cell -->

``table`` blocks hold whole tables (``benchmark-table``, the former name, is the same kind and needs a heading);
``value`` is one entry of a JSON file (a dotted key; list items by index, ``runs.0.s``), formatted with Python's
format spec when one is given (``.3f``, ``.0%``, ``,.0f``); ``cell`` is one cell of a markdown table, picked by
its row's first cell and its column's header, or with ``#N`` after the column only the N-th decimal number in it
(from 0: ``#2`` of ``0.843 / 0.605 (0.724); TPR@1e-2 0.118`` is ``0.724``). ``python -m dfpipe.docs`` (``make docs``)
rewrites every block of README.md and docs/*.md from its source; ``--check`` writes nothing and fails when a block
is stale, as the test suite checks, so no figure on those pages can drift from the reports. A block naming a
missing file, heading, key, row or column, or an opening comment without its closing one, is an error naming the
page and the block.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import InputError
from .io import atomic_open

log = logging.getLogger(__name__)

_Q = r'"(?P<{}>[^"\n]*)"'
TABLE = re.compile(r'(?P<open><!-- (?P<kind>benchmark-table|table): (?P<path>\S+)(?: ' + _Q.format("heading")
                   + r')? -->\n)(?P<body>.*?)(?P<close><!-- /(?P=kind) -->)', re.S)
VALUE = re.compile(r'(?P<open><!-- value: (?P<path>\S+) (?P<key>\S+)(?: (?P<fmt>\S+))? -->)(?P<body>[^<\n]*)'
                   r'(?P<close><!-- /value -->)')
CELL = re.compile(r'(?P<open><!-- cell: (?P<path>\S+) ' + _Q.format("heading") + " " + _Q.format("row") + " "
                  + _Q.format("col") + r'(?: #(?P<nth>\d+))? -->)(?P<body>[^<\n]*)(?P<close><!-- /cell -->)')
DECIMAL = re.compile(r"[-+]?\d*\.\d+")
OPENING = re.compile(r"<!-- (benchmark-table|table|value|cell):")


def section_table(text: str, heading: str, where: str = "table") -> str:
    """The first markdown table (consecutive lines starting with ``|``) after the first line of ``text`` that starts
    with ``heading`` (``""``: the first table of ``text``); ends with a newline."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None) if heading else -1
    if start is None:
        raise InputError(f"{where}: no line starting with {heading!r}")
    rows: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows or (heading and line.startswith("#")):
            break
    if not rows:
        raise InputError(f"{where}: no table after {heading!r}" if heading else f"{where}: no table")
    return "\n".join(rows) + "\n"


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def table_cell(table: str, row: str, col: str, where: str = "table") -> str:
    """The cell of markdown ``table`` in the row whose first cell is ``row`` and the column headed ``col``."""
    head, *body = table.splitlines()
    cols = _cells(head)
    if col not in cols:
        raise InputError(f"{where}: no column {col!r} (columns: {', '.join(cols)})")
    hit = next((r for r in map(_cells, body[1:]) if r and r[0] == row), None)
    if hit is None:
        raise InputError(f"{where}: no row {row!r}")
    return hit[cols.index(col)]


def json_value(data: Any, key: str, where: str = "json") -> Any:
    """``data`` at dotted ``key``; a JSON key holding dots matches whole (the longest first), list items by index."""
    parts = key.split(".")
    while parts:
        if isinstance(data, list):
            if not parts[0].lstrip("-").isdigit() or not -len(data) <= int(parts[0]) < len(data):
                raise InputError(f"{where}: no item {parts[0]!r} in a list of {len(data)} at {key!r}")
            data, parts = data[int(parts[0])], parts[1:]
            continue
        if not isinstance(data, dict):
            raise InputError(f"{where}: {key!r} goes past a value")
        n = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in data), 0)
        if not n:
            raise InputError(f"{where}: no key {parts[0]!r} in {key!r}")
        data, parts = data[".".join(parts[:n])], parts[n:]
    return data


def render_value(value: Any, fmt: str | None, where: str = "value") -> str:
    """``value`` as a page shows it: through the format spec ``fmt``, else as JSON writes scalars."""
    if isinstance(value, (dict, list)):
        raise InputError(f"{where}: is a {type(value).__name__}, not a value")
    if not fmt:
        return value if isinstance(value, str) else json.dumps(value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: cannot format {value!r} with {fmt!r} ({exc})") from None


class _Sources:
    """The files blocks read, each read once per run."""

    def __init__(self, root: Path, page: Path) -> None:
        self.root, self.page, self._text = root, page, {}

    def text(self, rel: str, block: str) -> str:
        if rel not in self._text:
            src = self.root / rel
            if not src.is_file():
                raise InputError(f"{self.page}: block {block}: {src} does not exist")
            self._text[rel] = src.read_text(encoding="utf-8")
        return self._text[rel]

    def json(self, rel: str, block: str) -> Any:
        try:
            return json.loads(self.text(rel, block))
        except ValueError as exc:
            raise InputError(f"{self.page}: block {block}: {rel} is not JSON ({exc})") from None


def _kinds(src: _Sources) -> list[tuple[re.Pattern, Callable[[re.Match], str], Callable[[re.Match], str]]]:
    """(pattern, block name, fresh body) per block kind."""
    def table_name(m: re.Match) -> str:
        return f'{m["path"]} "{m["heading"]}"' if m["heading"] is not None else m["path"]

    def table(m: re.Match) -> str:
        if m["kind"] == "benchmark-table" and not m["heading"]:
            raise InputError(f"{src.page}: benchmark-table block {m['path']} needs a heading")
        name = table_name(m)
        return section_table(src.text(m["path"], name), m["heading"] or "", f"{src.page}: block {name}: {m['path']}")

    def value_name(m: re.Match) -> str:
        return f"{m['path']} {m['key']}"

    def value(m: re.Match) -> str:
        where = f"{src.page}: block {value_name(m)}"
        return render_value(json_value(src.json(m["path"], value_name(m)), m["key"], where), m["fmt"], where)

    def cell_name(m: re.Match) -> str:
        return f'{m["path"]} "{m["heading"]}" "{m["row"]}" "{m["col"]}"' + (f" #{m['nth']}" if m["nth"] else "")

    def cell(m: re.Match) -> str:
        where = f"{src.page}: block {cell_name(m)}"
        text = src.text(m["path"], cell_name(m))
        body = table_cell(section_table(text, m["heading"], where), m["row"], m["col"], where)
        if m["nth"] is None:
            return body
        numbers = DECIMAL.findall(body)
        if int(m["nth"]) >= len(numbers):
            raise InputError(f"{where}: {body!r} holds {len(numbers)} decimal number(s), no #{m['nth']}")
        return numbers[int(m["nth"])]

    return [(TABLE, table_name, table), (VALUE, value_name, value), (CELL, cell_name, cell)]


def _check_closed(page: Path, text: str) -> None:
    spans = [m.span("open") for pattern in (TABLE, VALUE, CELL) for m in pattern.finditer(text)]
    for m in OPENING.finditer(text):
        if not any(a <= m.start() < b for a, b in spans):
            line = text.count("\n", 0, m.start()) + 1
            raise InputError(f"{page}:{line}: a {m[1]} block without its closing <!-- /{m[1]} --> (or malformed)")


def sync(page: str | Path, root: str | Path | None = None, check: bool = False) -> list[str]:
    """Rewrite every generated block of ``page`` from its source (paths relative to ``root``, by default the page's
    folder). Returns the blocks that were stale; ``check=True`` writes nothing."""
    page = Path(page)
    root = Path(root) if root is not None else page.parent
    text = page.read_text(encoding="utf-8")
    _check_closed(page, text)
    src, stale = _Sources(root, page), []
    for pattern, name, fresh in _kinds(src):
        def sub(m: re.Match) -> str:
            body = fresh(m)
            if body != m["body"]:
                stale.append(name(m))
            return m["open"] + body + m["close"]
        text = pattern.sub(sub, text)
    if stale and not check:
        with atomic_open(page, "w", encoding="utf-8") as fh:
            fh.write(text)
        log.info("%s: %d block(s) regenerated: %s", page, len(stale), "; ".join(stale))
    return stale


def blocks(page: str | Path) -> list[str]:
    """The generated blocks of ``page``, named as :func:`sync` names them."""
    text = Path(page).read_text(encoding="utf-8")
    return [name(m) for pattern, name, _ in _kinds(_Sources(Path("."), Path(page))) for m in pattern.finditer(text)]


def pages(root: str | Path = ".") -> list[Path]:
    """The pages whose numbers are generated: README.md and every docs/*.md."""
    root = Path(root)
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def sync_all(root: str | Path = ".", check: bool = False) -> dict[str, list[str]]:
    """:func:`sync` on every page of :func:`pages` (sources relative to ``root``): page -> its stale blocks."""
    return {str(p): s for p in pages(root) if (s := sync(p, root, check))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dfpipe.docs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="the repository root (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is stale")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        stale = sync_all(args.root, check=args.check)
    except InputError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.check and stale:
        for page, names in stale.items():
            print(f"{page}: stale: {'; '.join(names)}", file=sys.stderr)
        print("run `make docs` (python -m dfpipe.docs) to regenerate them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
