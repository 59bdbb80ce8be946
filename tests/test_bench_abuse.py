"""Smoke test of bench/bench_abuse.py at tiny sizes: every scenario runs against a real server and its report
holds the measured fields (the committed reports/bench/bench_abuse.json is the full-size run)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_abuse.py"


def test_bench_abuse_runs_every_scenario_at_tiny_sizes(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_abuse", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--out", str(tmp_path / "b.json"), "--side", "400", "--a-images", "3", "--b-batches", "2",
                    "--b-images", "2", "--c-predicts", "3", "--d-mb", "40", "--e-connections", "30",
                    "--fuzz-cases", "25", "--header-timeout", "1"])
    r = json.loads(out.read_text())
    assert r["a"]["status"] == 200 and r["a"]["scored"] == 3 and r["a"]["peak_rss_over_idle_mb"] >= 0
    assert r["b"]["statuses"] == {"200": 2} and r["b"]["images_scored"] == 4
    assert r["c"]["explain_status"] == 200 and r["c"]["predict_statuses"] == [200]
    bypass = r["d"]["cases"]["content-length + chunked, multipart batch"]
    assert bypass["answer"] == "HTTP/1.1 400" and bypass["mb_sent_before_answer"] < 2
    assert r["d"]["cases"]["chunked JSON /predict"]["answer"] == "HTTP/1.1 413"
    assert r["e"]["closed_by_server"] == 30 and r["e"]["s_until_health_200_again"] is not None
    assert r["f"]["cases"] == 25 and r["f"]["n_5xx"] == 0
    assert r["counts"]["a_images"] == 3 and r["server_alive_at_end"]
