"""Stage 1 outputs: manifest, near-duplicates and report from the committed chunks; the store renamed into
place with its ``store.json`` (the stage-1 part of the preprocessing contract)."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from ..io import atomic_open, write_csv, write_json
from ..layout import Layout
from ..data.datacard import data_card, read_dataset_card, write_data_card
from ..data.dedup import DUP_COLUMNS, dedup_report, find_duplicates_arrays, to_uint64
from ..data.preprocess import Stage1
from ..data.store import write_store_record
from .sources import SPLITS, Collected, Item, InputSet
from .work import MANIFEST_COLUMNS, Work

log = logging.getLogger(__name__)
REPORT_EXAMPLES = 100  # unlabelled / ignored files named in the report (all are counted)


class Tally:
    """Counts and hash arrays gathered from the committed chunks (O(N) small numbers, no rows)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {k: Counter() for k in ("images", "fake", "labels", "converted", "faces",
                                                                  "ds_ok", "ds_failed", "stored")}
        self.file_bytes = self.stored_bytes = 0
        self.failed: list[dict] = []
        self.n_rows = self.n_converted = 0
        self.hashed: list[np.ndarray] = []  # manifest row numbers of hashed images, per chunk
        self.uids: list[np.ndarray] = []
        self.splits: list[np.ndarray] = []
        self.ph: list[np.ndarray] = []
        self.dh: list[np.ndarray] = []
        self.digest: list[np.ndarray] = []

    def add(self, df: pd.DataFrame) -> None:
        ok = (df.cache_index != "-1").to_numpy()
        c = self.counts
        c["images"].update(df.split[ok])
        c["fake"].update(df.split[ok & (df.label == "1").to_numpy()])
        c["labels"].update(df.label[ok & (df.split != "test").to_numpy()])
        c["ds_ok"].update(df.dataset[ok])
        c["ds_failed"].update(df.dataset[~ok])
        conv = df.converted[df.converted != ""]
        self.n_converted += len(conv)
        c["converted"].update(k for notes in conv for k in notes.split(";"))
        c["faces"].update(df.face[df.face != ""].str.replace(r"_of_\d+$", "_of_n", regex=True))
        c["stored"].update(df.stored[ok])
        self.file_bytes += int(df.file_bytes[ok].astype(np.int64).sum())
        self.stored_bytes += int(df.stored_bytes[ok].astype(np.int64).sum())
        for r in df[~ok].itertuples():
            self.failed.append({"split": r.split, "dataset": r.dataset, "file": r.path, "kind": r.error_kind,
                                "reason": r.error})
        h = (df.phash != "").to_numpy()
        self.hashed.append(np.flatnonzero(h) + self.n_rows)
        self.uids.append(df.uid[h].to_numpy())
        self.splits.append(df.split[h].to_numpy())
        self.ph.append(to_uint64(df.phash[h]))
        self.dh.append(to_uint64(df.dhash[h]))
        self.digest.append(df.digest[h].to_numpy(dtype="S32"))
        self.n_rows += len(df)

    def duplicates(self, max_distance: int) -> tuple[pd.DataFrame, np.ndarray, dict]:
        """(pairs, dup_group per manifest row, summary)."""
        cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))  # noqa: E731
        pairs, gid = find_duplicates_arrays(cat(self.uids, object), cat(self.splits, object),
                                            cat(self.ph, np.uint64), cat(self.dh, np.uint64),
                                            cat(self.digest, "S32"), max_distance)
        dup = np.full(self.n_rows, -1, np.int64)
        dup[cat(self.hashed, np.int64)] = gid
        return pairs, dup, dedup_report(pairs, gid, max_distance)


def _committed(work: Work, items: list[Item]) -> Iterator[pd.DataFrame]:
    for split, k, _ in work.chunks(items):
        yield pd.read_csv(work.chunk_file(split, k), dtype=str, keep_default_na=False)


