"""The numbered scripts: bad configuration gives one clear line and exit code 2, not a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, params: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / script), "--params", str(params)], cwd=params.parent,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "script, params_text, message",
    [
        ("01_prepare_data.py", "prepare:\n  data_root: nowhere\n", "data_root nowhere does not exist"),
        ("01_prepare_data.py", "prepare:\n  cache_sise: 64\n", "unknown key(s) ['cache_sise']"),
        ("03_cluster_split.py", "split: {}\n", "data/prepared/manifest.csv not found: run stage 1"),
        ("04_train_experts.py", "train: {}\n", "data/splits.csv not found: run stage 3"),
        ("05_ensemble_predict.py", "predict:\n  experts: []\n", "predict.experts is empty"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, script, params_text, message):
    p = tmp_path / "params.yaml"
    p.write_text(params_text)
    if script == "04_train_experts.py":
        p.write_text("train:\n  experts:\n    a: {}\n")
    res = _run(script, p)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
