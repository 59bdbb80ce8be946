"""The benchmark grid run for real on two tiny sources (CPU): in-process with its robustness pass (issue 16,
item 2). Slow: about 40 s on 2 busy cores."""

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from dfpipe.benchmark import cell_dir, load_grid, load_sources, run_grid

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

RECIPE = {"img_size": 32, "batch_size": 16, "lr_ref_batch": 16, "lr": 0.002, "augment": "light",
          "use_augmented": False, "loss": {"ce": 1.0, "kl": 0.0, "nce": 0.0}}


def _grid(data_root: Path, robustness: dict | None = None) -> dict:
    return {"data_root": str(data_root), "params": str(REPO / "params.yaml"), "sources": ["demo", "folders"],
            "seeds": [0], "epochs": 1, "heldout": 0.3, "baseline": "base",
            "augment": {"fakes_per_real": 0.25, "workers": 1},
            "split": {"kmeans_backend": "sklearn", "n_clusters": 3, "n_folds": 2, "img_size": 32, "batch_size": 32,
                      "contact_sheet": ""},
            "predict": {"tta": ["identity"], "batch_size": 32},
            "evaluate": {"degradations": [], "bootstrap": 0, "batch_size": 32, "workers": 0},
            "recipes": {"base": RECIPE},
            "robustness": robustness or {"degradations": ["jpeg50", "half"]}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two sources: the demo dataset (competition layout) and real/ + fake/ folders; a grid of 2 cells."""
    from dfpipe.demo import make_demo_dataset

    from conftest import photo_like, write_jpeg

    t = tmp_path_factory.mktemp("bench")
    data = t / "data"
    make_demo_dataset(data / "demo", seed=0, n_train=40, n_val=24, n_test=2, size_range=(48, 64),
                      fake_kinds=dict.fromkeys(("train", "val", "test"), ["upsample"]))
    rng = np.random.default_rng(1)
    for i in range(20):
        write_jpeg(data / "folders" / "real" / f"r{i:02d}.jpg", photo_like(rng, 48, 48))
        img = photo_like(rng, 24, 24).repeat(2, axis=0).repeat(2, axis=1)  # blocky up-sampling: the "fakes"
        write_jpeg(data / "folders" / "fake" / f"f{i:02d}.jpg", img)
    grid = t / "grid.yaml"
    grid.write_text(yaml.safe_dump(_grid(data)))
    return t, data, grid


@pytest.fixture(scope="module")
def in_process(tiny, one_torch_thread):
    t, _, grid = tiny
    t0 = time.perf_counter()
    out = run_grid(load_grid(grid), t / "work", t / "out")
    return out, time.perf_counter() - t0


def test_in_process_grid_scores_each_cell_under_the_degradations(tiny, in_process):
    t, _, grid_path = tiny
    grid, seconds = in_process
    spec = load_grid(grid_path)
    print(f"in-process grid: 2 cells + robustness in {seconds:.0f} s")
    assert [(c["train_source"], c["recipe"]) for c in grid["cells"]] == [("demo", "base"), ("folders", "base")]
    for c in grid["cells"]:
        rob = c["robustness"]
        cross = "folders" if c["train_source"] == "demo" else "demo"
        assert rob["sets"] == [cross] and rob["degradations"] == ["jpeg50", "half"]
        # the pass re-scores the cell's own card: clean equals the cell's own stage-6 AUC on that set
        assert rob["auc"][cross]["clean"] == pytest.approx(c["eval"][cross]["clean"]["auc"], abs=1e-9)
        assert set(rob["auc"][cross]) == {"clean", "jpeg50", "half"}
        # cached in the cell's folder, beside (not in) the cell's own results
        cell = cell_dir(spec, "base", 0, c["train_source"], t / "work")
        assert len(list(cell.glob("robustness_*.json"))) == 1 and (cell / "eval.json").is_file()
    table = (t / "out" / "table.md").read_text()
    assert "### robustness (cross-source ROC AUC under degradations)" in table
    row = next(line for line in table.splitlines() if line.startswith("| base | 2 |"))
    clean = np.mean([c["robustness"]["auc"][c["robustness"]["sets"][0]]["clean"] for c in grid["cells"]])
    half = np.mean([c["robustness"]["auc"][c["robustness"]["sets"][0]]["half"] for c in grid["cells"]])
    assert row.split(" | ")[2] == f"{clean:.3f}" and f"{half:.3f} ({half - clean:+.3f})" in row
    assert json.loads((t / "out" / "grid.json").read_text())["cells"][0]["robustness"] == grid["cells"][0]["robustness"]


def test_robustness_is_cached_per_setting_and_never_changes_a_cell(tiny, in_process, monkeypatch):
    from dfpipe import benchmark, evaluate

    t, _, grid_path = tiny
    spec = load_grid(grid_path)
    before = {c: (cell_dir(spec, "base", 0, c, t / "work") / "eval.json").read_bytes() for c in spec.sources}
    other = replace(spec, robustness=replace(spec.robustness, degradations=["blur1"]))
    for s in (replace(spec, robustness=benchmark.RobustnessSpec()), other):  # no pass / another pass: same cells
        assert {c: cell_dir(s, "base", 0, c, t / "work") for c in spec.sources} == \
               {c: cell_dir(spec, "base", 0, c, t / "work") for c in spec.sources}

    def no_scoring(cfg):
        raise AssertionError("scored again")

    monkeypatch.setattr(evaluate, "run_evaluate", no_scoring)
    again = run_grid(spec, t / "work", t / "out2", train=False)  # everything cached: gathers, scores nothing
    assert again["cells"] == in_process[0]["cells"] and "missing" not in again
    sources = load_sources(spec)
    with pytest.raises(AssertionError, match="scored again"):  # another degradation list is another record
        benchmark.run_robustness(other, "base", 0, sources["demo"], sources, t / "work")
    assert {c: (cell_dir(spec, "base", 0, c, t / "work") / "eval.json").read_bytes() for c in spec.sources} == before


def test_table_lists_unfinished_cells_and_trains_nothing(tiny, in_process):
    t, _, grid_path = tiny
    spec = load_grid(grid_path)
    spec = replace(spec, seeds=[0, 7])  # seed 7 never ran
    grid = run_grid(spec, t / "work", t / "out3", train=False)
    assert len(grid["cells"]) == 2 and grid["missing"] == ["demo/base/s7", "folders/base/s7"]
    assert (t / "out3" / "table.md").read_text().startswith("Not finished, left out: demo/base/s7, folders/base/s7.")
    assert not cell_dir(spec, "base", 7, "demo", t / "work").exists()

