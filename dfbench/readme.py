"""The README's benchmark tables: now one kind of :mod:`dfpipe.docs` block, which also holds single values and
table cells and covers docs/*.md. Kept so that ``from dfbench.readme import sync_readme`` still works.

A block of a page between::

    <!-- benchmark-table: reports/benchmark/table.md "### summary (ROC AUC" -->
    ...
    <!-- /benchmark-table -->

is the first markdown table after the line starting with that heading in that file (a path relative to the
repository root). :func:`sync_readme` rewrites every block of one page (``bench/benchmark.py readme`` every page,
run by ``make benchmark`` after the table); with ``check=True`` it only lists the stale blocks.
"""

from __future__ import annotations

from dfpipe.docs import TABLE as BLOCK  # the table blocks' pattern (dfbench re-exports it)
from dfpipe.docs import blocks as readme_blocks
from dfpipe.docs import section_table
from dfpipe.docs import sync as sync_readme

__all__ = ["BLOCK", "readme_blocks", "section_table", "sync_readme"]
