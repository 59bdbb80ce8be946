"""bench/trace_stages.py's counting (issue 26's call-by-call measure): returns, and counting from the stage's run."""

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "bench" / "trace_stages.py"


@pytest.fixture(scope="module")
def trace():
    spec = importlib.util.spec_from_file_location("trace_stages", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("files, returns", [
    (["a", "b", "a"], 1), (["a", "a", "b"], 0), (["a", "b", "a", "b", "a"], 3), ([], 0), (["a", "b", "c"], 0)])
def test_returns_count_re_entries_of_a_file_left_earlier(trace, files, returns):
    assert trace.count_returns(files) == returns


def _raw(trace, calls):
    """A tracer record: the harness cleans temp files (layout) before the stage's run (config), as every script does."""
    codes = [["dfpipe/harness.py", "stage_outputs"], ["dfpipe/io.py", "remove_stale_temps"],
             ["dfpipe/x/pipeline.py", "run"], ["dfpipe/x/work.py", "Work.load"], ["dfpipe/io.py", "write_json"]]
    return {"codes": codes, "calls": calls, "exit_code": 0, "wall_s": 0.0, "config_class": "XConfig",
            "layout_seen": True, "dfpipe_calls": len(calls), "dfpipe_imported_from": "dfpipe/__init__.py"}


def test_counts_start_at_the_stages_run_not_at_the_harness_cleanup_before_it(trace):
    C, L, V = trace.CONFIG, trace.LAYOUT, trace.LAYOUT_VALUE
    # harness.stage_outputs(layout) and io.remove_stale_temps(paths) come first, then run(cfg, layout) ->
    # work.Work.load(path) -> io.write_json(path): io is entered twice, but only once from run on
    calls = [[0, L, True], [1, V, False], [2, C | L, False], [3, V, False], [4, V, False]]
    res = trace.analyse(_raw(trace, calls))
    assert res["entry"] == "dfpipe/x/pipeline.py:run"
    whole, from_run = res["config_layout_or_values"], res["from_entry"]["config_layout_or_values"]
    assert (whole["calls"], whole["files"], whole["returns"]) == (5, 4, 1)
    assert (from_run["calls"], from_run["files"], from_run["returns"]) == (3, 3, 0)
    assert [f for f, _ in res["sequence"]["config_layout_or_values"]] == [
        "dfpipe/x/pipeline.py", "dfpipe/x/work.py", "dfpipe/io.py"]


def test_old_entry_names_and_no_run_fall_back_sensibly(trace):
    names = ["m.py:run_train", "m.py:helper"]
    C = trace.CONFIG
    assert trace.stage_entry([[1, C, True], [0, C, False]], names) == 1  # run_<stage>: the old code's entry
    assert trace.stage_entry([[1, C, True], [1, C, False]], names) == 0  # no run: the script's first call
    assert trace.stage_entry([[1, 0, False]], names) is None
