"""The numbered scripts: each is one stage of one name, and bad configuration gives one clear line and exit
code 2, not a traceback."""

import ast
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dfpipe.config import STAGE_CONFIGS

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in REPO.glob("0[0-9]_*.py"))


def _run(script: str, params: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / script), "--params", str(params), *args], cwd=params.parent,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "script, params_text, message",
    [
        ("01_prepare_data.py", "paths:\n  data_root: nowhere\nprepare_data: {}\n",
         "data_root nowhere does not exist"),
        ("01_prepare_data.py", "prepare_data:\n  cache_sise: 64\n", "unknown key(s) ['cache_sise']"),
        ("01_prepare_data.py", "prepare_data: {}\npaths:\n  prepard: x\n", "paths: unknown key(s) ['prepard']"),
        ("03_cluster_split.py", "cluster_split: {}\n", "data/prepared/manifest.csv not found: run stage 1"),
        ("04_train_experts.py", "train_experts:\n  experts:\n    a: {}\n", "data/splits.csv not found: run stage 3"),
        ("05_ensemble_predict.py", "ensemble_predict:\n  experts: []\n", "ensemble_predict.experts is empty"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, script, params_text, message):
    p = tmp_path / "params.yaml"
    p.write_text(params_text)
    res = _run(script, p)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_the_stages_have_one_name_each():
    """Script 0N_<name>.py, params section <name>, package dfpipe.<name> and DVC stage <name>, in DAG order."""
    names = list(STAGE_CONFIGS)
    assert SCRIPTS == [f"{i:02d}_{name}.py" for i, name in enumerate(names, 1)]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == names
    for i, name in enumerate(names, 1):
        cmd = stages[name]["do"]["cmd"] if "foreach" in stages[name] else stages[name]["cmd"]
        assert f"{i:02d}_{name}.py" in cmd.split(), cmd
        run = importlib.import_module(f"dfpipe.{name}").run
        assert list(inspect.signature(run).parameters)[:2] == ["cfg", "layout"], name


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_runs_its_stage_through_the_harness(script):
    """The script's one statement is ``harness.stage("<name>", __doc__[, options])``, <name> its own."""
    name = script[3:-3]
    calls = [node for node in ast.walk(ast.parse((REPO / script).read_text()))
             if isinstance(node, ast.Call) and ast.unparse(node.func) == "harness.stage"]
    assert len(calls) == 1, script
    (call,) = calls
    assert isinstance(call.args[0], ast.Constant) and call.args[0].value == name
    assert ast.unparse(call.args[1]) == "__doc__"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_reads_the_section_named_as_its_stage(tmp_path, script):
    """Run with a params file that has every section but its own: the one-line error names that section."""
    name = script[3:-3]
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({other: {} for other in STAGE_CONFIGS if other != name}))
    res = _run(script, p)
    assert res.returncode == 2, res.stderr
    assert f"no section '{name}'" in res.stderr and "Traceback" not in res.stderr


def test_train_script_options():
    """04_train_experts.py takes --expert and --history (passed to the stage's run); --live-dir is gone."""
    res = subprocess.run([sys.executable, str(REPO / "04_train_experts.py"), "--help"], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--expert" in res.stdout and "--history" in res.stdout and "--live-dir" not in res.stdout
    params = inspect.signature(importlib.import_module("dfpipe.train_experts").run).parameters
    assert {"expert", "history"} <= set(params)
