"""Smoke test of bench/bench_predict.py: tiny sizes, both paths run and agree (the bench asserts 1e-5)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_predict.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_predict", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_runs_and_the_two_paths_agree(tmp_path):
    out = _bench().main(["--out", str(tmp_path / "b.json"), "--n", "6", "--size", "40", "--cache-size", "48",
                         "--min-side", "30", "--max-side", "70", "--workers", "0", "--tta", "identity,hflip"])
    report = json.loads(Path(out).read_text())
    assert report["max_abs_diff"] <= 1e-5 and report["speedup"] > 0
    assert report["experts"] == {"e0_40": 40, "e1_32": 32} and report["tta"] == ["identity", "hflip"]
    assert report["baseline"]["images_per_s"] > 0 and report["machine"]["cpu_count"] >= 1
