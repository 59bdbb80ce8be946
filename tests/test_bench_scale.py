"""Smoke tests of bench/bench_scale.py (stages 1-3 at several sizes, CPU, tiny) and of the GPU check
(bench/gpu_check.sh -> bench/gpu_check.py, every phase on CPU, tiny): the reports have their fields, their numbers
are measured and consistent, and the process-tree sampler really sees the memory of a child's children."""

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dfpipe.ensemble_predict import Ensemble

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_scale.py"
GPU_CHECK = REPO / "bench" / "gpu_check.sh"
MB = 2**20


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env() -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _run_script(args: list[str], cwd: Path, timeout: int = 900, env: dict | None = None) -> None:
    """A bench as a script (its process pools need the ``__main__`` guard), failing with its output."""
    cmd = ["bash", *args] if args[0].endswith(".sh") else [sys.executable, *args]
    res = subprocess.run(cmd, check=False, cwd=cwd, env={**_env(), **(env or {})}, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{args[0]} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"


def test_sampler_sees_a_grandchild_allocating_200_mb():
    """The child only starts a grandchild, which holds 200 MB: the tree's peak must include it."""
    mod = _load(BENCH, "bench_scale")
    grandchild = "import time; b = b'x' * (200 << 20); time.sleep(2.0)"  # written, so resident
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}], check=True)"
    m = mod.run_measured([sys.executable, "-c", child], every=0.05)
    assert m["returncode"] == 0
    assert m["max_processes"] >= 2
    assert m["peak_rss_bytes"] >= 200 * MB
    assert m["peak_pss_bytes"] == 0 or m["peak_pss_bytes"] >= 190 * MB
    alone = mod.run_measured([sys.executable, "-c", "import time; time.sleep(1.0)"], every=0.05)
    assert alone["max_processes"] == 1 and alone["peak_rss_bytes"] < m["peak_rss_bytes"] - 150 * MB


def test_synthetic_files_differ_and_the_sizes_parse(tmp_path):
    mod = _load(BENCH, "bench_scale")
    sizes = mod.generate(tmp_path, 30, 0, 4, 64, 96, workers=1)
    files = sorted(tmp_path.glob("*.jpg"))
    assert len(files) == 30 and [f.stat().st_size for f in files] == sizes.tolist()
    assert len({f.read_bytes() for f in files}) == 30  # 4 backgrounds, 30 different files
    assert mod.parse_sizes(["400,200", "200"]) == [200, 400]
    with pytest.raises(ValueError):
        mod.parse_sizes(["5"])


