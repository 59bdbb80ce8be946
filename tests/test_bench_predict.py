"""Smoke test of bench/bench_predict.py: tiny sizes, both paths run and agree (the bench asserts 1e-5),
the report's numbers are the ones it measured, and a baseline that disagrees is refused."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_predict.py"
ARGS = ["--n", "6", "--size", "40", "--cache-size", "48", "--min-side", "30", "--max-side", "70", "--workers", "0",
        "--tta", "identity,hflip"]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_predict", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_runs_and_the_two_paths_agree(tmp_path):
    out = _bench().main(["--out", str(tmp_path / "b.json"), *ARGS])
    report = json.loads(Path(out).read_text())
    assert report["max_abs_diff"] <= report["tolerance"] == 1e-5
    assert report["experts"] == {"e0_40": 40, "e1_32": 32} and report["tta"] == ["identity", "hflip"]
    assert report["n_images"] == 6 and report["baseline"]["decodes_per_image"] == 2
    # the report's rates are its timings: the best of the repeats (one here), n / seconds, speedup = their ratio
    runs = report["runs"]
    assert len(runs["baseline_seconds"]) == len(runs["ensemble_seconds"]) == 1
    for path, key in (("baseline", "baseline_seconds"), ("ensemble", "ensemble_seconds")):
        assert report[path]["seconds"] == min(runs[key])
        assert report[path]["images_per_s"] == pytest.approx(6 / report[path]["seconds"])
    assert report["speedup"] == pytest.approx(report["baseline"]["seconds"] / report["ensemble"]["seconds"])
    assert report["machine"]["cpu_count"] == os.cpu_count()


def test_bench_refuses_a_baseline_that_disagrees(tmp_path, monkeypatch):
    """The agreement check can fail: a baseline that feeds BGR instead of RGB is caught, no report written."""
    mod = _bench()
    real = mod.preprocess_one
    monkeypatch.setattr(mod, "preprocess_one", lambda *args: real(*args).flip(0))  # (3, S, S): RGB -> BGR
    with pytest.raises(AssertionError, match="scores differ"):
        mod.main(["--out", str(tmp_path / "b.json"), *ARGS])
    assert not (tmp_path / "b.json").exists()
