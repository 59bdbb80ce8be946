"""Stage 1 inputs: the datasets to read (params or the competition layout) and the images they list."""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import ConfigError, PrepareConfig
from ..errors import InputError
from ..layout import Layout
from ..data.datacard import DATASET_CARD
from ..data.images import scan_folder
from ..data.labels import read_labels, read_names

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class InputSet:
    """One resolved input dataset of stage 1 (an image folder, its labels, its split)."""

    name: str
    split: str
    images: Path
    labels: Path | None  # None: every image file of ``images``
    optional: bool = False  # competition layout: a missing val / test set is a warning, not an error


@dataclass(frozen=True, slots=True)
class Item:
    split: str
    img_name: str
    label: int
    path: str
    dataset: str


@dataclass
class Collected:
    items: list[Item] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # listed but missing files
    unlabelled: list[str] = field(default_factory=list)  # image files no label file lists (ignored)
    ignored: list[str] = field(default_factory=list)  # non-image files in an image folder (ignored)
    listed: dict[str, int] = field(default_factory=dict)  # dataset -> images listed
    sources: list[InputSet] = field(default_factory=list)  # the datasets read (resolved once: the data card needs them)


def resolve_sources(cfg: PrepareConfig, layout: Layout) -> list[InputSet]:
    """The datasets to read: ``cfg.datasets`` or, when empty, the competition layout of ``layout.data_root``."""
    root = Path(layout.data_root)
    if not root.is_dir():
        raise InputError(f"data_root {root} does not exist (set paths.data_root in params.yaml)")
    if not cfg.datasets:
        lay = layout
        return [InputSet(lay.train_dir, "train", root / lay.train_dir, root / lay.train_labels),
                InputSet(lay.val_dir, "val", root / lay.val_dir, root / lay.val_labels, optional=True),
                InputSet(lay.test_dir, "test", root / lay.test_dir, None, optional=True)]
    seen: set[str] = set()
    sources = []
    for i, d in enumerate(cfg.datasets):
        where = f"prepare_data.datasets[{i}]"
        if not DATASET_NAME.match(d.name) or d.name in seen:
            raise ConfigError(f"{where}.name={d.name!r}: give each dataset a unique name of letters, digits, _ . -")
        if d.split not in SPLITS:
            raise ConfigError(f"{where}.split={d.split!r}: choose one of {list(SPLITS)}")
        if not d.images:
            raise ConfigError(f"{where}.images is empty: give the image folder (relative to data_root)")
        if d.split != "test" and not d.labels:
            raise ConfigError(f"{where}.labels is empty: a {d.split} dataset needs a label CSV img_name,target")
        seen.add(d.name)
        sources.append(InputSet(d.name, d.split, root / d.images, root / d.labels if d.labels else None))
    return sources


def collect_items(cfg: PrepareConfig, layout: Layout) -> Collected:
    """List the images of every dataset, in params order then label-file order; report missing ones.

    When several datasets feed one split, img_name becomes ``<dataset>/<name>`` so it stays unique.
    """
    sources = resolve_sources(cfg, layout)
    per_split = Counter(s.split for s in sources)
    out = Collected(sources=sources)
    for src in sources:
        prefix = f"{src.name}/" if per_split[src.split] > 1 else ""
        _collect_source(src, cfg.limit, prefix, out)
    return out


def _collect_source(src: InputSet, limit: int, prefix: str, out: Collected) -> None:
    if src.optional and not _present(src):
        return
    table = _listing(src)
    if not src.images.is_dir():
        raise InputError(f"{src.images}: image folder of dataset {src.name!r} not found (check the path)")
    on_disk, others = scan_folder(src.images)
    if table is None:  # a folder of test images: every image file, sorted
        table = pd.DataFrame({"img_name": on_disk, "label": -1, "line": 0})
    if limit:
        table = table.head(limit)
    present = set(on_disk)
    n0 = len(out.items)
    for name, label, line in zip(table.img_name, table.label, table.line):
        path = src.images / name
        if name not in present and not path.is_file():
            reason = f"listed in {src.labels}:{line} but the file does not exist (add the file or delete the row)"
            log.warning("%s: %s", path, reason)
            out.skipped.append({"split": src.split, "dataset": src.name, "file": str(path), "kind": "missing_file",
                                "reason": reason})
            continue
        out.items.append(Item(src.split, prefix + name, int(label), str(path), src.name))
    out.listed[src.name] = len(table)
    if not limit:
        listed = set(table.img_name)
        _note_unlisted(src, sorted(present - listed), [n for n in others if n not in listed], out)
    log.info("%s (%s): %d images listed, %d found", src.name, src.split, len(table), len(out.items) - n0)


def _present(src: InputSet) -> bool:
    """Whether an optional layout set exists; warn when it does not."""
    if src.labels is not None and not src.labels.exists():
        log.warning("%s: no validation labels; the cluster split will make the validation fold", src.labels)
        return False
    if src.labels is None and not src.images.is_dir():
        log.warning("%s: no test folder; the submission will have no rows", src.images)
        return False
    return True


def _listing(src: InputSet) -> pd.DataFrame | None:
    """(img_name, label, line) rows of the dataset's label file or name list; None: list the folder."""
    if src.labels is None:
        return None
    if src.split == "test":
        return read_names(src.labels).assign(label=-1)
    return read_labels(src.labels)


def _note_unlisted(src: InputSet, unlisted: list[str], others: list[str], out: Collected) -> None:
    """Warn (once per dataset) about unlisted image files and unlisted non-image files; both are ignored."""
    if unlisted:
        log.warning("%s: %d image files are not listed in %s and are ignored, e.g. %s",
                    src.images, len(unlisted), src.labels, unlisted[0])
        out.unlabelled += [str(src.images / n) for n in unlisted]
    label_file = src.labels.resolve() if src.labels is not None else None
    others = [n for n in others if (src.images / n).resolve() != label_file and n != DATASET_CARD]
    if others:
        log.warning("%s: %d files without an image extension are ignored, e.g. %s", src.images, len(others), others[0])
        out.ignored += [str(src.images / n) for n in others]
