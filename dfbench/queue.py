"""The benchmark grid as DVC experiments: one ``dvc exp run --queue`` per cell, ``dvc queue start``, then the table.

``bench/grid`` is a DVC project of its own (``dvc init --subdir``) with one stage, ``cell``: it runs one cell of
:mod:`dfbench` (:func:`run_cell_stage`) and writes its metrics, so ``cd bench/grid && dvc exp show`` lists
every cell with its params (source: the training set, one source or ``a+b``; recipe, seed) and metrics. The root
DAG, ``dvc status`` and ``dvc metrics show`` at the root never see it.

Queued experiments run in a temporary copy of the repository (``bench/grid/.dvc/tmp/exps/<tmp>``) made from the
committed tree plus the uncommitted changes to tracked (or ``git add``-ed) files; untracked files are left out,
which :func:`queue_grid` checks before it queues anything. Paths a cell needs outside that copy (``work``,
``data_root``) are made absolute when queued. Every cell trains through :func:`dfbench.run_cell` in the
shared ``work`` folder, so the in-process grid and the queue reuse each other's cells and an interrupted queue
resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from dfpipe.config import from_dict
from dfpipe.errors import ConfigError, InputError, UnknownNameError
from dfpipe.io import write_json

from . import (JOIN, GridSpec, cell_key, cell_metrics, grid_cells, load_grid, load_sources, recipe_config, run_cell,
               run_grid, run_robustness, training_set, training_sets)

from .cells import CODE

log = logging.getLogger(__name__)

PROJECT = "bench/grid"  # the DVC project of the cell stage, relative to the repository root
ACTIVE = ("Queued", "Running")  # `dvc queue status` states of a task that is not done yet
STAGE_OUTPUTS = (f"{PROJECT}/metrics.json", f"{PROJECT}/dvc.lock")  # left by a run in the workspace: harmless


@dataclass(frozen=True)
class CellParams:
    """``bench/grid/params.yaml``: the one cell a ``cell`` stage run computes (relative paths: from the repo root)."""

    grid: str = "bench/grid.yaml"  # the grid file (a git-tracked file: queued runs see only those)
    source: str = "yonsei_faces"  # training set: a source of the grid or a train_on entry ("a+b")
    recipe: str = "baseline"
    seed: int = 0
    work: str = "data/benchmark"  # the cells' shared work folder (absolute when queued)
    data_root: str = ""  # "" = the grid's data_root (absolute when queued)


# ----------------------------------------------------------------------------- the stage
def run_cell_stage(params_path: str | Path, metrics_path: str | Path) -> dict:
    """The ``cell`` stage: one cell (trained, or reused from ``work``), its robustness pass if the grid has one,
    and its metrics as flat numbers (:func:`dfbench.cell_metrics`) in ``metrics_path``."""
    with open(params_path, encoding="utf-8") as fh:
        p = from_dict(CellParams, yaml.safe_load(fh) or {}, str(params_path))
    spec = load_grid(p.grid)
    if p.data_root:
        spec = dataclasses.replace(spec, data_root=p.data_root)
    known = list(dict.fromkeys([*spec.sources, *training_sets(spec)]))
    if p.source not in known:
        raise UnknownNameError(f"{params_path}: source {p.source!r} is neither a source of the grid nor a train_on "
                               f"entry (have {known})")
    t0 = time.perf_counter()
    sources = load_sources(spec)
    train = training_set(p.source, sources)
    result = run_cell(spec, p.recipe, p.seed, train, sources, Path(p.work))
    rob = run_robustness(spec, p.recipe, p.seed, train, sources, Path(p.work))
    metrics = {**cell_metrics(result, rob), "cell_seconds": time.perf_counter() - t0}
    write_json(metrics_path, metrics)
    log.info("cell %s / %s / seed %d: in-source AUC %.3f, mean cross AUC %s (%.0f s)", p.source, p.recipe, p.seed,
             metrics["in_source_auc"], metrics["mean_cross_auc"], metrics["cell_seconds"])
    return metrics


# ----------------------------------------------------------------------------- queueing the grid
EXP_JOIN = "_and_"  # a combined training set "a+b" is "a_and_b" in experiment names


def exp_name(spec: GridSpec, recipe: str, seed: int, source: str) -> str:
    """``<source>-<recipe>-s<seed>-<cell key>``: an experiment of the same name on the same commit is the same
    cell, so a queue run skips it. A combined training set ``a+b`` is written ``a_and_b``: DVC takes any name git
    accepts as a ref (``git check-ref-format``, no ``/``), which ``+`` passes, but ``+`` has a meaning at the head
    of a git refspec (force) and of a Hydra override (add a key), so names keep to the single-source cells'
    letters, digits, ``_`` and ``-`` (plain to type in ``dvc exp`` / ``dvc queue logs`` commands)."""
    return f"{source.replace(JOIN, EXP_JOIN)}-{recipe}-s{seed}-{cell_key(spec, recipe_config(spec, recipe, seed))}"


def _dvc_env() -> dict[str, str]:
    """The queue's worker runs ``dvc exp exec-run`` and the stage runs ``python``, both found on PATH: put this
    interpreter's folder (the venv's bin) first. The offline env vars come along: importing dfpipe set them."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def dvc(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``dvc <args>`` with this interpreter's DVC, in ``cwd`` (output read through files: :func:`run_past_daemons`)."""
    res = run_past_daemons([sys.executable, "-m", "dvc", *args], cwd, _dvc_env())
    if check and res.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def run_past_daemons(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` to its exit with stdout and stderr in temp files, not in pipes (text, like ``capture_output``):
    a daemon it starts (``dvc queue start``'s worker) inherits the output handles, and pipes read to EOF would
    wait for the daemon too (the whole queue)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        res = subprocess.run(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, res.returncode, out.read(), err.read())


def _git(args: list[str], cwd: Path) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise InputError(f"git {' '.join(args)} failed in {cwd}: {res.stderr.strip()}")
    return res.stdout


def _check_tree(repo: Path, grid_rel: str) -> None:
    """Refuse to queue what a queued run would not see: no commit, an untracked grid file or untracked code."""
    _git(["rev-parse", "--verify", "HEAD"], repo)
    if not _git(["ls-files", "--", grid_rel], repo).strip():
        raise InputError(f"{grid_rel} is not tracked by git: queued experiments see only tracked files; "
                         f"git add {grid_rel}")
    untracked = [f for f in _git(["ls-files", "--others", "--exclude-standard", "--", *CODE, "bench", "params.yaml"],
                                 repo).split() if f not in STAGE_OUTPUTS]
    if untracked:
        raise InputError(f"untracked file(s) a queued experiment would not see: {untracked[:10]}"
                         f"{' ...' if len(untracked) > 10 else ''}; git add them (no commit needed: uncommitted "
                         "changes to tracked files go along with each queued experiment) or move them away")


def _hydra_str(value: str) -> str:
    """A string for ``dvc exp run -S key=value`` that stays a string (a path with ':' or ' ', a name like 1e3)."""
    if "'" in value:
        raise ConfigError(f"{value!r}: a quote in a path cannot be passed to dvc exp run -S")
    return f"'{value}'"


def queue_status(project: Path) -> tuple[list[tuple[str, str]], int]:
    """(name, state) of every task ``dvc queue status`` lists, and the number of workers (active + idle).

    The name is read from its column (unnamed tasks leave it blank), the state is the last word of the row."""
    lines = dvc(["queue", "status"], project).stdout.splitlines()
    tasks = []
    if lines and lines[0].startswith("Task"):
        lo, hi = lines[0].index("Name"), lines[0].index("Created")
        for line in lines[1:]:
            if not line.strip():
                break
            tasks.append((line[lo:hi].strip(), line.split()[-1]))
    m = re.search(r"Worker status: (\d+) active, (\d+) idle", "\n".join(lines))
    return tasks, (int(m.group(1)) + int(m.group(2))) if m else 0


def wait_for_queue(project: Path, names: list[str], poll_s: float = 30.0, no_worker_s: float = 120.0,
                   max_restarts: int = 3) -> None:
    """Block until no task is queued or running; log each of ``names`` as it changes state. Tasks left queued with
    no worker for ``no_worker_s`` (a worker that died) get ``dvc queue start`` again, at most ``max_restarts``
    times (not sooner: a second worker would run two cells of one training set at once)."""
    seen: dict[str, str] = {}
    restarts, idle_since = 0, None
    while True:
        tasks, workers = queue_status(project)
        for name, state in tasks:
            if name in names and seen.get(name) != state:
                log.info("queue: %s %s", name, state.lower())
                seen[name] = state
        active = [t for t in tasks if t[1] in ACTIVE]
        if not active:
            return
        if workers or any(state == "Running" for _, state in active):
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > no_worker_s:
            if restarts >= max_restarts:
                raise RuntimeError(f"{len(active)} task(s) queued but no queue worker (restarted {restarts} times); "
                                   f"see `cd {PROJECT} && dvc queue status`")
            restarts, idle_since = restarts + 1, None
            log.warning("queue: no worker with %d task(s) queued: dvc queue start again", len(active))
            dvc(["queue", "start", "-j", "1"], project)
        time.sleep(poll_s)


def queue_grid(grid_path: str | Path, work: str | Path, out: str | Path, recipes: list[str] | None = None,
               poll_s: float = 30.0) -> dict:
    """Queue every cell of the grid not yet kept as an experiment on this commit, run the queue (one worker: cells
    of one training set share its stages 1-3), wait, then write ``grid.json`` and ``table.md`` from the finished
    cells.

    Returns ``{"queued", "skipped", "failed": [experiment names], "seconds", "grid"}``. Run from the repo root.
    """
    repo = Path(_git(["rev-parse", "--show-toplevel"], Path.cwd()).strip()).resolve()
    project = repo / PROJECT
    if not (project / "dvc.yaml").is_file():
        raise InputError(f"{project}/dvc.yaml not found: run from the repository root")
    grid_abs = Path(grid_path).resolve()
    try:
        grid_rel = grid_abs.relative_to(repo).as_posix()
    except ValueError:
        raise InputError(f"{grid_path}: the grid file must be inside the repository (queued runs see only its "
                         "tracked files)") from None
    spec = load_grid(grid_abs)
    _check_tree(repo, grid_rel)
    data_root = str(Path(spec.data_root).resolve())
    work_abs = str(Path(work).resolve())
    cells = grid_cells(spec, recipes)
    # the queued experiments' baseline: a commit made while the queue runs moves HEAD, and `dvc exp list` lists
    # HEAD's experiments only, which would report every finished cell as failed
    base = _git(["rev-parse", "HEAD"], repo).strip()
    existing = set(dvc(["exp", "list", "--rev", base, "--name-only"], project).stdout.split())
    t0 = time.perf_counter()
    queued, skipped = [], []
    for recipe, seed, source in cells:
        name = exp_name(spec, recipe, seed, source)
        if name in existing:
            skipped.append(name)
            continue
        sets = {"grid": _hydra_str(grid_rel), "source": _hydra_str(source), "recipe": _hydra_str(recipe),
                "seed": str(int(seed)), "work": _hydra_str(work_abs), "data_root": _hydra_str(data_root)}
        args = ["exp", "run", "--queue", "-n", name]
        for k, v in sets.items():
            args += ["-S", f"{k}={v}"]
        dvc(args, project)
        queued.append(name)
    log.info("queued %d cell(s) as DVC experiments (%.0f s); %d already kept on this commit", len(queued),
             time.perf_counter() - t0, len(skipped))
    if queued:
        dvc(["queue", "start", "-j", "1"], project)  # returns once the worker is started
        wait_for_queue(project, queued, poll_s)
    kept = set(dvc(["exp", "list", "--rev", base, "--name-only"], project).stdout.split())
    failed = [n for n in queued if n not in kept]
    for n in failed:
        log.error("cell %s failed: see `cd %s && dvc queue logs %s`", n, PROJECT, n)
    seconds = time.perf_counter() - t0
    log.info("queue done: %d cell(s) ran, %d failed, %.0f s; writing the table", len(queued) - len(failed),
             len(failed), seconds)
    grid = run_grid(spec, work, out, recipes, train=False)
    return {"queued": queued, "skipped": skipped, "failed": failed, "seconds": seconds, "grid": grid}
