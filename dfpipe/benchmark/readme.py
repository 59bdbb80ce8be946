"""The README's benchmark tables, regenerated from the grid's own ``table.md`` files (never typed by hand).

A block of the README between::

    <!-- benchmark-table: reports/benchmark/table.md "### summary (ROC AUC" -->
    ...
    <!-- /benchmark-table -->

is the first markdown table after the line starting with that heading in that file (a path relative to the
repository root). :func:`sync_readme` rewrites every such block (``bench/benchmark.py readme``, run by
``make benchmark`` after the table); with ``check=True`` it only lists the stale blocks, which the test suite
uses so that a README number can never drift from the grid that produced it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..errors import InputError
from ..io import atomic_open

log = logging.getLogger(__name__)

BLOCK = re.compile(r'(?P<open><!-- benchmark-table: (?P<path>\S+) "(?P<heading>[^"\n]+)" -->\n)(?P<body>.*?)'
                   r'(?P<close><!-- /benchmark-table -->)', re.S)


def section_table(text: str, heading: str, where: str = "table") -> str:
    """The first markdown table (consecutive lines starting with ``|``) after the first line of ``text`` that starts
    with ``heading``; ends with a newline."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        raise InputError(f"{where}: no line starting with {heading!r}")
    rows: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows or line.startswith("#"):
            break
    if not rows:
        raise InputError(f"{where}: no table after {heading!r}")
    return "\n".join(rows) + "\n"


def sync_readme(readme: str | Path, root: str | Path | None = None, check: bool = False) -> list[str]:
    """Rewrite every benchmark-table block of ``readme`` from its table file (paths relative to ``root``, by
    default the README's folder). Returns the blocks that were stale (``path "heading"``); ``check=True`` writes
    nothing. A missing table file or heading is an error naming the README and the block."""
    readme = Path(readme)
    root = Path(root) if root is not None else readme.parent
    text = readme.read_text(encoding="utf-8")
    stale: list[str] = []

    def fresh(m: re.Match) -> str:
        name = f'{m["path"]} "{m["heading"]}"'
        src = root / m["path"]
        if not src.is_file():
            raise InputError(f"{readme}: benchmark-table block {name}: {src} does not exist")
        body = section_table(src.read_text(encoding="utf-8"), m["heading"], f"{readme}: block {name}: {src}")
        if body != m["body"]:
            stale.append(name)
        return m["open"] + body + m["close"]

    new = BLOCK.sub(fresh, text)
    if stale and not check:
        with atomic_open(readme, "w", encoding="utf-8") as fh:
            fh.write(new)
        log.info("%s: %d benchmark table(s) regenerated: %s", readme, len(stale), "; ".join(stale))
    return stale


def readme_blocks(readme: str | Path) -> list[str]:
    """The README's benchmark-table blocks, as ``path "heading"``."""
    return [f'{m["path"]} "{m["heading"]}"' for m in BLOCK.finditer(Path(readme).read_text(encoding="utf-8"))]
