"""The benchmark grid run for real on two tiny sources (CPU): in-process with its robustness pass, and as DVC
experiments through ``dvc exp run --queue`` + ``dvc queue start`` in a temp git repo (issue 16, items 1-2).

Slow: about 40 s for the in-process grid, about 80 s more for the queue, about 10 s for one cell trained on two
sources at once (a third source for its cross column), on 2 busy cores."""

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dfbench import cell_dir, load_grid, load_sources, run_grid
from dfpipe.errors import UnknownNameError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

RECIPE = {"img_size": 32, "batch_size": 16, "lr_ref_batch": 16, "lr": 0.002, "augment": "light",
          "use_augmented": False, "loss": {"ce": 1.0, "kl": 0.0, "nce": 0.0}}


def _grid(data_root: Path, robustness: dict | None = None) -> dict:
    return {"data_root": str(data_root), "params": str(REPO / "params.yaml"), "sources": ["demo", "folders"],
            "seeds": [0], "epochs": 1, "heldout": 0.3, "baseline": "base",
            "augment_sd": {"fakes_per_real": 0.25, "workers": 1},
            "cluster_split": {"kmeans_backend": "sklearn", "n_clusters": 3, "n_folds": 2, "img_size": 32,
                              "batch_size": 32},
            "ensemble_predict": {"tta": ["identity"], "batch_size": 32},
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
    # each fake "made from" the real of its number (dfdc_faces' layout): the folder source is split by pair
    (data / "folders" / "pairs.csv").write_text("fake,real\n" + "".join(f"fake/f{i:02d}.jpg,real/r{i:02d}.jpg\n"
                                                                      for i in range(20)))
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
    import dfbench as benchmark

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
    version = benchmark.process_code_version()  # the code that trained each cell, recorded and counted in the table
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?", version) and {c["code"] for c in grid["cells"]} == {version}
    assert f"Code that trained the 2 cells: {version} (2)." in table
    row = next(line for line in table.splitlines() if line.startswith("| base | 2 |"))
    clean = np.mean([c["robustness"]["auc"][c["robustness"]["sets"][0]]["clean"] for c in grid["cells"]])
    half = np.mean([c["robustness"]["auc"][c["robustness"]["sets"][0]]["half"] for c in grid["cells"]])
    assert row.split(" | ")[2] == f"{clean:.3f}" and f"{half:.3f} ({half - clean:+.3f})" in row
    assert json.loads((t / "out" / "grid.json").read_text())["cells"][0]["robustness"] == grid["cells"][0]["robustness"]


def test_robustness_is_cached_per_setting_and_never_changes_a_cell(tiny, in_process, monkeypatch):
    import dfbench as benchmark
    from dfpipe import evaluate

    t, _, grid_path = tiny
    spec = load_grid(grid_path)
    before = {c: (cell_dir(spec, "base", 0, c, t / "work") / "eval.json").read_bytes() for c in spec.sources}
    other = replace(spec, robustness=replace(spec.robustness, degradations=["blur1"]))
    for s in (replace(spec, robustness=benchmark.RobustnessSpec()), other):  # no pass / another pass: same cells
        assert {c: cell_dir(s, "base", 0, c, t / "work") for c in spec.sources} == \
               {c: cell_dir(spec, "base", 0, c, t / "work") for c in spec.sources}

    def no_scoring(cfg, layout):
        raise AssertionError("scored again")

    monkeypatch.setattr(evaluate, "run", no_scoring)
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


def test_an_ensemble_row_combines_the_members_cells_without_training(tiny, in_process, monkeypatch):
    """`ensembles:` rows: the members' finished cells (same source, seed) through stage 5 + 6, their best.pt
    linked, not trained again; mean_prob = the mean of the members' scores image by image; cached like a cell."""
    import dfbench as benchmark
    from dfpipe import evaluate

    t, _, grid_path = tiny
    raw = yaml.safe_load(grid_path.read_text())
    raw["recipes"]["wide"] = {**RECIPE, "lr": 0.004}
    raw["ensembles"] = {"pair": ["base", "wide"]}
    raw["robustness"] = {}
    spec = load_grid(_write(t / "grid_ens.yaml", raw))
    assert benchmark.ensemble_cells(spec) == [("pair", 0, "demo"), ("pair", 0, "folders")]
    assert benchmark.ensemble_cells(spec, ["base"]) == []  # a member left out of the run: no ensemble row

    waiting = run_grid(spec, t / "work", t / "out_ens0", train=False)  # "wide" not trained yet: listed as missing
    assert "demo/pair/s0" in waiting["missing"] and not benchmark.ensemble_dir(spec, "pair", 0, "demo", t / "work").exists()

    grid = run_grid(spec, t / "work", t / "out_ens")
    pairs = [c for c in grid["cells"] if c["recipe"] == "pair"]
    assert [c["train_source"] for c in pairs] == ["demo", "folders"] and "missing" not in grid
    for c in pairs:
        d = benchmark.ensemble_dir(spec, "pair", 0, c["train_source"], t / "work")
        for m in ("base", "wide"):
            link = d / "models" / m / "best.pt"  # the cell layout's models entry (Layout.under keeps "models")
            assert link.is_symlink() and link.resolve() == (cell_dir(spec, m, 0, c["train_source"], t / "work")
                                                            / "models" / m / "best.pt").resolve()
        assert c["members"] == ["base", "wide"] and set(c["eval"]) == set(grid["cells"][0]["eval"])
        ens = pd.read_csv(c["scores_csv"]).set_index(["set", "degradation", "img_name"]).score
        members = [pd.read_csv(cell_dir(spec, m, 0, c["train_source"], t / "work") / "reports" / "eval" / "scores.csv")
                   .set_index(["set", "degradation", "img_name"]).score for m in ("base", "wide")]
        assert len(ens) == len(members[0]) > 0
        np.testing.assert_allclose(ens.to_numpy(), ((members[0] + members[1]) / 2).loc[ens.index].to_numpy(),
                                   atol=1e-5)
    table = (t / "out_ens" / "table.md").read_text()
    assert "Ensemble rows (no training): pair = base + wide" in table
    assert sum(line.startswith("| pair | ") for line in table.splitlines()) == 3  # summary + one row per source

    def no_scoring(cfg, layout):
        raise AssertionError("scored again")

    monkeypatch.setattr(evaluate, "run", no_scoring)
    again = run_grid(spec, t / "work", t / "out_ens2", train=False)  # cached: nothing trained or scored
    assert [c["eval"] for c in again["cells"]] == [c["eval"] for c in grid["cells"]]


def test_a_one_member_row_rescores_a_recipes_cells_with_its_own_tta(tiny, in_process):
    """ensemble_predict_of: the row's card records its own TTA (the member's cell keeps the grid's), its scores
    come from that card, and the row's folder key differs from a row with the grid's settings."""
    import dfbench as benchmark
    from dfbench.cells import cell_layout

    t, _, grid_path = tiny
    raw = yaml.safe_load(grid_path.read_text())
    raw["ensembles"] = {"flipped": ["base"]}
    raw["ensemble_predict_of"] = {"flipped": {"tta": ["hflip", "vflip"]}}
    raw["robustness"] = {}
    spec = load_grid(_write(t / "grid_flip.yaml", raw))
    grid = run_grid(spec, t / "work", t / "out_flip")
    flips = [c for c in grid["cells"] if c["recipe"] == "flipped"]
    assert len(flips) == 2
    for c in flips:
        d = benchmark.ensemble_dir(spec, "flipped", 0, c["train_source"], t / "work")
        card = json.loads(Path(cell_layout(spec, c["train_source"], t / "work", d).card).read_text())
        member = cell_dir(spec, "base", 0, c["train_source"], t / "work")
        base_card = json.loads(Path(cell_layout(spec, c["train_source"], t / "work", member).card).read_text())
        assert card["tta"] == ["hflip", "vflip"] and base_card["tta"] == ["identity"]
        mine = pd.read_csv(c["scores_csv"]).score.to_numpy()
        base = pd.read_csv(member / "reports" / "eval" / "scores.csv").score.to_numpy()
        assert mine.shape == base.shape and not np.allclose(mine, base)  # other views, other scores
    same = replace(spec, ensemble_predict_of={})
    assert benchmark.ensemble_dir(same, "flipped", 0, "demo", t / "work") != \
        benchmark.ensemble_dir(spec, "flipped", 0, "demo", t / "work")


def test_an_ensemble_row_gets_a_robustness_pass_when_listed(tiny, in_process):
    """`robustness.recipes` may name an ensemble row: its cell (the linked members' card) is scored again on its
    cross-source set under the degradations, cached in the ensemble's folder; its clean AUC is the row's own;
    rows not listed get no pass; a name that is neither a recipe nor an ensemble fails when the grid loads."""
    import dfbench as benchmark

    t, _, grid_path = tiny
    raw = yaml.safe_load(grid_path.read_text())
    raw["recipes"]["wide"] = {**RECIPE, "lr": 0.004}
    raw["ensembles"] = {"pair": ["base", "wide"]}
    raw["robustness"] = {"degradations": ["half"], "recipes": ["pair"]}
    spec = load_grid(_write(t / "grid_ens_rob.yaml", raw))
    grid = run_grid(spec, t / "work", t / "out_ens_rob")
    rows = {(c["recipe"], c["train_source"]): c for c in grid["cells"]}
    assert not any(rows[(r, s)].get("robustness") for r in ("base", "wide") for s in ("demo", "folders"))
    for src, cross in (("demo", "folders"), ("folders", "demo")):
        c = rows[("pair", src)]
        rob = c["robustness"]
        assert rob["sets"] == [cross] and rob["degradations"] == ["half"]
        assert rob["auc"][cross]["clean"] == pytest.approx(c["eval"][cross]["clean"]["auc"], abs=1e-9)
        d = benchmark.ensemble_dir(spec, "pair", 0, src, t / "work")
        assert len(list(d.glob("robustness_*.json"))) == 1
    table = (t / "out_ens_rob" / "table.md").read_text()
    assert [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| pair | 2 |")] == [["| pair", "2"]]

    raw["robustness"]["recipes"] = ["pairs"]
    with pytest.raises(UnknownNameError, match=r"robustness.recipes \['pairs'\] not in the grid"):
        load_grid(_write(t / "grid_ens_bad.yaml", raw))


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# ----------------------------------------------------------------------------- the grid as DVC experiments
def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def _repo_copy(dst: Path, grid: dict) -> None:
    """What a queued cell needs, committed in a fresh git repo: the pipeline and the benchmark packages, the entry
    script, root params and the bench/grid DVC project; the grid file with this test's tiny settings."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("dfpipe", "dfbench"):  # the queued run imports both from the copy (PYTHONPATH=.)
        shutil.copytree(REPO / package, dst / package, ignore=ignore)
    shutil.copytree(REPO / "bench" / "grid", dst / "bench" / "grid", ignore=shutil.ignore_patterns("tmp", "metrics.json"))
    for f in ("bench/benchmark.py", "params.yaml", ".gitignore", "dvc.yaml", "dvc.lock", ".dvcignore", ".dvc/config",
              ".dvc/.gitignore"):  # the root DVC project too: the cell's project sits inside it, as in the repo
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)
    (dst / "bench" / "grid.yaml").write_text(yaml.safe_dump({**grid, "params": "params.yaml"}))


def _run_committing_meanwhile(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Run ``args`` and, once it has queued its cells, commit (HEAD moves while the queue runs, as when one keeps
    working in the repo): the cells must still be found as experiments of the commit they were queued on."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    for line in proc.stderr:
        err.append(line)
        if "queued " in line and "as DVC experiments" in line:
            _run(["git", "commit", "-q", "--allow-empty", "-m", "meanwhile"], cwd, env)
            break
    out, rest = proc.communicate()
    res = subprocess.CompletedProcess(args, proc.returncode, out, "".join(err) + rest)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    assert "meanwhile" in _run(["git", "log", "-1", "--format=%s"], cwd, env).stdout  # committed during the run
    return res


def test_grid_as_dvc_experiments(tiny, in_process, tmp_path):
    """`bench/benchmark.py queue`: one queued experiment per cell, run by `dvc queue start`, each listed by
    `dvc exp show` with its params and metrics, then the table. The demo cell is reused from the in-process run
    (the queue's own overhead); the folders cell trains in the queue."""
    import os

    from dfbench.queue import exp_name

    t, data, _ = tiny
    repo = tmp_path / "repo"
    _repo_copy(repo, _grid(data))
    env = {**os.environ, "PYTHONPATH": str(repo), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    _run(["git", "init", "-q"], repo, env)
    for k, v in (("user.name", "t"), ("user.email", "t@example.com")):  # dvc commits each experiment
        _run(["git", "config", k, v], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny grid"], repo, env)
    work = tmp_path / "work"
    shutil.copytree(t / "work", work)
    spec = load_grid(repo / "bench" / "grid.yaml")
    shutil.rmtree(cell_dir(spec, "base", 0, "folders", work))  # trains again, in the queue (stages 1-3 reused)

    cmd = [sys.executable, "bench/benchmark.py", "queue", "--grid", "bench/grid.yaml", "--work", str(work),
           "--out", str(tmp_path / "out"), "--poll", "1"]
    t0 = time.perf_counter()
    res = _run_committing_meanwhile(cmd, repo, env)
    wall = time.perf_counter() - t0
    _run(["git", "reset", "-q", "--soft", "HEAD~1"], repo, env)  # back to the commit the cells were queued on
    project = repo / "bench" / "grid"
    shown = json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], project, env).stdout)
    exps = {e["name"]: e["revs"][0]["data"] for e in shown[1]["experiments"]}
    names = [exp_name(spec, "base", 0, s) for s in ("demo", "folders")]
    assert sorted(exps) == sorted(names), res.stderr[-3000:]
    cell_s = {}
    for src, name in zip(("demo", "folders"), names):
        params = exps[name]["params"]["params.yaml"]["data"]
        assert (params["source"], params["recipe"], params["seed"]) == (src, "base", 0)
        assert params["work"] == str(work) and params["data_root"] == str(data)
        m = exps[name]["metrics"]["metrics.json"]["data"]
        other = "folders" if src == "demo" else "demo"
        assert m["auc"][src] == m["in_source_auc"] and m["mean_cross_auc"] == m["auc"][other]
        assert set(m["robustness_cross_auc"]) == {"clean", "jpeg50", "half"}
        assert m["robustness_cross_auc"]["clean"] == pytest.approx(m["mean_cross_auc"], abs=1e-9)
        cell_s[src] = m["cell_seconds"]
    # progress while the queue ran: the waiting saw the trained cell before it finished (its first poll comes
    # right after the worker starts; a start that waited for the worker's end saw only finished cells)
    assert f"queue: {names[1]} queued" in res.stderr or f"queue: {names[1]} running" in res.stderr, res.stderr[-3000:]
    assert (cell_dir(spec, "base", 0, "folders", work) / "eval.json").is_file()  # trained by the queue, in `work`
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| base | 2 |" in table and "### trained on folders" in table and "Not finished" not in table
    print(f"queue: 2 cells in {wall:.0f} s wall; cells' own work {cell_s['demo']:.1f} s (reused) + "
          f"{cell_s['folders']:.1f} s (trained): overhead {(wall - sum(cell_s.values())) / 2:.1f} s per queued cell")

    assert "cell" not in _run([sys.executable, "-m", "dvc", "stage", "list"], repo, env).stdout  # root DAG: unchanged
    again = _run(cmd, repo, env)  # every cell is kept on this commit: nothing queued, the table written again
    assert "queued 0 cell(s)" in again.stderr and "2 already kept on this commit" in again.stderr
    _run([sys.executable, "-m", "dvc", "queue", "stop"], project, env)


# ----------------------------------------------------------------------------- a combined training set
def _files(*folders: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``folders``: what "left untouched" means."""
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for d in folders for f in sorted(d.rglob("*"))
            if f.is_file()}


@pytest.fixture(scope="module")
def pair(tiny, in_process):
    """A third source (``folders2``) and a grid training on ``demo+folders`` at once, in the same work folder as
    the single-source cells: one combined cell and its robustness pass."""
    from conftest import photo_like, write_jpeg

    t, data, _ = tiny
    rng = np.random.default_rng(2)
    for i in range(12):
        write_jpeg(data / "folders2" / "real" / f"r{i:02d}.jpg", photo_like(rng, 40, 40))
        write_jpeg(data / "folders2" / "fake" / f"f{i:02d}.jpg", photo_like(rng, 20, 20).repeat(2, 0).repeat(2, 1))
    grid = t / "grid_pair.yaml"
    grid.write_text(yaml.safe_dump({**_grid(data, {"degradations": ["half"]}),
                                    "sources": ["demo", "folders", "folders2"], "train_on": ["demo+folders"]}))
    before = _files(t / "work" / "demo", t / "work" / "folders")
    t0 = time.perf_counter()
    out = run_grid(load_grid(grid), t / "work", t / "out_pair")
    return grid, out, before, time.perf_counter() - t0


def test_a_combined_cell_trains_on_both_training_parts_and_is_scored_on_every_held_out_set(tiny, pair):
    from dfbench import cell_metrics

    t, _, _ = tiny
    grid_path, grid, before, seconds = pair
    spec = load_grid(grid_path)
    print(f"combined cell (stages 1-6 on demo+folders) + robustness in {seconds:.0f} s")
    (cell,) = grid["cells"]
    sources = load_sources(spec)
    d = cell_dir(spec, "base", 0, "demo+folders", t / "work")
    assert cell["train_source"] == "demo+folders" and d.parent == t / "work" / "demo+folders"
    assert d.name == cell_dir(spec, "base", 0, "demo", t / "work").name  # the single cells' key, a folder of its own
    # stage 1 read the training parts of both sources, named <source>/<img_name>, and nothing held out
    man = pd.read_csv(d.parent / "data" / "prepared" / "manifest.csv", keep_default_na=False)
    trained = {str(s.root / n) for s in (sources["demo"], sources["folders"]) for n in s.train.img_name}
    held = {str(s.root / n) for s in (sources["demo"], sources["folders"]) for n in s.heldout.img_name}
    assert set(man.path) == trained and not set(man.path) & held and len(held) > 0
    assert set(man.img_name.str.split("/").str[0]) == {"demo", "folders"}
    # folders is split by pair: a fake and its real are both trained on or both held out; stage 3's folds are
    # checked for the pairs (of the training part) that reach into val
    assert sources["folders"].grouping == "pairs" and not set(sources["folders"].train.group) & set(
        sources["folders"].heldout.group)
    groups = json.loads((d.parent / "groups.json").read_text())
    assert groups["n_groups"] == sources["folders"].train.group.nunique() == 14  # 20 pairs, 6 held out
    assert 0 <= groups["n_across_val"] <= groups["n_across_folds"] <= groups["n_groups"]
    # stage 6: in-source = both held-out parts, cross = the third source's cross part (all of it)
    scores = pd.read_csv(cell["scores_csv"], keep_default_na=False)
    scores = scores[scores.degradation == "clean"]
    want = {"demo": sources["demo"].heldout, "folders": sources["folders"].heldout, "folders2": sources["folders2"].cross}
    assert set(scores.set) == set(want)
    for name, df in want.items():
        assert sorted(scores[scores.set == name].img_name) == sorted(df.img_name)
    m = cell_metrics(cell, cell["robustness"])
    ev = cell["eval"]
    assert m["in_source_auc"] == pytest.approx((ev["demo"]["clean"]["auc"] + ev["folders"]["clean"]["auc"]) / 2)
    assert m["mean_cross_auc"] == ev["folders2"]["clean"]["auc"]
    assert cell["robustness"]["sets"] == ["folders2"]
    assert cell["robustness"]["auc"]["folders2"]["clean"] == pytest.approx(ev["folders2"]["clean"]["auc"], abs=1e-9)
    # the single-source folders were only read (no reference: their cells were never scored on folders2)
    assert _files(t / "work" / "demo", t / "work" / "folders") == before and "reference" not in grid


def test_a_combined_cells_table(tiny, pair):
    t, _, _ = tiny
    lines = (t / "out_pair" / "table.md").read_text().splitlines()
    ev = pair[1]["cells"][0]["eval"]
    i = lines.index("### trained on demo + folders")
    assert lines[i + 2] == "| recipe | demo (in-source) | folders (in-source) | folders2 | mean cross | delta mean cross |"
    assert lines[i + 4].startswith(f"| base | {ev['demo']['clean']['auc']:.3f} (")
    k = lines.index("### summary of combined training sets (cross-source ROC AUC, mean of seeds)")
    x = f"{ev['folders2']['clean']['auc']:.3f}"
    assert lines[k + 6] == f"| base | {x} / - | {x} | - | - | - |"
    assert "### summary (ROC AUC, mean of seeds)" not in lines and "| base (combined sets) | 1 |" in "\n".join(lines)


def test_the_cell_stage_runs_a_combined_set(tiny, pair, tmp_path):
    """The DVC ``cell`` stage with ``source: demo+folders`` (what a queued experiment runs): the finished cell and
    its robustness record are reused, the metrics are the combined cell's."""
    from dfbench.queue import run_cell_stage

    t, _, _ = tiny
    grid_path, grid, _, _ = pair
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"grid": str(grid_path), "source": "demo+folders", "recipe": "base", "seed": 0,
                                      "work": str(t / "work"), "data_root": ""}))
    m = run_cell_stage(params, tmp_path / "metrics.json")
    ev = grid["cells"][0]["eval"]
    assert m["auc"] == {s: ev[s]["clean"]["auc"] for s in ("demo", "folders", "folders2")}
    assert m["mean_cross_auc"] == ev["folders2"]["clean"]["auc"] and set(m["robustness_cross_auc"]) == {"clean", "half"}
    assert json.loads((tmp_path / "metrics.json").read_text())["in_source_auc"] == pytest.approx(m["in_source_auc"])
