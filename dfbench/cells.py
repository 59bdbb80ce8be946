"""One cell of the grid: the stages run in folders of their own (a client of the stages through Layout.under)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from dfpipe.config import (STAGE_CONFIGS, DatasetConfig, EvalSetConfig, ExpertConfig, PrepareConfig, TrainConfig,
                      from_dict, read_params)
from dfpipe.ensemble_predict.provenance import code_version
from dfpipe.io import write_csv, write_json
from dfpipe.layout import Layout

from .grid import GridSpec, Source, TrainingSet, groups_of, recipe_config, train_parts

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- one source's shared stages
def _write_labels(path: Path, df: pd.DataFrame) -> None:
    write_csv(path, pd.DataFrame({"img_name": df.img_name, "target": df.label}))


# The benchmark is a client of the stages: a training set's folder is the layout of the params file with the
# outputs of SOURCE_STAGES moved under it, a cell's folder the same with CELL_STAGES' outputs moved under the cell
# (Layout.under), so an output a stage adds to the catalog lands in the cell with no edit here.
SOURCE_STAGES = ("prepare_data", "augment_sd", "cluster_split")  # once per training set, shared by its cells
CELL_STAGES = ("train_experts", "ensemble_predict", "evaluate")  # once per cell


def source_layout(spec: GridSpec, name: str, work: str | Path) -> Layout:
    """Where stages 1-3 of training set ``name`` read and write: ``<work>/<name>/`` (its data root: that folder,
    which holds the label files :func:`prepare_source` writes; image folders are absolute)."""
    d = Path(work) / name
    return Layout.load(spec.params).under(d, SOURCE_STAGES, data_root=str(d.resolve()))


def cell_layout(spec: GridSpec, name: str, work: str | Path, cell: Path) -> Layout:
    """A cell's layout: its training set's stages 1-3, stages 4-6 in ``cell``, eval sets under the grid's data
    root, no test labels (the benchmark's held-out sets are stage 6's)."""
    return source_layout(spec, name, work).under(cell, CELL_STAGES, data_root=str(Path(spec.data_root).resolve()),
                                                 test_labels="")


def stage_config(spec: GridSpec, stage: str, grid: dict[str, Any] | None = None, **over: Any) -> Any:
    """Stage ``stage``'s settings: params.yaml's section, the grid's overrides of it (or ``grid``, in their place;
    both checked), then ``over`` (typed values from the benchmark itself)."""
    return dataclasses.replace(from_dict(STAGE_CONFIGS[stage], section(spec, stage, grid), f"{spec.params}:{stage}"),
                               **over)


def prepare_source(spec: GridSpec, src: Source | TrainingSet, work: Path) -> Layout:
    """Stages 1-3 on the source's training part, or on the training parts of a combined set's sources together,
    in ``<work>/<name>/``, once (a later call reuses them). Returns their layout."""
    from dfpipe import augment_sd, cluster_split, prepare_data

    layout = source_layout(spec, src.name, work)
    d = Path(work) / src.name
    shared = shared_settings(spec)
    if Path(layout.splits).is_file() and read_json(d / SHARED_RECORD) == shared:
        return layout
    datasets = _combined_datasets(src, d) if isinstance(src, TrainingSet) else _source_datasets(src, d)
    prepare_data.run(PrepareConfig(max_side=spec.max_side,
                                   datasets=[from_dict(DatasetConfig, ds, "dataset") for ds in datasets]), layout)
    augment_sd.run(stage_config(spec, "augment_sd"), layout)
    split = cluster_split.run(stage_config(spec, "cluster_split"), layout)
    groups = groups_across_folds(split, train_parts(src))
    if groups["n_across_val"]:
        log.warning("%s: %d of %d image groups (pairs, identities) have members in the val fold and in a training "
                    "fold (stage 3 keeps only near-duplicates and clusters together; only selection sees val)",
                    src.name, groups["n_across_val"], groups["n_groups"])
    write_json(d / GROUPS_RECORD, groups)
    write_json(d / SHARED_RECORD, shared)  # last: it vouches for the folder
    return layout


SHARED_RECORD = "shared.json"
GROUPS_RECORD = "groups.json"  # how stage 3's folds cut the sources' groups (groups_across_folds)


def groups_across_folds(split: pd.DataFrame, parts: list[Source]) -> dict[str, Any]:
    """How many groups of several images (a dfdc pair, a genphotos identity) stage 3 put in more than one fold, and
    how many have members in the val fold and outside it (what leaks into selection). ``split`` is stage 3's table
    (stage 1's names: ``<source>/<img_name>`` when several sources feed it)."""
    prefix = len(parts) > 1
    group = {f"{p.name}/{n}" if prefix else n: f"{p.name}:{g}"
             for p in parts for n, g in zip(p.train.img_name, groups_of(p.train))}
    orig = split[split.origin != "aug"]
    df = pd.DataFrame({"group": orig.img_name.map(group), "fold": orig.fold, "val": orig.subset == "val"}).dropna()
    sizes = df.groupby("group").size()
    df = df[df.group.isin(sizes.index[sizes > 1])]
    per = df.groupby("group").agg(folds=("fold", "nunique"), some_val=("val", "max"), all_val=("val", "min"))
    return {"n_groups": int(len(per)), "n_across_folds": int((per.folds > 1).sum()),
            "n_across_val": int((per.some_val & ~per.all_val).sum())}


def _source_datasets(src: Source, d: Path) -> list[dict[str, str]]:
    """Stage 1's input for one source: its training part (``<d>/train_labels.csv``), images under its root."""
    labels = d / "train_labels.csv"
    _write_labels(labels, src.train)
    return [{"name": src.name, "split": "train", "images": str(src.root.resolve()), "labels": str(labels.resolve())}]


def _combined_datasets(ts: TrainingSet, d: Path) -> list[dict[str, str]]:
    """Stage 1's input for a combined set: one dataset per source (its training part in
    ``<d>/train_labels_<source>.csv``), absolute image folders since each source has its own root. Stage 1 names
    the images ``<source>/<img_name>`` (several datasets feed one split); nothing after stage 5 reads those names:
    stage 6 lists the held-out sets from their own label files (:func:`eval_sets`)."""
    datasets = []
    for src in ts.parts:
        labels = d / f"train_labels_{src.name}.csv"
        _write_labels(labels, src.train)
        datasets.append({"name": src.name, "split": "train", "images": str(src.root.resolve()),
                         "labels": str(labels.resolve())})
    return datasets


def shared_settings(spec: GridSpec) -> dict[str, Any]:
    """What a source's stages 1-3 depend on (beyond its files): a work folder made with other settings, or by
    an older stage 1 (another store format), is made again rather than reused."""
    from dfpipe.data.store import STORE_FORMAT

    grid = omit_later({"max_train_per_source": spec.max_train_per_source}, "grid")
    return json.loads(json.dumps({"max_side": spec.max_side, "store_format": STORE_FORMAT, "heldout": spec.heldout,
                                  "split_seed": spec.split_seed, **grid,
                                  "augment_sd": omit_later(section(spec, "augment_sd"), "augment_sd"),
                                  "cluster_split": omit_later(section(spec, "cluster_split"), "cluster_split")}))


# Settings added after the benchmark's cells were first cached, each with the value at which it is left out of
# the cache keys (the value that does what the code did before the setting existed). A new switch left at that
# value keeps every finished cell and source folder valid; any other value makes a new cell. A setting missing
# here changes every key: all cells are recomputed (safe, only slow). Dotted names reach into nested sections.
KEY_OMIT_AT: dict[str, dict[str, Any]] = {
    "expert": {"info_heads": 0, "info_mi": "kl", "info_temperature": 1.5, "mixup": 0.0,  # LIL / GIL, mixup
               "loss.lil": 0.0, "loss.gil": 0.0, "freeze_backbone": False,  # + the frozen-backbone probe
               "front": "none", "stages": 0, "pair_batches": False},  # + the artifact front and cut; pair batches
    "augment_sd": {"landmarks": "none",  # self_blend's mask from face landmarks
                   # reconstruction fakes: off (per_real 0) leaves the whole block out, whatever its other settings
                   "reconstruct": lambda block: isinstance(block, dict) and not block.get("per_real")},
    "cluster_split": {},
    "grid": {"max_train_per_source": 0,  # GridSpec settings of stage 1's input (the training parts)
             "max_eval_per_source": 0, "in_source_eval": True},  # and of the scored parts (cell key only)
}


def omit_later(d: dict[str, Any], section: str) -> dict[str, Any]:
    """``d`` (a settings mapping) without the :data:`KEY_OMIT_AT` entries of ``section`` at their omit value (or, for
    a callable, where it says the setting is off)."""
    out = copy.deepcopy(d)
    for dotted, value in KEY_OMIT_AT[section].items():
        *parents, leaf = dotted.split(".")
        node = out
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and (value(node[leaf]) if callable(value) else node[leaf] == value):
            del node[leaf]
    return out


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def section(spec: GridSpec, name: str, grid: dict[str, Any] | None = None) -> dict[str, Any]:
    """A params.yaml section with the grid's overrides, or ``grid`` in their place (nested mappings are replaced,
    not merged)."""
    return {**(read_params(spec.params).get(name) or {}), **(getattr(spec, name, {}) if grid is None else grid)}


def eval_sets(spec: GridSpec, train_src: Source | TrainingSet, sources: dict[str, Source],
              work: Path) -> list[EvalSetConfig]:
    """The in-source held-out part of each source trained on (unless ``spec.in_source_eval`` is off) and the cross
    part of every other source."""
    trained = {s.name for s in train_parts(train_src)}
    out = []
    for name, src in sources.items():
        if name in trained and not spec.in_source_eval:
            continue
        df = src.heldout if name in trained else src.cross
        labels = work / "eval_labels" / f"{name}_{'heldout' if name in trained else 'cross'}.csv"
        _write_labels(labels, df)
        out.append(EvalSetConfig(name=name, images=str(src.root), labels=str(labels.resolve())))
    return out


# ----------------------------------------------------------------------------- one cell
def cell_key(spec: GridSpec, ecfg: ExpertConfig) -> str:
    """8 hex digits of everything a cell's result depends on: a changed recipe, budget, stage-1 setting or store
    format is a new cell (cells of the former uint8-cache stage 1 are never reused); a setting added later at
    its "off" value (:data:`KEY_OMIT_AT`) is not."""
    key = json.dumps({"expert": omit_later(dataclasses.asdict(ecfg), "expert"), "predict": spec.ensemble_predict,
                      "evaluate": spec.evaluate, **omit_later({"max_eval_per_source": spec.max_eval_per_source,
                                                               "in_source_eval": spec.in_source_eval}, "grid"),
                      **shared_settings(spec)}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def cell_dir(spec: GridSpec, recipe: str, seed: int, train_source: str, work: str | Path) -> Path:
    """``<work>/<source>/<recipe>_s<seed>_<key>``: one cell's folder (``eval.json`` in it = finished)."""
    return Path(work) / train_source / f"{recipe}_s{seed}_{cell_key(spec, recipe_config(spec, recipe, seed))}"


def finished_cell(spec: GridSpec, recipe: str, seed: int, train_source: str, work: str | Path) -> dict | None:
    """A finished cell's result (its ``eval.json``), or None: what :func:`run_cell` would return without running."""
    return read_json(cell_dir(spec, recipe, seed, train_source, work) / "eval.json")


CODE = ("dfpipe", "dfbench")  # what trains a cell: the stages and the protocol (splits, caps): -dirty if either moved


@functools.cache
def process_code_version() -> str:
    """:func:`code_version` (of :data:`CODE`) as this process first saw it: the code it runs was imported then, and
    a commit made while a long grid runs moves HEAD, not the code in memory. Recorded in every new cell: the cell key
    covers settings, not code, and a change of training numerics far below the settings' level (the last bits of a
    float) moves a cell's cross-source AUC by up to 0.2."""
    return code_version(paths=CODE)


def run_cell(spec: GridSpec, recipe: str, seed: int, train_src: Source | TrainingSet, sources: dict[str, Source],
             work: Path) -> dict:
    """Train one recipe on one source (or a combined set) with one seed, select on its val fold, evaluate on the
    held-out sets.

    Reuses a finished cell (its ``eval.json``) so an interrupted grid resumes where it stopped.
    """
    from dfpipe.train_experts.loop import train_expert

    ecfg = recipe_config(spec, recipe, seed)
    cell = cell_dir(spec, recipe, seed, train_src.name, work)
    done = cell / "eval.json"
    if done.is_file():  # the scores' path as seen from here (a cell made from another folder stored its own)
        return {**json.loads(done.read_text()), "scores_csv": cell_layout(spec, train_src.name, work, cell).eval_scores}
    code = process_code_version()
    prepare_source(spec, train_src, work)
    layout = cell_layout(spec, train_src.name, work, cell)
    t0 = time.perf_counter()
    best, _ = train_expert(TrainConfig(workers=-1, experts={recipe: ecfg}), layout, recipe,
                           history_csv=cell / "history.csv")
    train_s = time.perf_counter() - t0
    metrics = select_and_evaluate(spec, layout, [recipe], train_src, sources, work)
    result = {"train_source": train_src.name, "recipe": recipe, "seed": seed, "selection_val": best,
              "train_seconds": train_s, "code": code, "eval": metrics, "scores_csv": layout.eval_scores}
    write_json(done, result)
    return result


def select_and_evaluate(spec: GridSpec, layout: Layout, experts: list[str], train_src: Source | TrainingSet,
                         sources: dict[str, Source], work: Path, predict: dict[str, Any] | None = None) -> dict:
    """Stage 5 over the cell's models (the val fold: epoch already chosen, thresholds, the card; ``predict``: the
    grid's stage 5 overrides, default ``spec.ensemble_predict``), then stage 6 on the sets no step saw. Returns
    stage 6's metrics."""
    from dfpipe import ensemble_predict, evaluate

    ensemble_predict.run(stage_config(spec, "ensemble_predict", predict, experts=list(experts)), layout)
    return evaluate.run(stage_config(spec, "evaluate", sets=eval_sets(spec, train_src, sources, work)), layout)
