"""The benchmark grid: its training sets and the grid file (the sources themselves: :mod:`.sources`)."""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dfpipe.config import (ExpertConfig, from_dict)
from dfpipe.errors import ConfigError, UnknownNameError

from .sources import (GROUPINGS, PAIRS_FILE, Source, cap_train, groups_of, identity_group,  # noqa: F401 (re-exported)
                      load_source, pair_groups, source_groups, split_groups)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- training sets
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
    epochs: int = 3  # the budget: every recipe trains this many epochs ...
    recipe_epochs: dict[str, int] = field(default_factory=dict)  # ... but these (recipe -> epochs): a cheaper expert
    #                                                               given the same wall time, say; the table says so
    heldout: float = 0.3  # folder sources: share of identities held out (the in-source column)
    split_seed: int = 0  # the train / held-out split of the folder sources (fixed across seeds)
    baseline: str = "baseline"  # the row every other is compared with
    max_side: int = 0  # stage 1 (prepare_data.max_side): 0 = every image at native resolution
    max_train_per_source: int = 0  # at most this many images of each source's training part (cap_train, seeded by
    #                                 split_seed, class-balanced, whole groups); 0 = no cap
    max_eval_per_source: int = 0  # at most this many images of each scored part (a source's held-out part, or the
    #                               whole of a source held out), drawn as max_train_per_source; 0 = all. Cheaper
    #                               grids, wider intervals: part of the cell key (not of stages 1-3's)
    in_source_eval: bool = True  # false: a cell scores only the sources it did not train on (a LOSO grid's summary
    #                              reads nothing else; the in-source parts cost a third of a small cell). Cell key
    leave_one_out: bool = False  # the table's leave-one-source-out summary; train_on must then hold out each
    #                              source exactly once (checked on load). No part of any key
    augment_sd: dict[str, Any] = field(default_factory=dict)  # ... with these overrides, shared by all recipes
    cluster_split: dict[str, Any] = field(default_factory=dict)
    ensemble_predict: dict[str, Any] = field(default_factory=dict)  # PredictConfig overrides (tta, combine)
    evaluate: dict[str, Any] = field(default_factory=dict)  # EvaluateConfig overrides (degradations, bootstrap)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> ExpertConfig overrides
    robustness: RobustnessSpec = field(default_factory=RobustnessSpec)  # a pass over finished cells
    ensembles: dict[str, list[str]] = field(default_factory=dict)  # name -> member recipes: rows scored from the
    # members' finished cells through stage 5 + 6, no training (:func:`run_ensemble`)
    ensemble_predict_of: dict[str, dict[str, Any]] = field(default_factory=dict)  # ensemble row -> its own stage 5
    # overrides on top of ensemble_predict (another TTA, say); such a row may have one member: that recipe's cells
    # scored another way, no training (:func:`row_predict`)



def load_grid(path: str | Path) -> GridSpec:
    with open(path, encoding="utf-8") as fh:
        spec = from_dict(GridSpec, yaml.safe_load(fh) or {}, str(path))
    _check_train_on(spec, str(path))
    _check_leave_one_out(spec, str(path))
    for cap in ("max_train_per_source", "max_eval_per_source"):
        if getattr(spec, cap) < 0:
            raise ConfigError(f"{path}: {cap} {getattr(spec, cap)}: 0 (no cap) or a positive count")
    _check_robustness(spec, str(path))
    _check_ensembles(spec, str(path))
    for name, n in spec.recipe_epochs.items():
        if name not in spec.recipes or n < 1:
            raise ConfigError(f"{path}: recipe_epochs.{name}: {n}: needs a recipe of the grid and >= 1 epoch "
                              f"(recipes: {sorted(spec.recipes)})")
    return spec


def _check_ensembles(spec: GridSpec, where: str) -> None:
    """An ensemble names two or more distinct recipes of the grid (one, when it has its own stage 5 settings in
    ``ensemble_predict_of``) and no recipe's name."""
    for name in spec.ensemble_predict_of:
        if name not in spec.ensembles:
            raise ConfigError(f"{where}: ensemble_predict_of.{name}: not an ensemble row (have {sorted(spec.ensembles)})")
    for name, members in spec.ensembles.items():
        if name in spec.recipes:
            raise ConfigError(f"{where}: ensembles.{name}: the name is a recipe's too; pick another")
        least = 1 if name in spec.ensemble_predict_of else 2
        if len(members) < least or len(set(members)) != len(members):
            raise ConfigError(f"{where}: ensembles.{name}: needs {'one' if least == 1 else 'two'} or more distinct "
                              f"member recipes, got {members}")
        unknown = sorted(set(members) - set(spec.recipes))
        if unknown:
            raise UnknownNameError(f"{where}: ensembles.{name}: {unknown} not recipes of the grid "
                                   f"(have {sorted(spec.recipes)})")


def row_predict(spec: GridSpec, row: str) -> dict[str, Any]:
    """Stage 5's grid overrides for ``row``: ``ensemble_predict``, then the row's own (``ensemble_predict_of``)."""
    return {**spec.ensemble_predict, **spec.ensemble_predict_of.get(row, {})}


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


def held_out_source(spec: GridSpec, train: str) -> str | None:
    """The one source of the grid a training set leaves out, or None (it leaves out none or several)."""
    out = [s for s in spec.sources if s not in set_parts(train)]
    return out[0] if len(out) == 1 else None


def _check_leave_one_out(spec: GridSpec, where: str) -> None:
    """``leave_one_out: true`` needs ``train_on`` = one training set per source, each holding every other source."""
    if not spec.leave_one_out:
        return
    held = [held_out_source(spec, t) for t in training_sets(spec)]
    if None in held or sorted(held) != sorted(spec.sources):
        raise ConfigError(f"{where}: leave_one_out: train_on must hold out each source exactly once (each entry "
                          f"every source but one), got {training_sets(spec)}")


def _check_robustness(spec: GridSpec, where: str) -> None:
    """Typos in ``robustness:`` fail when the grid loads, not after hours of training."""
    from dfpipe.evaluate import CLEAN, parse_degradation

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
    """The expert a recipe trains: ExpertConfig defaults, the recipe's overrides, the grid's budget (or the recipe's
    own in ``recipe_epochs``; an ``epochs`` inside a recipe is ignored) and seed."""
    if name not in spec.recipes:
        raise UnknownNameError(f"recipe {name!r} not in the grid (have {sorted(spec.recipes)})")
    over = {**copy.deepcopy(spec.recipes[name]), "epochs": spec.recipe_epochs.get(name, spec.epochs), "seed": seed}
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
    out = {}
    for name in spec.sources:
        src = load_source(root / name, spec.heldout, spec.split_seed)
        cap = spec.max_eval_per_source
        out[name] = dataclasses.replace(src, train=cap_train(src.train, spec.max_train_per_source, spec.split_seed),
                                        heldout=cap_train(src.heldout, cap, spec.split_seed),
                                        cross=cap_train(src.cross, cap, spec.split_seed))
    return out
