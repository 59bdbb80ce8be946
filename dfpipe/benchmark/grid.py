"""The benchmark grid: its sources (held-out parts, identities), training sets and the grid file."""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ..config import (ExpertConfig, from_dict)
from ..errors import ConfigError, InputError, UnknownNameError

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
    from ..evaluate import list_class_folders

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
    from ..data.labels import read_labels

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
    from ..evaluate import CLEAN, parse_degradation

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


def grid_cells(spec: GridSpec, recipes: list[str] | None = None) -> list[tuple[str, int, str]]:
    """(recipe, seed, training set) of every cell, baseline first, recipe-major: an interrupted grid still has
    every training set for the recipes it finished. A training set is a source's name or ``a+b``
    (:func:`training_sets`)."""
    return [(recipe, seed, src) for recipe in grid_recipes(spec, recipes) for seed in spec.seeds
            for src in training_sets(spec)]


def grid_recipes(spec: GridSpec, recipes: list[str] | None) -> list[str]:
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
    chosen = set(grid_recipes(spec, recipes))
    return [(name, seed, src) for name, members in spec.ensembles.items() if set(members) <= chosen
            for seed in spec.seeds for src in training_sets(spec)]


def load_sources(spec: GridSpec) -> dict[str, Source]:
    root = Path(spec.data_root)
    return {name: load_source(root / name, spec.heldout, spec.split_seed) for name in spec.sources}
