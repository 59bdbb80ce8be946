"""dvc.yaml lists what each stage really depends on: every dfpipe module a stage script can import (lazy
imports inside functions included), nothing it cannot (editing dfpipe/serve must not retrain experts),
and no performance knob as a params dep."""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = {"prepare_data": "01_prepare_data.py", "augment_sd": "02_augment_sd.py",
          "cluster_split": "03_cluster_split.py", "train_experts": "04_train_experts.py",
          "ensemble_predict": "05_ensemble_predict.py", "evaluate": "06_evaluate.py"}
PERF_KNOBS = {"workers", "chunk_size", "launcher"}
# package data a stage reads by path, not by import: a dep all the same (new weights rerun the stage)
DATA_DEPS = {"dfpipe/assets/taesd"}


def _module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _package_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[Path]:
    """dfpipe module files ``path`` imports anywhere in its body (packages' __init__ files included)."""
    tree = ast.parse(path.read_text())
    here = _package_of(path)
    is_pkg = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                base_parts = parts if is_pkg else parts[:-1]
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    files = set()
    for n in names:
        if not n.startswith("dfpipe"):
            continue
        parts = n.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            f = _module_file(".".join(parts[:i]))
            if f is not None:
                files.add(f)
    return files


def closure(script: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [script]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_imports(f) - seen)
    return {f for f in seen if f != script}


def _covered(f: Path, deps: list[str]) -> bool:
    rel = f.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


DAG = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _deps(stage: str) -> list[str]:
    s = DAG[stage]
    s = s.get("do", s)
    return [d for d in s["deps"] if d.startswith("dfpipe")]


def stage_closure(stage: str) -> set[Path]:
    """What a stage script runs: its own imports (the harness) and, through ``harness.stage(name)``'s import by
    name, the stage's package ``dfpipe.<name>`` (one name per stage) and everything that imports."""
    package = _module_file(f"dfpipe.{stage}")
    assert package is not None, f"no package dfpipe.{stage} for stage {stage}"
    return closure(REPO / STAGES[stage]) | closure(package) | {package}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_cover_every_module_the_stage_imports(stage):
    deps = _deps(stage)
    used = stage_closure(stage)
    missing = sorted(f.relative_to(REPO).as_posix() for f in used if not _covered(f, deps))
    assert not missing, f"{stage}: imports {missing} but dvc.yaml does not list them as deps"
    unused = [d for d in deps if not any(_covered(f, [d]) for f in used) and d not in DATA_DEPS]
    assert not unused, f"{stage}: dvc.yaml lists {unused}, which the stage never imports"


def test_serving_code_is_no_stage_dependency():
    for stage in STAGES:
        assert not any(d.startswith(("dfpipe/serve", "dfpipe/cli.py", "dfpipe/demo")) for d in _deps(stage)), stage


def test_the_closure_sees_lazy_imports():
    # stage 5 imports read_labels inside a function; a closure that missed it would let label parsing
    # changes skip stage 5
    assert REPO / "dfpipe/data/labels.py" in stage_closure("ensemble_predict")
    assert REPO / "dfpipe/serve/api.py" not in stage_closure("train_experts")


def test_performance_knobs_are_not_params_deps():
    for stage, s in DAG.items():
        s = s.get("do", s)
        for p in s.get("params", []):
            key = p if isinstance(p, str) else next(iter(p))
            assert key.rsplit(".", 1)[-1] not in PERF_KNOBS, f"{stage}: {key} is a performance knob"
            assert "." in key or key not in ("prepare_data", "augment_sd", "evaluate"), \
                f"{stage}: the whole section {key} is a dep, its performance knobs too"
