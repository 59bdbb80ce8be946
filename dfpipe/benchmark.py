"""The development benchmark: leave-one-source-out over ``../shared/data``, every recipe against the
seed-style baseline, with the same data, folds, epochs and seeds.

For each training set, each recipe and each seed, one *cell* runs the pipeline's own stages in-process, in a work
folder of its own (``<work>/<training set>/...``). A training set is one source (the default: each of ``sources``
alone, folder ``<work>/<source>/``) or several trained on at once (``train_on: [a+b, ...]``, folder
``<work>/a+b/``; same cell keys, so the two kinds share a work folder without touching each other):

1. stage 1 on the training part of each source of the set only (the held-out parts are never prepared); a
   combined set reads one dataset per source (stage 1 names its images ``<source>/<img_name>``);
2. stage 2 (editing fakes) and stage 3 (cluster split) once per training set, shared by every recipe, so
   all rows train on the same folds; recipes with ``use_augmented: false`` ignore the generated images;
3. stage 4 (one expert: the recipe), stage 5 (val fold: epoch selection and verdict thresholds);
4. stage 6 on the sets no step above saw: the held-out part of each source trained on (the *in-source* columns)
   and the other sources (the *leave-one-source-out* columns).

The selection fold (stage 3's val fold) is never a reported column: every number in the table comes
from stage 6. Held-out parts: ``yonsei_faces`` keeps its own ``valset``; the two folder sources are
split 70/30 with a fixed seed (``genphotos_frll`` by identity: ``NNN_03`` and ``NNN_08`` are one person).
Cross-source columns use ``yonsei_faces/valset`` and the whole of the other two sources.

Ensemble rows (``ensembles:`` of the grid): the finished cells of two or more recipes, same training source and
seed, combined by stage 5 and scored by stage 6 like any cell, without training (:func:`run_ensemble`).

Results: ``<out>/grid.json`` (every cell's stage-6 metrics), ``<out>/table.md`` (AUC per seed and their
mean, TPR at FPR 1e-2, mean of the leave-one-source-out columns, the difference to the baseline with a
paired bootstrap interval over the images). With combined training sets the table adds a summary of them: their
cross-source AUC "together" beside the same recipe's single-source cells of the same sources "alone" (read from
the work folder, e.g. left there by ``bench/grid.yaml``; never trained by such a grid).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from .config import (STAGE_CONFIGS, DatasetConfig, EvalSetConfig, ExpertConfig, PrepareConfig, TrainConfig,
                     from_dict, read_params)
from .errors import ConfigError, InputError, UnknownNameError
from .io import atomic_open, write_csv, write_json
from .layout import Layout

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """A labelled source of ``../shared/data``: its training part and its held-out part."""

    name: str
    train: pd.DataFrame  # img_name (relative to root), label
    heldout: pd.DataFrame  # img_name, label: the in-source column
    cross: pd.DataFrame  # img_name, label: what other sources' cells are evaluated on
    root: Path


def _folder_items(root: Path) -> pd.DataFrame:
    """``real/**`` = 0, ``fake/**`` = 1, listed as stage 6 lists a folder set."""
    from .evaluate import list_class_folders

    if not ((root / "real").is_dir() or (root / "fake").is_dir()):
        raise InputError(f"{root}: no images under real/ or fake/")
    return list_class_folders(root.name, root)


_SAME_PERSON = re.compile(r"^(\d+)_(03|08)$")  # genphotos_frll: NNN_03 (neutral) and NNN_08 (smiling)


def identity_group(img_name: str) -> str:
    """``real/001_03.jpg`` and ``real/001_08.jpg`` -> ``real/001`` (one person, never on both sides of a
    split); any other file is a group of its own."""
    p = Path(img_name)
    m = _SAME_PERSON.match(p.stem)
    return f"{p.parent.as_posix()}/{m.group(1) if m else p.stem}"


def split_groups(items: pd.DataFrame, groups: pd.Series, heldout: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random (train, held-out) split of whole groups, stratified by label; deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(items), bool)
    for label in (0, 1):
        uniq = np.array(sorted(set(groups[items.label == label])))
        pick = set(rng.permutation(uniq)[: int(round(heldout * len(uniq)))])
        held |= (items.label == label).to_numpy() & groups.isin(pick).to_numpy()
    return items[~held].reset_index(drop=True), items[held].reset_index(drop=True)


def load_source(root: Path, heldout: float = 0.3, seed: int = 0) -> Source:
    """A source in the competition layout (trainset/ + valset/ label CSVs) or as real/ + fake/ folders."""
    from .data.labels import read_labels

    root = Path(root).resolve()
    if (root / "trainset_label.txt").is_file():
        tr = read_labels(root / "trainset_label.txt")[["img_name", "label"]]
        va = read_labels(root / "valset_label.txt")[["img_name", "label"]]
        tr["img_name"] = "trainset/" + tr.img_name
        va["img_name"] = "valset/" + va.img_name
        return Source(root.name, tr, va, va, root)
    items = _folder_items(root)
    train, held = split_groups(items, items.img_name.map(identity_group), heldout, seed)
    return Source(root.name, train, held, items, root)


@dataclass(frozen=True)
class TrainingSet:
    """Several sources trained on at once (a ``train_on`` entry ``a+b``): stage 1 reads the training part of each,
    and each one's held-out part is an in-source column. A single source is trained on as its :class:`Source`."""

    name: str  # "a+b": the parts in the order written (stage 1's order), the folder <work>/<name>/
    parts: tuple[Source, ...]


def training_set(name: str, sources: dict[str, Source]) -> Source | TrainingSet:
    """What a cell trained on ``name`` reads: ``sources[name]``, or a :class:`TrainingSet` of ``a+b``'s parts."""
    if not is_combined(name):
        return sources[name]
    return TrainingSet(name, tuple(sources[p] for p in set_parts(name)))


def train_parts(train: Source | TrainingSet) -> list[Source]:
    """The sources a cell trains on: the one source, or a combined set's parts."""
    return list(train.parts) if isinstance(train, TrainingSet) else [train]


# ----------------------------------------------------------------------------- grid spec
@dataclass(frozen=True)
class RobustnessSpec:
    """``robustness:`` of the grid: each finished cell's ensemble scored again on its cross-source sets under these
    degradations (:mod:`dfpipe.evaluate`'s forms). No retraining, and no part of a cell's key: it is cached in the
    cell's folder under a key of its own (:func:`run_robustness`)."""

    degradations: list[str] = field(default_factory=list)  # [] = no robustness pass
    recipes: list[str] = field(default_factory=list)  # recipes and ensemble rows; [] = every row of the grid
    bootstrap: int = 0  # AUC interval resamples (the robustness table reads AUC only)


@dataclass(frozen=True)
class GridSpec:
    """``bench/grid.yaml``: the recipes, seeds, sources and the shared budget."""

    data_root: str = "../shared/data"
    params: str = "params.yaml"  # stage 2 and 3 settings come from here (the recipe as configured) ...
    sources: list[str] = field(default_factory=lambda: ["yonsei_faces", "stylegan3_utk", "genphotos_frll"])
    train_on: list[str] = field(default_factory=list)  # training sets: a source or several joined by "+" ("a+b");
    #                                                    [] = each of `sources` alone
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    epochs: int = 3  # the budget: every recipe trains this many epochs
    heldout: float = 0.3  # folder sources: share of identities held out (the in-source column)
    split_seed: int = 0  # the train / held-out split of the folder sources (fixed across seeds)
    baseline: str = "baseline"  # the row every other is compared with
    max_side: int = 0  # stage 1 (prepare_data.max_side): 0 = every image at native resolution
    augment_sd: dict[str, Any] = field(default_factory=dict)  # ... with these overrides, shared by all recipes
    cluster_split: dict[str, Any] = field(default_factory=dict)
    ensemble_predict: dict[str, Any] = field(default_factory=dict)  # PredictConfig overrides (tta, combine)
    evaluate: dict[str, Any] = field(default_factory=dict)  # EvaluateConfig overrides (degradations, bootstrap)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> ExpertConfig overrides
    robustness: RobustnessSpec = field(default_factory=RobustnessSpec)  # a pass over finished cells
    ensembles: dict[str, list[str]] = field(default_factory=dict)  # name -> member recipes: rows scored from the
    # members' finished cells through stage 5 + 6, no training (:func:`run_ensemble`)



def load_grid(path: str | Path) -> GridSpec:
    with open(path, encoding="utf-8") as fh:
        spec = from_dict(GridSpec, yaml.safe_load(fh) or {}, str(path))
    _check_train_on(spec, str(path))
    _check_robustness(spec, str(path))
    _check_ensembles(spec, str(path))
    return spec


def _check_ensembles(spec: GridSpec, where: str) -> None:
    """An ensemble names two or more distinct recipes of the grid and no recipe's name."""
    for name, members in spec.ensembles.items():
        if name in spec.recipes:
            raise ConfigError(f"{where}: ensembles.{name}: the name is a recipe's too; pick another")
        if len(members) < 2 or len(set(members)) != len(members):
            raise ConfigError(f"{where}: ensembles.{name}: needs two or more distinct member recipes, got {members}")
        unknown = sorted(set(members) - set(spec.recipes))
        if unknown:
            raise UnknownNameError(f"{where}: ensembles.{name}: {unknown} not recipes of the grid "
                                   f"(have {sorted(spec.recipes)})")


JOIN = "+"  # joins the sources of a combined training set: "stylegan3_utk+genphotos_frll"


def set_parts(train: str) -> list[str]:
    """The sources of a training set's name: ``"a+b"`` -> ``["a", "b"]``, ``"a"`` -> ``["a"]``."""
    return train.split(JOIN)


def is_combined(train: str) -> bool:
    """Whether a training set's name names several sources (a combined cell, ``<work>/<a+b>/``)."""
    return JOIN in train


def training_sets(spec: GridSpec) -> list[str]:
    """The grid's training sets, in order: ``train_on``, or each of ``sources`` alone (the default)."""
    return list(spec.train_on) or list(spec.sources)


def _check_train_on(spec: GridSpec, where: str) -> None:
    """``train_on`` names only sources of the grid, each set once: a typo fails when the grid loads."""
    joined = [s for s in spec.sources if JOIN in s]
    if joined:
        raise ConfigError(f"{where}: sources {joined}: a source name may not contain {JOIN!r} (train_on joins "
                          "names with it)")
    seen: dict[frozenset, str] = {}
    for entry in spec.train_on:
        parts = set_parts(entry)
        unknown = [p for p in parts if p not in spec.sources]
        if unknown:
            raise UnknownNameError(f"{where}: train_on entry {entry!r}: {unknown} not in sources (have {spec.sources})")
        if len(set(parts)) < len(parts):
            raise ConfigError(f"{where}: train_on entry {entry!r} names a source twice")
        if len(parts) > 1 and set(parts) == set(spec.sources):
            raise ConfigError(f"{where}: train_on entry {entry!r} holds every source: no source is left for a "
                              "cross-source column")
        if frozenset(parts) in seen:
            raise ConfigError(f"{where}: train_on lists {seen[frozenset(parts)]!r} and {entry!r}: the same training "
                              "set twice")
        seen[frozenset(parts)] = entry


def _check_robustness(spec: GridSpec, where: str) -> None:
    """Typos in ``robustness:`` fail when the grid loads, not after hours of training."""
    from .evaluate import CLEAN, parse_degradation

    r = spec.robustness
    for name in r.degradations:
        if name == CLEAN or r.degradations.count(name) > 1:
            raise ConfigError(f"{where}: robustness.degradations: {name!r} is {CLEAN!r} (always scored) or "
                              "listed twice")
        parse_degradation(name)
    rows = [*spec.recipes, *spec.ensembles]
    unknown = sorted(set(r.recipes) - set(rows))
    if unknown:
        raise UnknownNameError(f"{where}: robustness.recipes {unknown} not in the grid (have {sorted(rows)})")


def recipe_config(spec: GridSpec, name: str, seed: int) -> ExpertConfig:
    """The expert a recipe trains: ExpertConfig defaults, the recipe's overrides, the grid's budget and seed."""
    if name not in spec.recipes:
        raise UnknownNameError(f"recipe {name!r} not in the grid (have {sorted(spec.recipes)})")
    over = {**copy.deepcopy(spec.recipes[name]), "epochs": spec.epochs, "seed": seed}
    return from_dict(ExpertConfig, over, f"recipes.{name}")


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


def stage_config(spec: GridSpec, stage: str, **over: Any) -> Any:
    """Stage ``stage``'s settings: params.yaml's section, the grid's overrides of it (checked), then ``over`` (typed
    values from the benchmark itself)."""
    return dataclasses.replace(from_dict(STAGE_CONFIGS[stage], _section(spec, stage), f"{spec.params}:{stage}"), **over)


def prepare_source(spec: GridSpec, src: Source | TrainingSet, work: Path) -> Layout:
    """Stages 1-3 on the source's training part, or on the training parts of a combined set's sources together,
    in ``<work>/<name>/``, once (a later call reuses them). Returns their layout."""
    from . import augment_sd, cluster_split, prepare_data

    layout = source_layout(spec, src.name, work)
    d = Path(work) / src.name
    shared = _shared_settings(spec)
    if Path(layout.splits).is_file() and _read_json(d / SHARED_RECORD) == shared:
        return layout
    datasets = _combined_datasets(src, d) if isinstance(src, TrainingSet) else _source_datasets(src, d)
    prepare_data.run(PrepareConfig(max_side=spec.max_side,
                                   datasets=[from_dict(DatasetConfig, ds, "dataset") for ds in datasets]), layout)
    augment_sd.run(stage_config(spec, "augment_sd"), layout)
    cluster_split.run(stage_config(spec, "cluster_split"), layout)
    write_json(d / SHARED_RECORD, shared)  # last: it vouches for the folder
    return layout


SHARED_RECORD = "shared.json"


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


def _shared_settings(spec: GridSpec) -> dict[str, Any]:
    """What a source's stages 1-3 depend on (beyond its files): a work folder made with other settings, or by
    an older stage 1 (another store format), is made again rather than reused."""
    from .data.store import STORE_FORMAT

    return json.loads(json.dumps({"max_side": spec.max_side, "store_format": STORE_FORMAT, "heldout": spec.heldout,
                                  "split_seed": spec.split_seed,
                                  "augment_sd": _omit_later(_section(spec, "augment_sd"), "augment_sd"),
                                  "cluster_split": _omit_later(_section(spec, "cluster_split"), "cluster_split")}))


# Settings added after the benchmark's cells were first cached, each with the value at which it is left out of
# the cache keys (the value that does what the code did before the setting existed). A new switch left at that
# value keeps every finished cell and source folder valid; any other value makes a new cell. A setting missing
# here changes every key: all cells are recomputed (safe, only slow). Dotted names reach into nested sections.
KEY_OMIT_AT: dict[str, dict[str, Any]] = {
    "expert": {"info_heads": 0, "info_mi": "kl", "info_temperature": 1.5, "mixup": 0.0,  # LIL / GIL, mixup
               "loss.lil": 0.0, "loss.gil": 0.0, "freeze_backbone": False},  # + the frozen-backbone probe
    "augment_sd": {"landmarks": "none"},  # self_blend's mask from face landmarks
    "cluster_split": {},
}


def _omit_later(d: dict[str, Any], section: str) -> dict[str, Any]:
    """``d`` (a settings mapping) without the :data:`KEY_OMIT_AT` entries of ``section`` at their omit value."""
    out = copy.deepcopy(d)
    for dotted, value in KEY_OMIT_AT[section].items():
        *parents, leaf = dotted.split(".")
        node = out
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == value:
            del node[leaf]
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _section(spec: GridSpec, name: str) -> dict[str, Any]:
    """A params.yaml section with the grid's overrides (nested mappings are replaced, not merged)."""
    return {**(read_params(spec.params).get(name) or {}), **getattr(spec, name, {})}


def eval_sets(spec: GridSpec, train_src: Source | TrainingSet, sources: dict[str, Source],
              work: Path) -> list[EvalSetConfig]:
    """The in-source held-out part of each source trained on and the cross part of every other source."""
    trained = {s.name for s in train_parts(train_src)}
    out = []
    for name, src in sources.items():
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
    key = json.dumps({"expert": _omit_later(dataclasses.asdict(ecfg), "expert"), "predict": spec.ensemble_predict,
                      "evaluate": spec.evaluate,
                      **_shared_settings(spec)}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def cell_dir(spec: GridSpec, recipe: str, seed: int, train_source: str, work: str | Path) -> Path:
    """``<work>/<source>/<recipe>_s<seed>_<key>``: one cell's folder (``eval.json`` in it = finished)."""
    return Path(work) / train_source / f"{recipe}_s{seed}_{cell_key(spec, recipe_config(spec, recipe, seed))}"


def finished_cell(spec: GridSpec, recipe: str, seed: int, train_source: str, work: str | Path) -> dict | None:
    """A finished cell's result (its ``eval.json``), or None: what :func:`run_cell` would return without running."""
    return _read_json(cell_dir(spec, recipe, seed, train_source, work) / "eval.json")


def code_version(root: Path = Path(__file__).resolve().parents[1]) -> str:
    """The commit whose code trains a cell (12 hex digits, ``-dirty`` when ``dfpipe/`` differs from it; a queued
    run's temp copy is a checkout of its base commit plus the changes DVC applied), or ``unknown`` outside git.

    Recorded in every new cell: the cell key covers settings, not code, and a change of training numerics far
    below the settings' level (the last bits of a float) moves a cell's cross-source AUC by up to 0.2."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dfpipe"], cwd=root, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip()[:12] + ("-dirty" if dirty.stdout.strip() else "")


@functools.cache
def _process_code_version() -> str:
    """:func:`code_version` as this process first saw it: the code it runs was imported then, and a commit made
    while a long grid runs moves HEAD, not the code in memory."""
    return code_version()


def run_cell(spec: GridSpec, recipe: str, seed: int, train_src: Source | TrainingSet, sources: dict[str, Source],
             work: Path) -> dict:
    """Train one recipe on one source (or a combined set) with one seed, select on its val fold, evaluate on the
    held-out sets.

    Reuses a finished cell (its ``eval.json``) so an interrupted grid resumes where it stopped.
    """
    from .train_experts.loop import train_expert

    ecfg = recipe_config(spec, recipe, seed)
    cell = cell_dir(spec, recipe, seed, train_src.name, work)
    done = cell / "eval.json"
    if done.is_file():  # the scores' path as seen from here (a cell made from another folder stored its own)
        return {**json.loads(done.read_text()), "scores_csv": cell_layout(spec, train_src.name, work, cell).eval_scores}
    code = _process_code_version()
    prepare_source(spec, train_src, work)
    layout = cell_layout(spec, train_src.name, work, cell)
    t0 = time.perf_counter()
    best, _ = train_expert(TrainConfig(workers=-1, experts={recipe: ecfg}), layout, recipe,
                           history_csv=cell / "history.csv")
    train_s = time.perf_counter() - t0
    metrics = _select_and_evaluate(spec, layout, [recipe], train_src, sources, work)
    result = {"train_source": train_src.name, "recipe": recipe, "seed": seed, "selection_val": best,
              "train_seconds": train_s, "code": code, "eval": metrics, "scores_csv": layout.eval_scores}
    write_json(done, result)
    return result


def _select_and_evaluate(spec: GridSpec, layout: Layout, experts: list[str], train_src: Source | TrainingSet,
                         sources: dict[str, Source], work: Path) -> dict:
    """Stage 5 over the cell's models (the val fold: epoch already chosen, thresholds, the card), then stage 6 on
    the sets no step saw. Returns stage 6's metrics."""
    from . import ensemble_predict, evaluate

    ensemble_predict.run(stage_config(spec, "ensemble_predict", experts=list(experts)), layout)
    return evaluate.run(stage_config(spec, "evaluate", sets=eval_sets(spec, train_src, sources, work)), layout)


# ----------------------------------------------------------------------------- ensembles of finished cells
ENSEMBLE_FORMAT = 1  # bump when an ensemble cell changes meaning: every ensemble cell is made again


def ensemble_dir(spec: GridSpec, name: str, seed: int, train_source: str, work: str | Path) -> Path:
    """``<work>/<source>/ens_<name>_s<seed>_<key>``; the key covers the members' cell folders (their own keys), the
    stage 5 / 6 settings and :data:`ENSEMBLE_FORMAT`, so a changed member makes a new ensemble cell."""
    members = [cell_dir(spec, m, seed, train_source, work).name for m in spec.ensembles[name]]
    key = json.dumps({"members": members, "predict": spec.ensemble_predict, "evaluate": spec.evaluate,
                      "format": ENSEMBLE_FORMAT}, sort_keys=True)
    return Path(work) / train_source / f"ens_{name}_s{seed}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def run_ensemble(spec: GridSpec, name: str, seed: int, train_src: Source | TrainingSet, sources: dict[str, Source],
                 work: str | Path) -> dict | None:
    """One ensemble row's cell: the member recipes' finished cells (same training source and seed) combined by
    stage 5 (``spec.ensemble_predict``'s combine and TTA; thresholds on the same val fold) and scored by stage 6 on the
    same sets, through the ensemble card's one scoring path. No training: the members' ``best.pt`` are linked.

    None while a member cell is not finished. Cached in the ensemble's folder (``eval.json``), like a cell.
    """
    work = Path(work)
    members = spec.ensembles[name]
    cells = [cell_dir(spec, m, seed, train_src.name, work) for m in members]
    if not all((c / "eval.json").is_file() for c in cells):
        return None
    d = ensemble_dir(spec, name, seed, train_src.name, work)
    layout = cell_layout(spec, train_src.name, work, d)
    done = d / "eval.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "scores_csv": layout.eval_scores}
    log.info("benchmark ensemble %s on %s, seed %d: %s", name, train_src.name, seed, " + ".join(members))
    for member, c in zip(members, cells):
        link = Path(layout.models) / member / "best.pt"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((Path(cell_layout(spec, train_src.name, work, c).models) / member / "best.pt").resolve())
    prepare_source(spec, train_src, work)  # made by the members' cells: only checked here
    t0 = time.perf_counter()
    metrics = _select_and_evaluate(spec, layout, members, train_src, sources, work)
    result = {"train_source": train_src.name, "recipe": name, "seed": seed, "members": list(members),
              "score_seconds": time.perf_counter() - t0, "eval": metrics, "scores_csv": layout.eval_scores}
    write_json(done, result)
    return result


# ----------------------------------------------------------------------------- robustness pass
ROBUSTNESS_FORMAT = 1  # bump when a robustness record changes meaning: every cell is scored again


def _robustness_key(r: RobustnessSpec, sets: list[str]) -> str:
    """8 hex digits of what a cell's robustness record depends on beyond the cell itself."""
    key = json.dumps({"degradations": list(r.degradations), "bootstrap": r.bootstrap, "sets": sorted(sets),
                      "format": ROBUSTNESS_FORMAT}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def run_robustness(spec: GridSpec, recipe: str, seed: int, train_src: Source | TrainingSet,
                   sources: dict[str, Source], work: str | Path) -> dict | None:
    """Score a finished cell's card (``<cell>/ensemble.json``, ``<cell>/models``) on its cross-source sets, clean and
    under each of ``spec.robustness.degradations``, through stage 6 (:func:`dfpipe.evaluate.run`).
    ``recipe`` may name an ensemble row: its cell (:func:`ensemble_dir`) has the same card and models layout.

    No training. Cached in ``<cell>/robustness_<key>.json`` (the key: degradations, bootstrap, sets), so the pass
    resumes and a changed list scores again without touching the cell. None when the grid asks for no pass (no
    degradations, the row not listed, or no cross-source set).
    """
    from . import evaluate

    r = spec.robustness
    if not r.degradations or (r.recipes and recipe not in r.recipes):
        return None
    cell = (ensemble_dir if recipe in spec.ensembles else cell_dir)(spec, recipe, seed, train_src.name, work)
    if not (cell / "eval.json").is_file():
        raise InputError(f"robustness: cell {cell} is not finished (no eval.json); run the cell first")
    trained = {s.name for s in train_parts(train_src)}
    sets = [s for s in eval_sets(spec, train_src, sources, Path(work)) if s.name not in trained]
    if not sets:
        return None
    key = _robustness_key(r, [s.name for s in sets])
    done = cell / f"robustness_{key}.json"
    record = _read_json(done)
    if record is not None:
        return record
    # the cell's card and models, stage 6's outputs in a folder of the pass's own
    layout = cell_layout(spec, train_src.name, work, cell).under(cell / f"robustness_{key}", ("evaluate",))
    ev = stage_config(spec, "evaluate", degradations=list(r.degradations), bootstrap=r.bootstrap, sets=sets)
    log.info("robustness: %s on %s, seed %d: %d cross-source set(s) x (clean + %s)", recipe, train_src.name, seed,
             len(sets), ", ".join(r.degradations))
    t0 = time.perf_counter()
    metrics = evaluate.run(ev, layout)
    record = {"degradations": list(r.degradations), "sets": [s.name for s in sets], "seconds": time.perf_counter() - t0,
              "auc": {s.name: {deg: float(m["auc"]) for deg, m in metrics[s.name].items()} for s in sets}}
    write_json(done, record)  # last: it vouches for the folder
    return record


# ----------------------------------------------------------------------------- the grid and its table
def grid_cells(spec: GridSpec, recipes: list[str] | None = None) -> list[tuple[str, int, str]]:
    """(recipe, seed, training set) of every cell, baseline first, recipe-major: an interrupted grid still has
    every training set for the recipes it finished. A training set is a source's name or ``a+b``
    (:func:`training_sets`)."""
    return [(recipe, seed, src) for recipe in _grid_recipes(spec, recipes) for seed in spec.seeds
            for src in training_sets(spec)]


def _grid_recipes(spec: GridSpec, recipes: list[str] | None) -> list[str]:
    """The recipes to run (all of the grid's by default), the baseline first; unknown names fail here."""
    recipes = list(recipes or spec.recipes)
    if spec.baseline not in recipes:
        recipes = [spec.baseline, *recipes]
    for name in recipes:
        recipe_config(spec, name, 0)  # unknown names fail before any cell runs
    return recipes


def ensemble_cells(spec: GridSpec, recipes: list[str] | None = None) -> list[tuple[str, int, str]]:
    """(ensemble, seed, training source) of every ensemble row whose members are all among ``recipes`` (None = the
    whole grid)."""
    chosen = set(_grid_recipes(spec, recipes))
    return [(name, seed, src) for name, members in spec.ensembles.items() if set(members) <= chosen
            for seed in spec.seeds for src in training_sets(spec)]


def load_sources(spec: GridSpec) -> dict[str, Source]:
    root = Path(spec.data_root)
    return {name: load_source(root / name, spec.heldout, spec.split_seed) for name in spec.sources}


def run_grid(spec: GridSpec, work: str | Path, out: str | Path, recipes: list[str] | None = None,
             train: bool = True) -> dict:
    """Every (training set, recipe, seed) cell, its robustness pass if the grid has one, the ensemble rows
    (:func:`run_ensemble`, from the finished member cells), then ``grid.json`` and ``table.md`` under ``out``.

    ``train=False`` trains no cell: it gathers the finished ones (those a DVC queue ran, say), runs their missing
    robustness passes and ensemble rows (scoring only) and writes the table of what is there; the cells not
    finished are listed in ``grid.json`` (``missing``) and the log. A grid with combined training sets also reads
    the finished single-source cells of their sources (:func:`single_source_reference`) for its "alone"
    comparison; it trains none of them.
    """
    work, out = Path(work), Path(out)
    sources = load_sources(spec)
    reference = single_source_reference(spec, work, recipes)
    cells: list[dict] = []
    missing: list[str] = []
    grid: dict = {}
    t0 = time.perf_counter()
    for recipe, seed, src_name in grid_cells(spec, recipes):
        if train:
            log.info("benchmark cell: train on %s, recipe %s, seed %d", src_name, recipe, seed)
            result = run_cell(spec, recipe, seed, training_set(src_name, sources), sources, work)
        else:
            result = finished_cell(spec, recipe, seed, src_name, work)
            if result is None:
                missing.append(f"{src_name}/{recipe}/s{seed}")
                continue
        rob = run_robustness(spec, recipe, seed, training_set(src_name, sources), sources, work)
        cells.append({**result, "robustness": rob} if rob else result)
        grid = write_grid(cells, spec, out, time.perf_counter() - t0, missing, reference)
    for name, seed, src_name in ensemble_cells(spec, recipes):
        result = run_ensemble(spec, name, seed, training_set(src_name, sources), sources, work)
        if result is None:
            missing.append(f"{src_name}/{name}/s{seed}")
            continue
        rob = run_robustness(spec, name, seed, training_set(src_name, sources), sources, work)
        cells.append({**result, "robustness": rob} if rob else result)
        grid = write_grid(cells, spec, out, time.perf_counter() - t0, missing, reference)
    if missing:
        log.warning("%d cell(s) not finished, left out of the table: %s", len(missing), ", ".join(missing))
    if not cells:
        raise InputError(f"no finished cell under {work} for this grid (missing: {', '.join(missing)})")
    return write_grid(cells, spec, out, time.perf_counter() - t0, missing, reference) if missing else grid


def single_source_reference(spec: GridSpec, work: str | Path, recipes: list[str] | None = None) -> list[dict]:
    """The finished single-source cells (same recipes, seeds and settings, so the same cell keys) of every source
    of the grid's combined training sets that the grid does not train alone itself: the table's "alone" numbers.
    Read from ``work`` only (what another grid, e.g. ``bench/grid.yaml``, left there); none is trained. Cells that
    were not scored on every source of this grid are left out."""
    own = set(training_sets(spec))
    parts = dict.fromkeys(p for t in training_sets(spec) if is_combined(t) for p in set_parts(t) if p not in own)
    cells = []
    for recipe in _grid_recipes(spec, recipes):
        for seed in spec.seeds:
            for part in parts:
                result = finished_cell(spec, recipe, seed, part, work)
                if result is not None and set(spec.sources) <= set(result.get("eval", {})):
                    cells.append({**result, "scores_csv": cell_layout(spec, part, work, cell_dir(spec, recipe, seed, part, work)
                                                      ).eval_scores})
    if parts:
        log.info("single-source reference: %d finished cell(s) of %s under %s", len(cells), ", ".join(parts), work)
    return cells


def cell_metrics(result: dict, robustness: dict | None = None) -> dict[str, Any]:
    """One cell as flat numbers for ``dvc metrics`` / ``dvc exp show``: AUC and TPR at FPR 1e-2 per eval set, the
    in-source AUC (a combined set's: the mean over its sources' held-out parts), the mean cross-source AUC (over
    the sources not trained on) and, with a robustness record, the mean cross-source AUC per degradation."""
    ev, trained = result["eval"], set_parts(result["train_source"])
    sets = [s for s in ev if s != "mean"]
    held = [s for s in sets if s in trained]
    cross = [s for s in sets if s not in trained]
    out: dict[str, Any] = {"in_source_auc": float(np.mean([ev[s]["clean"]["auc"] for s in held])) if held else None,
                           "mean_cross_auc": float(np.mean([ev[s]["clean"]["auc"] for s in cross])) if cross else None,
                           "auc": {s: float(ev[s]["clean"]["auc"]) for s in sets},
                           "tpr_at_fpr_1e-2": {s: float(ev[s]["clean"]["tpr_at_fpr_1e-2"]) for s in sets},
                           "train_seconds": float(result.get("train_seconds", 0.0))}
    if robustness:
        degs = ["clean", *robustness["degradations"]]
        out["robustness_cross_auc"] = {d: float(np.mean([robustness["auc"][s][d] for s in robustness["sets"]]))
                                       for d in degs}
    return out


def write_grid(cells: list[dict], spec: GridSpec, out: Path, seconds: float, missing: list[str] | None = None,
               reference: list[dict] | None = None) -> dict:
    """``grid.json`` (every cell; ``reference``: the single-source cells read for the combined sets' "alone"
    numbers, when any) and ``table.md``, rewritten after each cell so partial results show."""
    grid = {"spec": dataclasses.asdict(spec), "cells": cells, "seconds": seconds}
    if missing:
        grid["missing"] = list(missing)
    if reference:
        grid["reference"] = list(reference)
    write_json(out / "grid.json", grid)
    table = grid_table(cells, spec, reference)
    if missing:
        table = f"Not finished, left out: {', '.join(missing)}.\n\n" + table
    with atomic_open(out / "table.md", "w", encoding="utf-8") as fh:
        fh.write(table)
    return grid


def _auc(cell: dict, eval_set: str, degradation: str = "clean") -> float:
    return float(cell["eval"][eval_set][degradation]["auc"])


def _tpr(cell: dict, eval_set: str) -> float:
    return float(cell["eval"][eval_set]["clean"]["tpr_at_fpr_1e-2"])


def paired_auc_diff(a_csv: str, b_csv: str, eval_set: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) on the same images of ``eval_set``, with a paired stratified bootstrap 95% interval
    (each resample weighs the same images for both; vectorised, see :func:`dfpipe.evaluate.weighted_auc`)."""
    from .evaluate import resample_counts, weighted_auc
    from .metrics import roc_auc

    a, b = (pd.read_csv(p, keep_default_na=False) for p in (a_csv, b_csv))
    a = a[(a.set == eval_set) & (a.degradation == "clean")].set_index("img_name")
    b = b[(b.set == eval_set) & (b.degradation == "clean")].set_index("img_name")
    common = a.index.intersection(b.index)
    y = a.label.loc[common].to_numpy().astype(int)
    sa, sb = a.score.loc[common].to_numpy(float), b.score.loc[common].to_numpy(float)
    diff = roc_auc(y, sa) - roc_auc(y, sb)
    rng_pos, rng_neg = np.random.default_rng(seed).spawn(2)
    w_pos, w_neg = resample_counts(rng_pos, n_boot, int(y.sum())), resample_counts(rng_neg, n_boot, int((y == 0).sum()))
    boots = (weighted_auc(sa[y == 1], sa[y == 0], w_pos, w_neg) - weighted_auc(sb[y == 1], sb[y == 0], w_pos, w_neg))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(diff), float(lo), float(hi)


def _md_row(cells: list[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _md_head(head: list[str]) -> list[str]:
    """A markdown table's header row and its separator."""
    return [_md_row(head), "|" + "---|" * len(head)]


def _cells_frame(cells: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"train": c["train_source"], "recipe": c["recipe"], "seed": c["seed"], "cell": c}
                         for c in cells], columns=["train", "recipe", "seed", "cell"])


def _combined_mask(df: pd.DataFrame) -> pd.Series:
    """Which rows of a cells frame are combined-set cells (bool even when empty)."""
    return df.train.map(is_combined).astype(bool)


def grid_table(cells: list[dict], spec: GridSpec, reference: list[dict] | None = None) -> str:
    """Markdown: the single-source summary, the combined-sets summary (when the grid has combined cells; their
    "alone" numbers from these cells and ``reference``), then one block per training set; rows = recipes;
    columns = eval sets (in-source first)."""
    df = _cells_frame(cells)
    single = df[~_combined_mask(df)]
    lines = [f"Budget: {spec.epochs} epochs per expert, seeds {spec.seeds}. Cells: ROC AUC seed "
             + " / seed ".join(str(s) for s in spec.seeds) + " (mean), TPR at FPR 1e-2 of the mean run below it. "
             "Every column is a set that no training or selection step saw; the in-source column is the training "
             "source's held-out part. delta = mean AUC minus the baseline's, paired bootstrap 95% interval of seed "
             f"{spec.seeds[0]}'s difference."
             + (" A combined training set (a + b) has an in-source column per source: its held-out part."
                if _combined_mask(df).any() else ""), ""]
    lines += [_provenance(cells), ""]
    if spec.ensembles:
        members = "; ".join(f"{n} = {' + '.join(m)}" for n, m in spec.ensembles.items())
        lines += [f"Ensemble rows (no training): {members}"
                  + ", each the members' cells of the same training set and seed combined by stage 5 "
                  f"({spec.ensemble_predict.get('combine', 'mean_prob')}) and scored by stage 6 on the same sets.", ""]
    if not single.empty:
        lines += _summary(single, spec)
    lines += _combined_summary(df, _cells_frame(reference or []), spec)
    for train in training_sets(spec):
        sub = df[df.train == train]
        if sub.empty:
            continue
        parts = set_parts(train)
        sets = parts + [s for s in spec.sources if s not in parts]
        cross = sets[len(parts):]
        head = ["recipe"] + [f"{s} (in-source)" if s in parts else s for s in sets] + ["mean cross", "delta mean cross"]
        lines += [f"### trained on {' + '.join(parts)}", "", *_md_head(head)]
        base = _mean_cross(sub[sub.recipe == spec.baseline], cross)
        for recipe in dict.fromkeys(sub.recipe):
            runs = sub[sub.recipe == recipe].sort_values("seed")
            row = [recipe]
            for s in sets:
                aucs = [_auc(c, s) for c in runs.cell]
                tprs = [_tpr(c, s) for c in runs.cell]
                row.append(" / ".join(f"{a:.3f}" for a in aucs) + f" ({np.mean(aucs):.3f}); "
                           f"TPR@1e-2 {np.mean(tprs):.3f}")
            mc = _mean_cross(runs, cross)
            row.append(f"{mc:.3f}")
            row.append("-" if recipe == spec.baseline else f"{mc - base:+.3f}")
            lines.append(_md_row(row))
        lines.append("")
        lines += _deltas(sub, sets, spec)
    lines += _robustness_table(cells, spec)
    return "\n".join(lines) + "\n"


def _provenance(cells: list[dict]) -> str:
    """Which code trained the table's cells (:func:`code_version`; ensembles are scoring only, not counted)."""
    trained = [c for c in cells if "members" not in c]
    counts = collections.Counter(c.get("code", "not recorded") for c in trained)  # first-seen order
    parts = ", ".join(f"{code} ({n})" for code, n in counts.items())
    return (f"Code that trained the {len(trained)} cells: {parts}. Cells trained by different code are not "
            "comparable to the last bit: the same cell rerun by other code moved single cross-source AUCs by up to "
            "0.2; read the means and compare rows trained by the same code.")


def _robustness_table(cells: list[dict], spec: GridSpec) -> list[str]:
    """Per recipe: the cross-source AUC clean and under each degradation (each cell's mean over its cross-source
    sets, then the mean over the recipe's cells: seeds and training sources), and the drop from clean."""
    degs = list(spec.robustness.degradations)
    done = [c for c in cells if c.get("robustness")]
    if not degs or not done:
        return []
    single = [c for c in done if not is_combined(c["train_source"])]
    combined = [c for c in done if is_combined(c["train_source"])]
    head = ["recipe", "cells", "clean", *[f"{d} (drop)" for d in degs]]
    out = ["### robustness (cross-source ROC AUC under degradations)", "",
           "Each finished cell's ensemble scored again on its cross-source sets, each degradation applied to the "
           "full-size decoded image before the checkpoint's preprocessing (stage 6). Mean over each cell's "
           "cross-source sets, then over the recipe's cells (seeds and training sources); drop = degraded minus "
           "clean. No retraining: the cells of the table above.", "",
           *_md_head(head)]
    for group, suffix in ((single, ""), (combined, " (combined sets)")):
        for recipe in dict.fromkeys(c["recipe"] for c in group):
            out.append(_robustness_row(f"{recipe}{suffix}", [c["robustness"] for c in group if c["recipe"] == recipe],
                                       degs))
    return out + [""]


def _robustness_row(label: str, runs: list[dict], degs: list[str]) -> str:
    """One row of the robustness block: ``runs`` (robustness records) averaged per cell, then over the cells."""
    mean = {d: float(np.mean([np.mean([r["auc"][s][d] for s in r["sets"]]) for r in runs])) for d in ["clean", *degs]}
    row = [label, str(len(runs)), f"{mean['clean']:.3f}",
           *[f"{mean[d]:.3f} ({mean[d] - mean['clean']:+.3f})" for d in degs]]
    return _md_row(row)


def _summary(df: pd.DataFrame, spec: GridSpec) -> list[str]:
    """One row per recipe: per training source the in-source AUC and the mean AUC on the other sources
    (each the mean of the seeds), then the mean of all leave-one-source-out columns and its difference
    to the baseline's."""
    trains = [t for t in spec.sources if (df.train == t).any()]
    head = ["recipe", *[f"{t}: in-source / cross" for t in trains], "mean cross", "delta vs baseline"]
    out = ["### summary (ROC AUC, mean of seeds)", "", *_md_head(head)]
    base = None
    for recipe in dict.fromkeys(df.recipe):
        cells, crosses = [recipe], []
        for t in trains:
            runs = df[(df.train == t) & (df.recipe == recipe)]
            if runs.empty:
                cells.append("-")
                continue
            cross = _mean_cross(runs, [s for s in spec.sources if s != t])
            crosses.append(cross)
            cells.append(f"{np.mean([_auc(c, t) for c in runs.cell]):.3f} / {cross:.3f}")
        mean = float(np.mean(crosses)) if len(crosses) == len(trains) else float("nan")
        if recipe == spec.baseline:
            base = mean
        delta = "-" if recipe == spec.baseline or base is None else f"{mean - base:+.3f}"
        out.append(_md_row([*cells, f"{mean:.3f}", delta]))
    return out + [""]


def _combined_summary(df: pd.DataFrame, ref: pd.DataFrame, spec: GridSpec) -> list[str]:
    """One row per recipe: per combined training set its cross-source AUC (mean over seeds and the sources it does
    not hold) "together", and "alone": the same recipe's single-source cells of its sources on the same sets (from
    this grid's cells and ``ref``, whichever are finished); then the means over the combined sets, the delta to the
    baseline's and together minus alone. Empty when the grid has no combined cell."""
    combined = [t for t in training_sets(spec) if is_combined(t) and (df.train == t).any()]
    if not combined:
        return []
    alone = pd.concat([df[~_combined_mask(df)], ref], ignore_index=True)
    cross = {t: [s for s in spec.sources if s not in set_parts(t)] for t in combined}
    head = ["recipe", *[f"{' + '.join(set_parts(t))} -> {', '.join(cross[t])}: together / alone" for t in combined],
            "mean together", "delta vs baseline", "mean alone", "together minus alone"]
    out = ["### summary of combined training sets (cross-source ROC AUC, mean of seeds)", "",
           "Each column: a training set of several sources (stage 1 on their training parts at once), scored on the "
           "sources it does not hold (their cross parts). together = that cell's AUC; alone = the same recipe trained "
           "on each of those sources by itself (the single-source cells finished in the work folder, same seeds), "
           "on the same sets; - = none finished. Means over the combined sets (only when every one has a value).", "",
           *_md_head(head)]
    recipes = dict.fromkeys(df[df.train.isin(combined)].recipe)
    rows = {r: _together_alone(df, alone, r, combined, cross) for r in recipes}
    base = rows.get(spec.baseline, ([], []))[0]
    base_mean = _complete_mean(base, len(combined))
    for recipe, (together, alone_aucs) in rows.items():
        mean_t, mean_a = _complete_mean(together, len(combined)), _complete_mean(alone_aucs, len(combined))
        delta = "-" if recipe == spec.baseline else _fmt(mean_t - base_mean, "+.3f")
        out.append(_md_row([recipe, *[f"{_fmt(t)} / {_fmt(a)}" for t, a in zip(together, alone_aucs)],
                            _fmt(mean_t), delta, _fmt(mean_a), _fmt(mean_t - mean_a, "+.3f")]))
    return out + [""]


def _together_alone(df: pd.DataFrame, alone: pd.DataFrame, recipe: str, combined: list[str],
                    cross: dict[str, list[str]]) -> tuple[list[float], list[float]]:
    """Per combined set: the recipe's mean cross AUC trained on it, and on each of its sources alone (nan: none)."""
    together, alone_aucs = [], []
    for t in combined:
        together.append(_mean_cross(df[(df.train == t) & (df.recipe == recipe)], cross[t]))
        alone_aucs.append(_mean_cross(alone[alone.train.isin(set_parts(t)) & (alone.recipe == recipe)], cross[t]))
    return together, alone_aucs


def _complete_mean(values: list[float], n: int) -> float:
    """The mean of ``values`` when there are ``n`` of them and none is nan, else nan."""
    return float(np.mean(values)) if len(values) == n and not np.isnan(values).any() else float("nan")


def _fmt(x: float, fmt: str = ".3f") -> str:
    return "-" if np.isnan(x) else format(x, fmt)


def _mean_cross(runs: pd.DataFrame, cross_sets: list[str]) -> float:
    if runs.empty or not cross_sets:
        return float("nan")
    return float(np.mean([[_auc(c, s) for s in cross_sets] for c in runs.cell]))


def _deltas(sub: pd.DataFrame, sets: list[str], spec: GridSpec) -> list[str]:
    """Per recipe and set: paired AUC difference to the baseline (first seed), with its interval."""
    seed = spec.seeds[0]
    base = sub[(sub.recipe == spec.baseline) & (sub.seed == seed)]
    if base.empty:
        return []
    base_csv = base.cell.iloc[0]["scores_csv"]
    out = []
    for recipe in dict.fromkeys(sub.recipe):
        if recipe == spec.baseline:
            continue
        run = sub[(sub.recipe == recipe) & (sub.seed == seed)]
        if run.empty:
            continue
        parts = []
        for s in sets:
            d, lo, hi = paired_auc_diff(run.cell.iloc[0]["scores_csv"], base_csv, s)
            parts.append(f"{s} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        out.append(f"- {recipe} minus {spec.baseline} (seed {seed}): " + "; ".join(parts))
    return out + [""] if out else out
