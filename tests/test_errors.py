"""A user's mistake is one line and exit code 2; a bug keeps its traceback."""

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dfpipe import harness
from dfpipe.errors import ConfigError, DataError, InputError, UnknownNameError, UserError
from conftest import layout_in

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DFPIPE_DEBUG"}
    return {**env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", **extra}


def _prepare(tmp_path: Path, params_text: str, **env: str) -> subprocess.CompletedProcess:
    p = tmp_path / "params.yaml"
    p.write_text(params_text)
    return subprocess.run([sys.executable, str(REPO / "01_prepare_data.py"), "--params", str(p)], cwd=tmp_path,
                          env=_env(**env), capture_output=True, text=True, timeout=120)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("params_text, words", [
    ("prepare_data:\n  max_sid: 64\n", ["prepare_data: unknown key(s) ['max_sid']", "did you mean 'max_side'?"]),
    ("prepare_data:\n  face_crop: har\n", ["prepare_data.face_crop: 'har' is not allowed", "did you mean 'haar'?"]),
    ("paths:\n  data_root: nowhere\nprepare_data: {}\n", ["InputError", "data_root nowhere does not exist",
                                                          "paths.data_root"]),
    ("paths:\n  data_rot: x\nprepare_data: {}\n", ["paths: unknown key(s) ['data_rot']",
                                                    "did you mean 'data_root'?"]),
])
def test_user_error_is_one_line_and_exit_2(tmp_path, params_text, words):
    res = _prepare(tmp_path, params_text)
    assert res.returncode == 2, res.stderr
    (line,) = _lines(res.stderr)
    assert all(w in line for w in words), line
    assert "Traceback" not in res.stderr


def test_dfpipe_debug_shows_the_traceback_of_a_user_error(tmp_path):
    res = _prepare(tmp_path, "prepare_data:\n  max_sid: 64\n", DFPIPE_DEBUG="1")
    assert res.returncode not in (0, 2)
    assert "Traceback" in res.stderr and "ConfigError" in res.stderr


def test_a_bug_in_a_stage_keeps_its_traceback(tmp_path):
    """A KeyError deep inside the stage (not a UserError) is a bug: full traceback, non-zero exit."""
    (tmp_path / "params.yaml").write_text("prepare_data: {}\n")
    code = ("import runpy, sys\n"
            "import dfpipe.prepare_data as p\n"
            "def broken(cfg, layout):\n"
            "    return {}['no_such_column']\n"
            "p.run = broken\n"
            f"sys.argv = ['01_prepare_data.py', '--params', {str(tmp_path / 'params.yaml')!r}]\n"
            f"runpy.run_path({str(REPO / '01_prepare_data.py')!r}, run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode not in (0, 2), res.stderr
    assert "Traceback" in res.stderr and "in broken" in res.stderr and "KeyError: 'no_such_column'" in res.stderr


def _args() -> argparse.Namespace:
    return argparse.Namespace(verbose=False, params="params.yaml")


def test_harness_run_reraises_a_bug(monkeypatch):
    monkeypatch.delenv("DFPIPE_DEBUG", raising=False)

    def main(args):
        return {"a": 1}["b"]  # a plain KeyError: a bug, not a user error

    with pytest.raises(KeyError, match="'b'"):
        harness.run(main, _args())


@pytest.mark.parametrize("exc", [ConfigError("params.yaml:cluster_split.n_folds: must be >= 2"),
                                 InputError("data/splits.csv not found: run stage 3"),
                                 UnknownNameError("expert 'x' not in params train_experts.experts"),
                                 DataError("no usable labelled image")])
def test_harness_run_reports_a_user_error_in_one_line(monkeypatch, caplog, exc):
    monkeypatch.delenv("DFPIPE_DEBUG", raising=False)

    def main(args):
        raise exc

    with caplog.at_level(logging.ERROR, logger="dfpipe.harness"), pytest.raises(SystemExit) as done:
        harness.run(main, _args())
    assert done.value.code == 2
    (record,) = caplog.records
    assert record.getMessage() == f"{type(exc).__name__}: {exc.args[0]}"  # no repr quotes, even for KeyError
    monkeypatch.setenv("DFPIPE_DEBUG", "1")
    with pytest.raises(type(exc)):
        harness.run(main, _args())


def test_error_classes_are_user_errors_and_keep_their_builtin_bases():
    from dfpipe.config import ConfigError as ConfigErrorFromConfig
    from dfpipe.data.images import ImageError
    from dfpipe.data.labels import LabelError
    from dfpipe.metrics import MetricError
    from dfpipe.models.pretrained import WeightsUnavailableError

    assert ConfigErrorFromConfig is ConfigError
    for cls, builtin in ((ConfigError, ValueError), (LabelError, ValueError), (ImageError, ValueError),
                         (MetricError, ValueError), (WeightsUnavailableError, RuntimeError),
                         (InputError, FileNotFoundError), (UnknownNameError, KeyError), (DataError, ValueError)):
        assert issubclass(cls, UserError) and issubclass(cls, builtin), cls
    assert str(UnknownNameError("unknown expert 'x'")) == "unknown expert 'x'"
    assert str(ImageError("truncated", kind="corrupt")) == "truncated"


def test_stage_code_raises_user_errors_for_user_mistakes(tmp_path):
    from dfpipe.config import TrainConfig
    from dfpipe.data.samples import load_pool
    from dfpipe.models import EXPERTS
    from dfpipe.cluster_split.kmeans import make_engine
    from dfpipe.train_experts.loop import run as run_train

    with pytest.raises(InputError, match="run stage 1"):
        load_pool(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown k-means backend 'gpu'"):
        make_engine("gpu")
    with pytest.raises(UnknownNameError, match="expert 'nope' not in params train_experts.experts"):
        run_train(TrainConfig(), layout_in(tmp_path), expert="nope")
    with pytest.raises(UnknownNameError, match="no_such_arch"):
        EXPERTS.get("no_such_arch")


def test_cli_reports_a_user_error_in_one_line_and_keeps_a_bug(monkeypatch, capsys):
    from dfpipe import cli

    monkeypatch.delenv("DFPIPE_DEBUG", raising=False)

    def user_mistake(args):
        raise InputError("x.json: ensemble card not found")

    def bug(args):
        return {}["boom"]

    monkeypatch.setitem(cli.COMMANDS, "predict", user_mistake)
    assert cli.main(["predict", "a.jpg"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err == "dfpipe: error: x.json: ensemble card not found"
    monkeypatch.setitem(cli.COMMANDS, "predict", bug)
    with pytest.raises(KeyError, match="boom"):
        cli.main(["predict", "a.jpg"])
