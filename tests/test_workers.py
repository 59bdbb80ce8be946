"""A killed stage leaves nothing behind: its spawned workers end with it (dfpipe.workers), and the next run of
a stage removes the temp files a killed one left for its outputs (dfpipe.io.remove_stale_temps, run by the
stage scripts' harness), and only those."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]

PARENT = """
import json, multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
import importlib
init = getattr(importlib.import_module(sys.argv[1]), "_init_worker")
pool = ProcessPoolExecutor(2, initializer=init, mp_context=multiprocessing.get_context("spawn"))
list(pool.map(abs, range(8)))  # both workers started and initialised
print(json.dumps(sorted(pool._processes)), flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped by init
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("module", ["dfpipe.data.decode_pool", "dfpipe.prepare_data.pool"])
def test_spawned_workers_exit_when_their_stage_is_killed(module):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, module], env=env, stdout=subprocess.PIPE, text=True)
    try:
        workers = json.loads(parent.stdout.readline())
        assert len(workers) == 2 and not any(_gone(p) for p in workers)
    finally:
        parent.send_signal(signal.SIGKILL)  # no clean-up runs: what a kill -9 or the OOM killer does
        parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(_gone(p) for p in workers):
        time.sleep(0.2)
    alive = [p for p in workers if not _gone(p)]
    for p in alive:  # never leave them behind, even when the test fails
        os.kill(p, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their killed parent"


def test_a_stage_removes_its_own_stale_temp_files_only(tmp_path):
    """03_cluster_split.py (which then stops: no stage-1 store) removes the temps of its outputs and nothing else."""
    data = tmp_path / "data"
    data.mkdir()
    own = [data / ".features.npy.k2j4x_9a.tmp", data / ".splits.csv.abcdefgh.tmp", data / ".cluster_report.png.zz0zz0zz.tmp"]
    kept = [data / ".prepare_report.json.abcdefgh.tmp",  # stage 1's
            data / ".features.npy.bak", data / "features.npy.tmp", data / "notes.txt"]
    for p in own + kept:
        p.write_bytes(b"x" * 10)
    (tmp_path / "params.yaml").write_text("cluster_split: {}\n")
    res = subprocess.run([sys.executable, str(REPO / "03_cluster_split.py"), "--params", "params.yaml"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "manifest.csv not found" in res.stderr, res.stderr
    assert not any(p.exists() for p in own), [p.name for p in own if p.exists()]
    assert all(p.exists() for p in kept)
    assert "removed 3 stale temp file(s) of cluster_split" in res.stderr


def test_stale_temps_inside_an_output_folder_and_of_one_expert(tmp_path):
    from dfpipe.harness import stage_outputs
    from dfpipe.io import remove_stale_temps
    from dfpipe.layout import Layout

    layout = Layout().under(tmp_path)
    a, b = Path(layout.models) / "a", Path(layout.models) / "b"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / ".best.pt.q1w2e3r4.tmp").write_bytes(b"x")
        (d / "best.pt").write_bytes(b"x")
    removed = remove_stale_temps(stage_outputs(layout, "train_experts", "a"))  # 04_train_experts.py --expert a
    assert removed == [a / ".best.pt.q1w2e3r4.tmp"] and (b / ".best.pt.q1w2e3r4.tmp").exists()
    assert remove_stale_temps(stage_outputs(layout, "train_experts")) == [b / ".best.pt.q1w2e3r4.tmp"]
    assert (a / "best.pt").exists() and (b / "best.pt").exists()
