"""Rows without training (ensembles of finished cells), the robustness pass, and the whole grid."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from dfpipe.errors import InputError
from dfpipe.io import write_json

from .cells import (cell_dir, cell_layout, eval_sets, finished_cell, prepare_source, read_json, run_cell,
                    select_and_evaluate, stage_config)
from .grid import (GridSpec, RobustnessSpec, Source, TrainingSet, ensemble_cells, grid_cells, grid_recipes, row_predict,
                   is_combined, load_sources, set_parts, train_parts, training_set, training_sets)
from .tables import write_grid

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- ensembles of finished cells
ENSEMBLE_FORMAT = 1  # bump when an ensemble cell changes meaning: every ensemble cell is made again


def ensemble_dir(spec: GridSpec, name: str, seed: int, train_source: str, work: str | Path) -> Path:
    """``<work>/<source>/ens_<name>_s<seed>_<key>``; the key covers the members' cell folders (their own keys), the
    stage 5 / 6 settings and :data:`ENSEMBLE_FORMAT`, so a changed member makes a new ensemble cell."""
    members = [cell_dir(spec, m, seed, train_source, work).name for m in spec.ensembles[name]]
    key = json.dumps({"members": members, "predict": row_predict(spec, name), "evaluate": spec.evaluate,
                      "format": ENSEMBLE_FORMAT}, sort_keys=True)
    return Path(work) / train_source / f"ens_{name}_s{seed}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def run_ensemble(spec: GridSpec, name: str, seed: int, train_src: Source | TrainingSet, sources: dict[str, Source],
                 work: str | Path) -> dict | None:
    """One ensemble row's cell: the member recipes' finished cells (same training source and seed) combined by
    stage 5 (the row's :func:`row_predict` settings: combine and TTA; thresholds on the same val fold) and scored by stage 6 on the
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
    metrics = select_and_evaluate(spec, layout, members, train_src, sources, work, predict=row_predict(spec, name))
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
    from dfpipe import evaluate

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
    record = read_json(done)
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

    def record(row: str, seed: int, src_name: str, result: dict | None) -> None:
        """A finished cell (with its robustness pass) into the table, or its name into ``missing``."""
        nonlocal grid
        if result is None:
            missing.append(f"{src_name}/{row}/s{seed}")
            return
        rob = run_robustness(spec, row, seed, training_set(src_name, sources), sources, work)
        cells.append({**result, "robustness": rob} if rob else result)
        grid = write_grid(cells, spec, out, time.perf_counter() - t0, missing, reference)

    for recipe, seed, src_name in grid_cells(spec, recipes):
        if train:
            log.info("benchmark cell: train on %s, recipe %s, seed %d", src_name, recipe, seed)
            record(recipe, seed, src_name, run_cell(spec, recipe, seed, training_set(src_name, sources), sources, work))
        else:
            record(recipe, seed, src_name, finished_cell(spec, recipe, seed, src_name, work))
    for name, seed, src_name in ensemble_cells(spec, recipes):
        record(name, seed, src_name, run_ensemble(spec, name, seed, training_set(src_name, sources), sources, work))
    if missing:
        log.warning("%d cell(s) not finished, left out of the table: %s", len(missing), ", ".join(missing))
    if not cells:
        raise InputError(f"no finished cell under {work} for this grid (missing: {', '.join(missing)})")
    return write_grid(cells, spec, out, time.perf_counter() - t0, missing, reference) if missing else grid


def single_source_reference(spec: GridSpec, work: str | Path, recipes: list[str] | None = None) -> list[dict]:
    """The finished single-source cells (same recipes, seeds and settings, so the same cell keys) of every source
    of the grid's combined training sets that the grid does not train alone itself: the table's "alone" numbers.
    Read from ``work`` only (what another grid, e.g. ``bench/grid.yaml``, left there); none is trained. Cells that
    were not scored on every source of this grid are left out. A leave-one-out grid reads none: its summary has
    no "alone" column (a source alone is no leave-one-source-out cell)."""
    if spec.leave_one_out:
        return []
    own = set(training_sets(spec))
    parts = dict.fromkeys(p for t in training_sets(spec) if is_combined(t) for p in set_parts(t) if p not in own)
    cells = []
    for recipe in grid_recipes(spec, recipes):
        for seed in spec.seeds:
            for part in parts:
                result = finished_cell(spec, recipe, seed, part, work)
                if result is not None and set(spec.sources) <= set(result.get("eval", {})):
                    cell = cell_dir(spec, recipe, seed, part, work)
                    cells.append({**result, "scores_csv": cell_layout(spec, part, work, cell).eval_scores})
    if parts:
        log.info("single-source reference: %d finished cell(s) of %s under %s", len(cells), ", ".join(parts), work)
    return cells