def publish(layout: Layout, col: Collected, work: Work, s1: Stage1, dup_max_distance: int) -> dict:
    """Manifest, dedup (pHash distance <= ``dup_max_distance``), report: then rename the store (of images made
    by ``s1``) onto ``layout.prepared`` and drop the work dir. Everything is worked out from the committed chunks
    first, then written."""
    tally = Tally()
    for df in _committed(work, col.items):
        tally.add(df)
    _check_usable(tally.counts["labels"])
    pairs, dup, dup_summary = tally.duplicates(dup_max_distance)
    _log_duplicates(dup_summary)
    report = _report(s1, col, tally)
    report["duplicates"] = dup_summary
    card = _data_card(layout.data_root, col.sources, tally)
    report["data"] = card
    n_rows = _write_manifest(work.cache / "manifest.csv", _committed(work, col.items), dup)
    write_store_record(work.cache, s1, manifest_rows=n_rows)  # readers verify the manifest against it
    write_data_card(work.cache, card)  # what the models will have been trained on: stage 5 puts it in its card
    out = Path(layout.prepared)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work.cache, out)  # a rename: the store is never copied
    write_csv(layout.duplicates, pairs[DUP_COLUMNS])
    write_json(layout.prepare_report, report)
    shutil.rmtree(work.path)
    log.info("prepared %d images (%s), skipped %d; store %.1f MB = %.2fx the input files (%s)",
             sum(tally.counts["images"].values()), dict(tally.counts["images"]), report["n_skipped"],
             tally.stored_bytes / 1e6, report["store"]["ratio"], dict(tally.counts["stored"]))
    return report


def _data_card(data_root: str | Path, sources: list[InputSet], tally: Tally) -> dict:
    """The store's data card: labelled images kept per split and class, and whether a dataset card of the inputs
    (the data root's, or a dataset folder's) says they are the demo's."""
    folders = dict.fromkeys([Path(data_root), *(s.images for s in sources)])
    cards = [c for c in map(read_dataset_card, folders) if c is not None]
    c = tally.counts
    counts = {s: {"real": c["images"][s] - c["fake"][s], "fake": c["fake"][s]} for s in ("train", "val")}
    return data_card(data_root, cards, counts)


def _write_manifest(path: Path, chunks: Iterable[pd.DataFrame], dup: np.ndarray) -> int:
    """Stream the committed chunks into one CSV (values are written back as read: same bytes); its row count."""
    pos = 0
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        pd.DataFrame(columns=MANIFEST_COLUMNS).to_csv(fh, index=False)
        for df in chunks:
            df["dup_group"] = dup[pos:pos + len(df)].astype(str)
            pos += len(df)
            df[MANIFEST_COLUMNS].to_csv(fh, index=False, header=False)
    return pos


def _log_duplicates(summary: dict) -> None:
    log.info("duplicates (pHash distance <= %d): %d pairs %s", summary["max_distance"], summary["n_pairs"],
             summary["pairs"])
    cross = sum(v for k, v in summary["pairs"].items() if not k.startswith("within_"))
    if cross:
        log.warning("%d near-duplicate pairs across train/val/test: possible leakage (see the duplicates csv)", cross)


def _check_usable(labels: Counter) -> None:
    """``labels``: decodable labelled images per label ("0"/"1")."""
    if not labels:
        raise DataError("no usable labelled image: check data_root and the label files")
    if len(labels) < 2:
        raise DataError(f"labelled images hold one class only (label {next(iter(labels))}): need real and fake")


def _report(s1: Stage1, col: Collected, tally: Tally) -> dict:
    """The report's counts; its settings are those the stored images were made with (``s1``)."""
    skipped = col.skipped + tally.failed
    c = tally.counts
    datasets = {name: {"n_listed": n, "n_images": c["ds_ok"][name], "n_failed": c["ds_failed"][name],
                       "n_missing": sum(1 for s in col.skipped if s["dataset"] == name)}
                for name, n in col.listed.items()}
    return {
        "max_side": s1.max_side,
        "store": {"bytes": tally.stored_bytes, "input_bytes": tally.file_bytes,
                  "ratio": round(tally.stored_bytes / max(1, tally.file_bytes), 4),
                  **{f"n_{k}": c["stored"][k] for k in ("original", "png")}},
        "n_images": {s: c["images"][s] for s in SPLITS},
        "n_fake": {s: c["fake"][s] for s in ("train", "val")},
        "n_skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["kind"] for s in skipped).items())),
        "skipped": skipped,
        "n_converted": tally.n_converted,
        "converted_by_kind": dict(sorted(c["converted"].items())),
        "n_unlabelled": len(col.unlabelled),
        "unlabelled": col.unlabelled[:REPORT_EXAMPLES],
        "n_ignored_files": len(col.ignored),
        "ignored_files": col.ignored[:REPORT_EXAMPLES],
        "datasets": datasets,
        "faces": {"detector": s1.face_crop, **dict(sorted(c["faces"].items()))},
    }