@pytest.mark.slow
def test_bench_scale_tiny_run(tmp_path):
    out = tmp_path / "scale.json"
    _run_script([str(BENCH), "--out", str(out), "--sizes", "200", "400", "--train-sample", "100", "--workers", "1",
                 "--gen-workers", "2", "--train-workers", "0", "--every", "0.1"], cwd=tmp_path)
    report = json.loads(out.read_text())
    assert set(report) >= {"runs", "targets", "checks", "machine", "settings", "generate"}
    runs = report["runs"]
    assert [r["n_images"] for r in runs] == [200, 400]
    for r in runs:
        assert set(r) >= {"n_images", "seconds", "peak_rss_mb", "disk_bytes", "input_bytes", "stages", "train_sample"}
        stages = r["stages"]
        assert set(stages) == {"prepare", "augment", "split"}
        for s in stages.values():
            assert s["seconds"] > 0 and s["stage_seconds"] > 0 and s["disk_bytes"] > 0
            assert s["seconds"] >= s["stage_seconds"]  # the child's wall time holds run()'s
            assert s["peak_rss_mb"] >= 30  # at least a Python interpreter: the child was really sampled
            assert s["max_processes"] >= 1
        assert stages["split"]["peak_rss_mb"] >= 100  # torch is imported there
        # the run's totals are its stages'
        assert r["seconds"] == pytest.approx(sum(s["seconds"] for s in stages.values()))
        assert r["disk_bytes"] == sum(s["disk_bytes"] for s in stages.values())
        assert r["peak_rss_mb"] == max(s["peak_rss_mb"] for s in stages.values())
        # stage 1 keeps clean JPEGs as they came: its store is the input files' bytes
        prep = stages["prepare"]
        assert prep["n_skipped"] == 0 and sum(prep["n_prepared"].values()) == r["n_images"]
        assert prep["store"]["input_bytes"] == r["input_bytes"]
        assert prep["store"]["ratio"] == pytest.approx(1.0, abs=0.01) and prep["store"]["n_png"] == 0
        assert r["input_bytes"] <= prep["disk_bytes"] <= 1.2 * r["input_bytes"]  # + manifest, dedup tables
        assert r["disk_bytes"] > prep["disk_bytes"]
        assert prep["duplicates"]["n_pairs"] == 0  # the synthetic files are no near duplicates
        assert stages["augment"]["n_generated"] > 0
        assert stages["split"]["n_split"] >= 0.9 * r["n_images"]  # train + val originals + generated
        t = r["train_sample"]
        assert t["n_train"] > 0 and t["n_val"] > 0 and t["seconds"] > 0 and t["epochs"] == 1
    assert runs[1]["input_bytes"] > runs[0]["input_bytes"]
    c = report["checks"]
    assert c["smallest_n"] == 200 and c["largest_n"] == 400
    per_image = [r["seconds"] / r["n_images"] for r in runs]
    assert c["time_per_image_ratio"] == pytest.approx(per_image[1] / per_image[0])
    assert c["peak_rss_mb"] == max(r["peak_rss_mb"] for r in runs)
    assert c["disk_ratio"] == pytest.approx(runs[1]["disk_bytes"] / runs[1]["input_bytes"])  # the largest run's
    assert runs[1]["disk_ratio_by_stage"]["prepare"] == pytest.approx(
        runs[1]["stages"]["prepare"]["disk_bytes"] / runs[1]["input_bytes"])
    assert c["all_ok"] == all(c[k] is not False for k in ("time_per_image_ok", "peak_rss_ok", "disk_ok"))
    assert report["machine"]["cpu_count"] == os.cpu_count()


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    """bench/gpu_check.sh (this interpreter as $PYTHON) -> bench/gpu_check.py on CPU, every step at a tiny size."""
    out, dollar_out = tmp_path / "gpu.json", tmp_path / "OUT"
    dollar_out.mkdir()
    _run_script([str(GPU_CHECK), "--n-train", "64", "--n-score", "64", "--img-size", "64",
                 "--min-px", "64", "--max-px", "96", "--backbone", "test_efficientnet", "--pretrained", "none",
                 "--workers", "0", "--batch-size", "16", "--score-batch-size", "32", "--decode", "both",
                 "--work", str(tmp_path / "work")],
                cwd=tmp_path, env={"PYTHON": sys.executable, "GPU_CHECK_OUT": str(out), "OUT": str(dollar_out)})
    report = json.loads(out.read_text())
    assert json.loads((dollar_out / "gpu.json").read_text()) == report  # the copy the device tool brings back
    assert report["complete"] is True
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["torch"]
    for key in ("end_to_end_images_per_s", "model_only_images_per_s", "ratio", "train_images_per_s"):
        assert report[key] > 0, key
    assert report["ratio"] == pytest.approx(report["end_to_end_images_per_s"] / report["model_only_images_per_s"])
    assert report["n_score"] == 64 and report["n_train_files"] == 64 and report["n_prepared"] == 64
    assert report["score"]["model_only_images"] == 64 and report["score"]["model_only_batches"] == 2
    assert len(report["experts"]) == 2 and all(e["img_size"] == 64 for e in report["experts"])
    assert report["score"]["n_errors"] == 0
    assert report["end_to_end"]["workers"]["images_per_s"] == report["end_to_end_images_per_s"]
    if "decode" in inspect.signature(Ensemble.score_files).parameters:  # nvJPEG path offered: timed too
        assert report["decode_paths"] == ["workers", "device"]
        dev = report["end_to_end"]["device"]
        assert dev["n_errors"] == 0 and dev["images_per_s"] == report["end_to_end_device_decode_images_per_s"] > 0
        assert dev["max_abs_score_diff_vs_workers"] < 1e-3
        assert "end_to_end_images_per_s_device_decode" in report["targets_met"]
    else:
        assert report["decode_paths"] == ["workers"]
    assert set(report["timings_s"]) >= {"generate", "prepare", "train", "end_to_end", "model_only"}
    assert report["precision"]["dtype"] == "float32" and report["precision"]["channels_last"] is True
    assert isinstance(report["targets_met"]["end_to_end_vs_model_only"], bool)
