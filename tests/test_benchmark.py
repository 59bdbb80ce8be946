"""The development benchmark's protocol (dfbench): held-out parts, identities, the table."""

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from dfbench import (GridSpec, grid_table, identity_group, load_grid, load_source, paired_auc_diff,
                              recipe_config, split_groups)
from dfpipe.config import ConfigError
from dfpipe.errors import InputError
from dfpipe.layout import STAGES, Layout


def _img(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(path)


def test_identity_groups_pair_neutral_and_smiling_only():
    assert identity_group("real/001_03.jpg") == identity_group("real/001_08.jpg") == "real/001"
    assert identity_group("real/002_03.jpg") != identity_group("real/001_03.jpg")
    # other names (UTKFace's age_gender_race_date, StyleGAN seeds) are one image each
    assert identity_group("real/100_1_0_2017.jpg") != identity_group("real/100_0_0_2018.jpg")
    assert identity_group("fake/sg3_seed1_psi0.5.jpg") != identity_group("fake/sg3_seed2_psi0.5.jpg")


def test_split_keeps_identities_whole_is_stratified_and_deterministic():
    names = [f"real/{i:03d}_{k}.jpg" for i in range(40) for k in ("03", "08")] + [f"fake/{i}.jpg" for i in range(60)]
    items = pd.DataFrame({"img_name": names, "label": [0] * 80 + [1] * 60})
    groups = items.img_name.map(identity_group)
    train, held = split_groups(items, groups, 0.3, seed=0)
    assert len(train) + len(held) == len(items) and not set(train.img_name) & set(held.img_name)
    assert not set(train.img_name.map(identity_group)) & set(held.img_name.map(identity_group))
    assert (held.label == 0).sum() == 2 * 12 and (held.label == 1).sum() == 18  # 30% of 40 people, of 60 fakes
    again, _ = split_groups(items, groups, 0.3, seed=0)
    other, _ = split_groups(items, groups, 0.3, seed=1)
    assert again.equals(train) and not other.equals(train)


def test_load_source_reads_both_layouts(tmp_path):
    comp = tmp_path / "comp"
    for split, n in (("trainset", 4), ("valset", 2)):
        for i in range(n):
            _img(comp / split / f"{i}.jpg", i)
        (comp / f"{split}_label.txt").write_text("img_name,target\n" + "".join(f"{i}.jpg,{i % 2}\n" for i in range(n)))
    src = load_source(comp)
    assert list(src.train.img_name) == [f"trainset/{i}.jpg" for i in range(4)]
    assert list(src.heldout.img_name) == ["valset/0.jpg", "valset/1.jpg"] and src.cross.equals(src.heldout)

    folders = tmp_path / "folders"
    for i in range(10):
        _img(folders / "real" / f"r{i}.jpg")
        _img(folders / "fake" / f"f{i}.png")
    src = load_source(folders, heldout=0.3, seed=0)
    assert len(src.cross) == 20 and src.cross.label.sum() == 10
    assert len(src.heldout) == 6 and len(src.train) == 14  # 3 of each class held out
    assert set(src.heldout.img_name).isdisjoint(src.train.img_name)
    with pytest.raises(FileNotFoundError, match="real/ or fake/"):
        load_source(tmp_path / "comp" / "trainset")


def test_recipe_gets_the_grids_budget_and_seed_and_typos_are_refused(tmp_path):
    spec = GridSpec(epochs=2, recipes={"a": {"img_size": 96, "epochs": 50, "augment": "blur_jpeg"},
                                       "bad": {"lerning_rate": 1}})
    cfg = recipe_config(spec, "a", seed=7)
    assert (cfg.img_size, cfg.epochs, cfg.seed, cfg.augment) == (96, 2, 7, "blur_jpeg")
    with pytest.raises(ConfigError, match="lerning_rate"):
        recipe_config(spec, "bad", 0)
    with pytest.raises(KeyError, match="not in the grid"):
        recipe_config(spec, "missing", 0)


def test_recipe_epochs_gives_one_recipe_its_own_budget_and_the_table_says_so(tmp_path):
    from dfbench.tables import grid_table

    spec = GridSpec(epochs=2, baseline="a", recipe_epochs={"long": 7}, recipes={"a": {"img_size": 96}, "long": {"img_size": 96}})
    assert recipe_config(spec, "a", 0).epochs == 2 and recipe_config(spec, "long", 0).epochs == 7
    grid = tmp_path / "g.yaml"
    grid.write_text("recipes: {a: {}, b: {}}\nrecipe_epochs: {c: 5}\n")
    with pytest.raises(ConfigError, match="recipe_epochs.c"):
        load_grid(grid)
    grid.write_text("recipes: {a: {}, b: {}}\nrecipe_epochs: {b: 0}\n")
    with pytest.raises(ConfigError, match="recipe_epochs.b"):
        load_grid(grid)
    cells = [{"recipe": r, "seed": 0, "train_source": "s", "code": "x", "eval": {"t": {"clean": {"auc": 0.5}}}}
             for r in ("a", "long")]
    assert grid_table(cells, spec).startswith("Budget: 2 epochs per expert, long 7, seeds")


def test_a_cells_key_follows_the_stage1_settings():
    """A cell trained on another stage 1 (max_side, store format) is a new cell, never a reused one."""
    from dataclasses import replace

    import dfbench as benchmark

    spec = GridSpec(recipes={"a": {"img_size": 96}})
    ecfg = recipe_config(spec, "a", 0)
    key = benchmark.cell_key(spec, ecfg)
    assert key == benchmark.cell_key(spec, ecfg) and len(key) == 8
    assert benchmark.cell_key(replace(spec, max_side=512), ecfg) != key
    assert benchmark.shared_settings(spec)["store_format"] >= 1


def test_a_setting_added_later_keeps_finished_cells_only_at_its_off_value(monkeypatch):
    """KEY_OMIT_AT: a new switch left off keeps every cached cell's key; switched on, it is a new cell."""
    from dataclasses import replace

    import dfbench as benchmark

    spec = GridSpec(recipes={"a": {"img_size": 96}})
    ecfg = recipe_config(spec, "a", 0)
    key, shared = benchmark.cell_key(spec, ecfg), benchmark.shared_settings(spec)
    # pretend ExpertConfig grew `loss.ce` and `dropout` and the augment_sd section `seed` after the cells were made
    monkeypatch.setitem(benchmark.KEY_OMIT_AT, "expert", {"loss.ce": ecfg.loss.ce, "dropout": ecfg.dropout})
    monkeypatch.setitem(benchmark.KEY_OMIT_AT, "augment_sd", {"seed": shared["augment_sd"]["seed"]})
    assert "dropout" not in benchmark.omit_later(dataclasses.asdict(ecfg), "expert")
    assert "ce" not in benchmark.omit_later(dataclasses.asdict(ecfg), "expert")["loss"]
    off = benchmark.cell_key(spec, ecfg)
    assert off != key  # the table changes what is hashed ...
    assert benchmark.cell_key(spec, replace(ecfg, dropout=ecfg.dropout + 0.1)) != off  # ... a value other than off counts
    assert benchmark.cell_key(replace(spec, augment_sd={"seed": shared["augment_sd"]["seed"] + 1}), ecfg) != off
    assert "seed" not in benchmark.shared_settings(spec)["augment_sd"]


@pytest.mark.parametrize("grid", ["bench/grid.yaml", "bench/grid_more.yaml", "bench/grid_sbi.yaml",
                                  "bench/grid_first.yaml", "bench/grid_pairs.yaml", "bench/grid_pairs_more.yaml",
                                  "bench/grid_loso.yaml", "bench/grid_loso_quick.yaml"])
def test_the_repo_grid_loads_and_every_recipe_is_a_valid_expert(grid):
    spec = load_grid(grid)
    assert spec.baseline in spec.recipes and len(spec.seeds) >= 2
    for name in spec.recipes:
        recipe_config(spec, name, 0)


def _scores(path, y, s):
    one = pd.DataFrame({"degradation": "clean", "img_name": [f"{i}.jpg" for i in range(len(y))], "label": y, "score": s})
    pd.concat([one.assign(set=name) for name in ("src", "x")]).to_csv(path, index=False)
    return str(path)


def test_paired_difference_and_table(tmp_path):
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(100, int), np.ones(100, int)]
    good = _scores(tmp_path / "good.csv", y, y + rng.normal(0, 0.7, 200))
    bad = _scores(tmp_path / "bad.csv", y, rng.normal(0, 1, 200))
    d, lo, hi = paired_auc_diff(good, bad, "x", n_boot=200)
    assert lo < d < hi and lo > 0  # clearly better: the interval excludes 0
    d2, lo2, hi2 = paired_auc_diff(bad, good, "x", n_boot=200)
    assert d2 == pytest.approx(-d) and hi2 < 0

    def cell(recipe, seed, auc_in, auc_x, csv):
        ev = {"src": {"clean": {"auc": auc_in, "tpr_at_fpr_1e-2": 0.5}},
              "x": {"clean": {"auc": auc_x, "tpr_at_fpr_1e-2": 0.1}}}
        return {"train_source": "src", "recipe": recipe, "seed": seed, "eval": ev, "scores_csv": csv}

    spec = GridSpec(sources=["src", "x"], seeds=[0, 1], baseline="base")
    cells = [cell("base", 0, 0.9, 0.5, bad), cell("base", 1, 0.9, 0.6, bad),
             cell("new", 0, 0.95, 0.7, good), cell("new", 1, 0.97, 0.8, good)]
    table = grid_table(cells, spec)
    assert "### trained on src" in table
    row = next(line for line in table.splitlines() if line.startswith("| new") and "TPR@1e-2" in line)
    assert "0.700 / 0.800 (0.750)" in row and row.rstrip(" |").endswith("+0.200")
    assert "new minus base (seed 0)" in table
    summary = next(line for line in table.splitlines() if line.startswith("| new | 0.960"))
    assert summary == "| new | 0.960 / 0.750 | 0.750 | +0.200 |"


def test_a_finished_cell_is_reused_with_its_scores_path_as_seen_from_here(tmp_path):
    """A cell made by a run started elsewhere stored a scores path relative to that folder: reuse fixes it."""
    import json

    import dfbench as benchmark
    from dfbench import Source, run_cell

    spec = GridSpec(recipes={"a": {"img_size": 96}})
    src = Source("s", pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), tmp_path)
    cell = tmp_path / "work" / "s" / f"a_s0_{benchmark.cell_key(spec, recipe_config(spec, 'a', 0))}"
    cell.mkdir(parents=True)
    (cell / "eval.json").write_text(json.dumps({"recipe": "a", "scores_csv": "elsewhere/scores.csv"}))
    out = run_cell(spec, "a", 0, src, {"s": src}, tmp_path / "work")
    assert out["recipe"] == "a" and out["scores_csv"] == str(cell / "reports" / "eval" / "scores.csv")


# ----------------------------------------------------------------------------- robustness pass and DVC experiments
def test_robustness_settings_are_checked_when_the_grid_loads_and_leave_cell_keys_alone(tmp_path):
    from dataclasses import replace

    import dfbench as benchmark

    grid = tmp_path / "grid.yaml"
    grid.write_text("recipes: {a: {img_size: 96}}\nrobustness: {degradations: [jpeg75, half], recipes: [a]}\n")
    spec = load_grid(grid)
    assert spec.robustness.degradations == ["jpeg75", "half"] and spec.robustness.bootstrap == 0
    ecfg = recipe_config(spec, "a", 0)
    assert benchmark.cell_key(spec, ecfg) == benchmark.cell_key(replace(spec, robustness=benchmark.RobustnessSpec()),
                                                                  ecfg)
    for bad, msg in (("degradations: [jpeg75, sharpen]", "unknown degradation 'sharpen'"),
                     ("degradations: [clean]", "always scored"), ("degradations: [half, half]", "listed twice"),
                     ("degradations: [half], recipes: [b]", "not in the grid"),
                     ("degradatons: [half]", "degradatons")):
        grid.write_text(f"recipes: {{a: {{img_size: 96}}}}\nrobustness: {{{bad}}}\n")
        with pytest.raises((ConfigError, KeyError), match=msg):
            load_grid(grid)


@pytest.mark.parametrize("ensembles, error", [
    ({"pair": ["base", "nope"]}, "\\['nope'\\] not recipes of the grid"),
    ({"pair": ["base"]}, "two or more distinct"),
    ({"pair": ["base", "base"]}, "two or more distinct"),
    ({"base": ["base", "other"]}, "the name is a recipe's too"),
    ({"pair": ["base"], "_predict_of": {"solo": {"tta": ["hflip"]}}}, "_predict_of.solo: not an ensemble row"),
])
def test_ensemble_rows_are_checked_when_the_grid_loads(tmp_path, ensembles, error):
    grid = tmp_path / "grid.yaml"
    predict_of = ensembles.pop("_predict_of", {})
    grid.write_text(yaml.safe_dump({"baseline": "base", "recipes": {"base": {}, "other": {"lr": 0.001}},
                                    "ensembles": ensembles, "ensemble_predict_of": predict_of}))
    with pytest.raises(ConfigError, match=f"grid.yaml: ensemble.*{error}"):
        load_grid(grid)


def test_a_one_member_row_with_its_own_stage5_settings_loads_and_gets_them(tmp_path):
    """ensemble_predict_of: a row that re-scores one recipe's cells another way (its TTA on top of the grid's)."""
    from dfbench.grid import row_predict

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"baseline": "base", "recipes": {"base": {}}, "ensembles": {"base_crops": ["base"]},
                                    "ensemble_predict": {"tta": ["identity"], "combine": "mean_prob"},
                                    "ensemble_predict_of": {"base_crops": {"tta": ["crops4"]}}}))
    spec = load_grid(grid)
    assert row_predict(spec, "base_crops") == {"tta": ["crops4"], "combine": "mean_prob"}
    assert row_predict(spec, "base") == {"tta": ["identity"], "combine": "mean_prob"}


def test_cell_metrics_are_flat_numbers_per_set():
    from dfbench import cell_metrics

    ev = {s: {"clean": {"auc": a, "tpr_at_fpr_1e-2": 0.1}} for s, a in (("src", 0.9), ("x", 0.6), ("y", 0.7))}
    result = {"train_source": "src", "eval": {**ev, "mean": {}}, "train_seconds": 12.0}
    rob = {"degradations": ["half"], "sets": ["x", "y"], "auc": {"x": {"clean": 0.6, "half": 0.5},
                                                                 "y": {"clean": 0.7, "half": 0.4}}}
    m = cell_metrics(result, rob)
    assert m["in_source_auc"] == 0.9 and m["mean_cross_auc"] == pytest.approx(0.65)
    assert m["auc"] == {"src": 0.9, "x": 0.6, "y": 0.7} and m["tpr_at_fpr_1e-2"]["x"] == 0.1
    assert m["robustness_cross_auc"] == pytest.approx({"clean": 0.65, "half": 0.45})
    assert "robustness_cross_auc" not in cell_metrics(result)


def test_the_cell_stage_declares_exactly_the_params_it_reads():
    """bench/grid: params.yaml holds every CellParams field, the stage lists each as a params dep, and the stage
    runs from the repo root of its (temp) copy with that copy's package first on the path."""
    import yaml

    from dfbench.queue import CellParams

    fields = [f.name for f in dataclasses.fields(CellParams)]
    params = yaml.safe_load(open("bench/grid/params.yaml"))
    stage = yaml.safe_load(open("bench/grid/dvc.yaml"))["stages"]["cell"]
    assert list(params) == fields and stage["params"] == fields
    assert CellParams(**params) == CellParams()  # the file's defaults are the dataclass's
    assert stage["cmd"].startswith("cd ../.. && PYTHONPATH=. python bench/benchmark.py cell ")
    assert stage["metrics"] == [{"metrics.json": {"cache": False}}]
    assert os.path.isfile("bench/grid/.dvc/config")  # a DVC project of its own: the root DAG never sees it


def test_queue_status_is_read_by_column(monkeypatch):
    from types import SimpleNamespace

    from dfbench import queue as benchmark_dvc

    text = ("Task     Name                      Created       Status\n"
            "9945a13  demo-base-s0-666e98ed     09:26 AM      Success\n"
            "5636620                            Nov 29, 2026  Failed\n"
            "1ae8b65  folders-base-s0-666e98ed  09:31 AM      Running\n\n"
            "Worker status: 1 active, 0 idle\n")
    monkeypatch.setattr(benchmark_dvc, "dvc", lambda args, cwd, check=True: SimpleNamespace(stdout=text))
    tasks, workers = benchmark_dvc.queue_status(Path("."))
    assert tasks == [("demo-base-s0-666e98ed", "Success"), ("", "Failed"), ("folders-base-s0-666e98ed", "Running")]
    assert workers == 1
    monkeypatch.setattr(benchmark_dvc, "dvc", lambda args, cwd, check=True: SimpleNamespace(
        stdout="No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle\n"))
    assert benchmark_dvc.queue_status(Path(".")) == ([], 0)


def test_queueing_refuses_what_a_queued_run_would_not_see(tmp_path):
    import subprocess

    from dfbench.queue import _check_tree
    from dfpipe.errors import InputError

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "dfpipe").mkdir()
    (tmp_path / "dfpipe" / "a.py").write_text("")
    (tmp_path / "grid.yaml").write_text("")
    with pytest.raises(InputError):  # no commit yet
        _check_tree(tmp_path, "grid.yaml")
    git("add", "dfpipe")
    git("commit", "-qm", "a")
    with pytest.raises(InputError, match="grid.yaml is not tracked"):
        _check_tree(tmp_path, "grid.yaml")
    git("add", "grid.yaml")  # staged is enough: queued runs take the changes to tracked files along
    _check_tree(tmp_path, "grid.yaml")
    (tmp_path / "bench" / "grid").mkdir(parents=True)
    (tmp_path / "bench" / "grid" / "metrics.json").write_text("{}")  # what a run in the workspace leaves: harmless
    _check_tree(tmp_path, "grid.yaml")
    (tmp_path / "dfpipe" / "new.py").write_text("")
    with pytest.raises(InputError, match=r"untracked file\(s\).*dfpipe/new.py.*git add"):
        _check_tree(tmp_path, "grid.yaml")
    git("add", "dfpipe")
    (tmp_path / "dfbench").mkdir()  # the benchmark's own package: a queued cell imports it from the copy too
    (tmp_path / "dfbench" / "new.py").write_text("")
    with pytest.raises(InputError, match=r"untracked file\(s\).*dfbench/new.py.*git add"):
        _check_tree(tmp_path, "grid.yaml")


def test_the_script_keeps_its_former_interface(monkeypatch):
    """`bench/benchmark.py --grid ...` (no subcommand) still runs the grid in-process; `table` trains nothing."""
    import importlib.util

    import dfbench as benchmark

    calls = []
    monkeypatch.setattr(benchmark, "run_grid", lambda spec, work, out, recipes, train: calls.append(
        (work, out, recipes, train)))
    mod_spec = importlib.util.spec_from_file_location("bench_benchmark", "bench/benchmark.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    mod.main(["--grid", "bench/grid.yaml", "--work", "w", "--out", "o", "--recipes", "npr"])
    mod.main(["table", "--work", "w2"])
    assert calls == [("w", "o", ["npr"], True), ("w2", "reports/benchmark", None, False)]


def test_the_script_says_the_fix_when_an_old_install_cannot_import_dfbench(monkeypatch, caplog, tmp_path):
    """An editable install made before dfbench/ existed maps dfpipe only: one line naming make setup, exit 2."""
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("bench_benchmark", "bench/benchmark.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dfbench" else find(name, *a))
    with pytest.raises(SystemExit) as exit_:
        mod.main(["table", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert "dfbench: not importable" in caplog.text and "make setup" in caplog.text


# ----------------------------------------------------------------------------- training on several sources at once
def _grid_file(tmp_path, body: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text("sources: [a, b, c]\nrecipes: {r: {img_size: 96}}\n" + body)
    return path


def test_train_on_defaults_to_each_source_alone_and_takes_combined_sets(tmp_path):
    from dfbench import grid_cells, set_parts, training_sets

    spec = load_grid(_grid_file(tmp_path, ""))
    assert spec.train_on == [] and training_sets(spec) == ["a", "b", "c"]
    spec = load_grid(_grid_file(tmp_path, "train_on: [b+c, a, c+a]\nbaseline: r\nseeds: [0]\n"))
    assert training_sets(spec) == ["b+c", "a", "c+a"] and set_parts("c+a") == ["c", "a"]
    assert grid_cells(spec) == [("r", 0, "b+c"), ("r", 0, "a"), ("r", 0, "c+a")]


@pytest.mark.parametrize("body, error, msg", [
    ("train_on: [a+d]", KeyError, r"grid.yaml: train_on entry 'a\+d': \['d'\] not in sources"),
    ("train_on: [a+]", KeyError, r"train_on entry 'a\+': \[''\] not in sources"),
    ("train_on: [A]", KeyError, r"\['A'\] not in sources"),
    ("train_on: [a+a]", ConfigError, "names a source twice"),
    ("train_on: [a+b, b+a]", ConfigError, r"lists 'a\+b' and 'b\+a': the same training set twice"),
    ("train_on: [a+b+c]", ConfigError, "holds every source: no source is left for a cross-source column"),
    ("train_on: a+b", ConfigError, "train_on"),
])
def test_train_on_typos_fail_when_the_grid_loads_naming_the_file(tmp_path, body, error, msg):
    with pytest.raises(error, match=msg) as exc:
        load_grid(_grid_file(tmp_path, body + "\n"))
    assert isinstance(exc.value, ConfigError) and str(tmp_path / "grid.yaml") in str(exc.value)


def test_a_source_name_with_the_join_character_is_refused(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("sources: [a, b+c]\nrecipes: {r: {img_size: 96}}\n")
    with pytest.raises(ConfigError, match=r"grid.yaml: sources \['b\+c'\]: a source name may not contain '\+'"):
        load_grid(path)


def test_single_source_cells_keep_their_keys_and_folders():
    """The cells of bench/grid.yaml (data/benchmark/<source>/<recipe>_s<seed>_<key>) have pinned keys (a change of
    them makes every cached cell train again: the keys moved once, when the stage sections lost their paths):
    train_on is no part of a key, a grid listing its sources in train_on has the same cells, and the pairs grid
    (same settings) has the same keys, in folders of its own."""
    from dfbench import cell_dir, grid_cells

    spec = load_grid("bench/grid.yaml")
    assert str(cell_dir(spec, "baseline", 0, "yonsei_faces", "w")) == "w/yonsei_faces/baseline_s0_17a18390"
    more = load_grid("bench/grid_more.yaml")
    assert str(cell_dir(more, "baseline", 0, "yonsei_faces", "w")) == "w/yonsei_faces/baseline_s0_17a18390"
    assert str(cell_dir(more, "lil_gil", 1, "genphotos_frll", "w")) == "w/genphotos_frll/lil_gil_s1_aa3bdf4c"
    assert str(cell_dir(spec, "mobilenetv2", 0, "stylegan3_utk", "w")) == "w/stylegan3_utk/mobilenetv2_s0_16cb0b6e"
    listed = dataclasses.replace(spec, train_on=list(spec.sources))
    assert [cell_dir(listed, *c, "w") for c in grid_cells(listed)] == [cell_dir(spec, *c, "w") for c in grid_cells(spec)]
    pairs = load_grid("bench/grid_pairs.yaml")
    for recipe, seed, train in grid_cells(pairs):
        d = cell_dir(pairs, recipe, seed, train, "w")
        assert d.parent == Path("w", train) and "+" in train
        assert d.name == cell_dir(spec, recipe, seed, "yonsei_faces", "w").name  # same key as the single cells


def test_the_pairs_grid_is_the_main_grid_on_pairs():
    """bench/grid_pairs.yaml: bench/grid.yaml's settings and recipe definitions, one pair per held-out source."""
    from dfbench import set_parts

    main, pairs = load_grid("bench/grid.yaml"), load_grid("bench/grid_pairs.yaml")
    same = {f.name for f in dataclasses.fields(main)} - {"train_on", "recipes", "ensembles"}
    assert {k: getattr(pairs, k) for k in same} == {k: getattr(main, k) for k in same}
    assert pairs.recipes == {"baseline": main.recipes["baseline"]}
    held_out = [next(s for s in pairs.sources if s not in set_parts(t)) for t in pairs.train_on]
    assert held_out == pairs.sources and all(len(set_parts(t)) == 2 for t in pairs.train_on)


def test_the_split_grids_share_settings_recipes_and_cells():
    """make benchmark's core (bench/grid.yaml, bench/grid_pairs.yaml) and make benchmark-all's other rows
    (bench/grid_more.yaml, bench/grid_pairs_more.yaml) are one grid cut in four: the same settings, one definition per
    recipe name, so a cell (the baseline's above all) is trained once and read by every grid that lists it."""
    from dfbench import cell_key

    names = ("grid", "grid_more", "grid_pairs", "grid_pairs_more")
    grids = {n: load_grid(f"bench/{n}.yaml") for n in names}
    same = {f.name for f in dataclasses.fields(grids["grid"])} - {"train_on", "recipes", "ensembles"}
    for n in names:
        assert {k: getattr(grids[n], k) for k in same} == {k: getattr(grids["grid"], k) for k in same}, n
    assert grids["grid_pairs_more"].train_on == grids["grid_pairs"].train_on
    definitions: dict = {}
    for n in names:
        for recipe, body in grids[n].recipes.items():
            assert definitions.setdefault(recipe, body) == body, f"{recipe} differs in bench/{n}.yaml"
    keys = {n: cell_key(grids[n], recipe_config(grids[n], "baseline", 0)) for n in names}
    assert len(set(keys.values())) == 1, keys
    # every recipe and ensemble row of the main grids is in exactly one of the two single-source files
    assert set(grids["grid"].recipes) & set(grids["grid_more"].recipes) == {"baseline"}
    assert not set(grids["grid"].ensembles) & set(grids["grid_more"].ensembles)


def _source(root, name, n_train, n_held):
    """A Source with ``n_train`` / ``n_held`` labelled names (no files: eval_sets only writes label CSVs)."""
    from dfbench import Source

    def part(kind, n):
        return pd.DataFrame({"img_name": [f"{kind}/{i}.jpg" for i in range(n)], "label": [i % 2 for i in range(n)]})

    held = part("held", n_held)
    return Source(name, part("train", n_train), held, pd.concat([part("train", n_train), held], ignore_index=True),
                  root / name)


def test_a_combined_cells_eval_sets_are_both_held_out_parts_and_the_thirds_cross_part(tmp_path):
    from dfbench import eval_sets, training_set

    sources = {n: _source(tmp_path, n, 6, 4) for n in ("a", "b", "c")}
    ts = training_set("b+a", sources)
    assert ts.name == "b+a" and [p.name for p in ts.parts] == ["b", "a"]
    assert training_set("a", sources) is sources["a"]
    sets = eval_sets(GridSpec(sources=["a", "b", "c"]), ts, sources, tmp_path / "work")
    assert [s.name for s in sets] == ["a", "b", "c"]
    for s in sets:
        labels = pd.read_csv(s.labels)
        want = sources[s.name].heldout if s.name in ("a", "b") else sources[s.name].cross
        assert s.images == str(tmp_path / s.name) and list(labels.img_name) == list(want.img_name)
        assert Path(s.labels).name == f"{s.name}_{'cross' if s.name == 'c' else 'heldout'}.csv"


def test_combined_cell_metrics_average_the_in_source_sets():
    from dfbench import cell_metrics

    ev = {s: {"clean": {"auc": a, "tpr_at_fpr_1e-2": 0.1}} for s, a in (("a", 0.9), ("b", 0.8), ("c", 0.6))}
    m = cell_metrics({"train_source": "a+b", "eval": {**ev, "mean": {}}})
    assert m["in_source_auc"] == pytest.approx(0.85) and m["mean_cross_auc"] == 0.6
    assert m["auc"] == {"a": 0.9, "b": 0.8, "c": 0.6}
    single = cell_metrics({"train_source": "a", "eval": ev})
    assert single["in_source_auc"] == 0.9 and single["mean_cross_auc"] == pytest.approx(0.7)


def _cell(train, recipe, seed, aucs, csv):
    ev = {s: {"clean": {"auc": a, "tpr_at_fpr_1e-2": 0.25}} for s, a in aucs.items()}
    return {"train_source": train, "recipe": recipe, "seed": seed, "eval": ev, "scores_csv": csv}


def _three_set_scores(path, y, s):
    one = pd.DataFrame({"degradation": "clean", "img_name": [f"{i}.jpg" for i in range(len(y))], "label": y, "score": s})
    pd.concat([one.assign(set=name) for name in ("a", "b", "c")]).to_csv(path, index=False)
    return str(path)


def test_combined_sets_table_blocks_and_summary(tmp_path):
    """A block per combined set (in-source columns first), its paired deltas, and a summary of combined sets with
    the same recipe's single-source cells ("alone", from the reference) on the same held-out source."""
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    good = _three_set_scores(tmp_path / "good.csv", y, y + rng.normal(0, 0.7, 100))
    bad = _three_set_scores(tmp_path / "bad.csv", y, rng.normal(0, 1, 100))
    spec = GridSpec(sources=["a", "b", "c"], train_on=["a+b", "c+a"], seeds=[0, 1], baseline="base")
    cells = [_cell("a+b", "base", 0, {"a": 0.9, "b": 0.8, "c": 0.5}, bad),
             _cell("a+b", "base", 1, {"a": 0.9, "b": 0.8, "c": 0.7}, bad),
             _cell("a+b", "new", 0, {"a": 0.95, "b": 0.85, "c": 0.8}, good),
             _cell("a+b", "new", 1, {"a": 0.95, "b": 0.85, "c": 0.9}, good),
             _cell("c+a", "base", 0, {"a": 0.9, "b": 0.7, "c": 0.9}, bad),
             _cell("c+a", "new", 0, {"a": 0.9, "b": 0.6, "c": 0.9}, good)]
    reference = [_cell("a", "base", 0, {"a": 1.0, "b": 0.5, "c": 0.4}, bad),  # alone on c: (0.4 + 0.6) / 2
                 _cell("b", "base", 0, {"a": 0.5, "b": 1.0, "c": 0.6}, bad),
                 _cell("c", "base", 0, {"a": 0.8, "b": 0.7, "c": 1.0}, bad),  # alone on b: (0.5 + 0.7) / 2
                 _cell("a", "new", 1, {"a": 1.0, "b": 0.9, "c": 0.7}, good)]  # alone on c: 0.7, on b: 0.9
    lines = grid_table(cells, spec, reference).splitlines()
    assert not any(line.startswith("### summary (ROC AUC") for line in lines)  # no single-source cell in the grid
    i = lines.index("### trained on a + b")
    assert lines[i + 2] == "| recipe | a (in-source) | b (in-source) | c | mean cross | delta mean cross |"
    assert lines[i + 5] == ("| new | 0.950 / 0.950 (0.950); TPR@1e-2 0.250 | 0.850 / 0.850 (0.850); TPR@1e-2 0.250 "
                            "| 0.800 / 0.900 (0.850); TPR@1e-2 0.250 | 0.850 | +0.250 |")
    assert lines[i + 7].startswith("- new minus base (seed 0): a +") and "; c +" in lines[i + 7]
    j = lines.index("### trained on c + a")
    assert lines[j + 2] == "| recipe | c (in-source) | a (in-source) | b | mean cross | delta mean cross |"
    k = lines.index("### summary of combined training sets (cross-source ROC AUC, mean of seeds)")
    assert k < i and lines[k + 4] == ("| recipe | a + b -> c: together / alone | c + a -> b: together / alone | "
                                      "mean together | delta vs baseline | mean alone | together minus alone |")
    assert lines[k + 6] == "| base | 0.600 / 0.500 | 0.700 / 0.600 | 0.650 | - | 0.550 | +0.100 |"
    assert lines[k + 7] == "| new | 0.850 / 0.700 | 0.600 / 0.900 | 0.725 | +0.075 | 0.800 | -0.075 |"
    no_ref = grid_table(cells, spec).splitlines()  # no single-source cell finished: "-"
    assert no_ref[k + 7] == "| new | 0.850 / - | 0.600 / - | 0.725 | +0.075 | - | - |"
    assert "A combined training set (a + b) has an in-source column per source" in lines[0]



def test_the_alone_reference_reads_finished_single_source_cells_scored_on_every_source(tmp_path):
    """single_source_reference: the pair's sources' own cells (same key) left in the work folder by another grid;
    a cell not scored on every source of this grid, or not finished, is left out; nothing is trained."""
    import json

    from dfbench import cell_dir, single_source_reference

    spec = GridSpec(sources=["a", "b", "c"], train_on=["a+b"], seeds=[0, 1], baseline="r",
                    recipes={"r": {"img_size": 96}})
    ev = {s: {"clean": {"auc": 0.7, "tpr_at_fpr_1e-2": 0.1}} for s in ("a", "b", "c")}
    for train, seed, sets in (("a", 0, "abc"), ("a", 1, "abc"), ("b", 0, "ab"), ("c", 0, "abc")):
        d = cell_dir(spec, "r", seed, train, tmp_path)
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"train_source": train, "recipe": "r", "seed": seed,
                                                 "eval": {s: ev[s] for s in sets}, "scores_csv": "elsewhere"}))
    ref = single_source_reference(spec, tmp_path)
    assert [(c["train_source"], c["seed"]) for c in ref] == [("a", 0), ("a", 1)]  # b's cell lacks c; c: not a part
    assert ref[0]["scores_csv"] == str(cell_dir(spec, "r", 0, "a", tmp_path) / "reports" / "eval" / "scores.csv")
    # a source the grid trains alone itself is in its own cells, not in the reference
    assert single_source_reference(dataclasses.replace(spec, train_on=["a+b", "a"]), tmp_path) == []
    assert single_source_reference(dataclasses.replace(spec, train_on=[]), tmp_path) == []


def test_a_grid_without_train_on_has_the_same_table_with_or_without_combined_code_paths(tmp_path):
    """train_on listing the sources alone is the default grid: the same table, byte for byte, and no combined
    summary (its single-source summary row is pinned in test_paired_difference_and_table)."""
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    csv = _three_set_scores(tmp_path / "s.csv", y, y + rng.normal(0, 1, 100))
    spec = GridSpec(sources=["a", "b", "c"], seeds=[0], baseline="base")
    cells = [_cell(t, r, 0, {"a": 0.7, "b": 0.6, "c": 0.5}, csv) for r in ("base", "new") for t in ("a", "b", "c")]
    table = grid_table(cells, spec)
    assert grid_table(cells, dataclasses.replace(spec, train_on=["a", "b", "c"])) == table
    assert grid_table(cells, spec, reference=cells[:1]) == table
    assert "combined" not in table and table.count("### trained on") == 3


def test_exp_names_of_combined_sets_are_valid_dvc_experiment_names():
    """`a+b` is `a_and_b` in the name (single-source names unchanged); git (hence DVC) accepts every name as a ref."""
    import subprocess

    from dfbench import cell_key, grid_cells
    from dfbench.queue import exp_name

    spec = load_grid("bench/grid.yaml")
    assert exp_name(spec, "baseline", 0, "yonsei_faces") == "yonsei_faces-baseline-s0-17a18390"
    pairs = load_grid("bench/grid_pairs_more.yaml")
    names = [exp_name(pairs, *c) for c in grid_cells(pairs)]
    key = cell_key(pairs, recipe_config(pairs, "lil_gil", 1))
    assert f"stylegan3_utk_and_genphotos_frll-lil_gil-s1-{key}" in names and len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", name)
        subprocess.run(["git", "check-ref-format", f"refs/exps/ab/cdef/{name}"], check=True)


def test_the_cell_stage_takes_a_combined_set_and_refuses_unknown_ones(tmp_path):
    from dfbench.queue import run_cell_stage
    from dfpipe.errors import UnknownNameError

    params = tmp_path / "params.yaml"
    params.write_text("grid: bench/grid_pairs.yaml\nsource: genphotos_frll+stylegan3_utk\n")
    with pytest.raises(UnknownNameError, match=r"params.yaml: source 'genphotos_frll\+stylegan3_utk' is neither a "
                                               r"source of the grid nor a train_on entry"):
        run_cell_stage(params, tmp_path / "metrics.json")


# ----------------------------------------------------------------------------- the README's tables
def test_readme_blocks_are_rewritten_from_their_table_files(tmp_path):
    from dfpipe.docs import blocks as readme_blocks, sync as sync_readme

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "table.md").write_text("intro\n\n### summary (ROC AUC, mean of seeds)\n\n| a | b |\n|---|---|\n"
                                             "| x | 0.600 |\n\n### trained on y\n\n| c |\n|---|\n")
    readme = tmp_path / "README.md"
    text = ('# t\n\nbefore\n<!-- benchmark-table: r/table.md "### summary (ROC" -->\n| a | b |\n|---|---|\n'
            '| x | 0.500 |\n<!-- /benchmark-table -->\nafter\n')
    readme.write_text(text)
    assert readme_blocks(readme) == ['r/table.md "### summary (ROC"']
    assert sync_readme(readme, check=True) == ['r/table.md "### summary (ROC"'] and readme.read_text() == text
    assert sync_readme(readme) == ['r/table.md "### summary (ROC"']
    assert readme.read_text() == text.replace("0.500", "0.600")  # only the table moved; prose untouched
    assert sync_readme(readme, check=True) == []
    readme.write_text(text.replace("### summary (ROC", "### nowhere"))
    with pytest.raises(InputError, match="README.md: block r/table.md \"### nowhere\".*no line starting with"):
        sync_readme(readme)


def test_the_readmes_benchmark_tables_are_the_grids():
    """Every benchmark number the README shows in a table comes from a grid's table.md, as committed."""
    from dfpipe.docs import blocks as readme_blocks, sync as sync_readme

    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert len(readme_blocks(readme)) >= 1
    assert sync_readme(readme, check=True) == [], "stale: run bench/benchmark.py readme"


def test_starting_the_queue_worker_returns_while_its_daemon_runs(tmp_path):
    """`dvc queue start` leaves a worker daemon running with the command's output handles: read through pipes,
    the start returned only when the whole queue was done (no progress logged, no restart of a dead worker).
    Output goes through a file, so the call returns at the command's exit with the daemon still alive."""
    import os
    import signal

    from dfbench.queue import run_past_daemons

    script = f"sleep 600 & echo $! > {tmp_path / 'pid'}; echo started; echo to-stderr >&2"
    res = run_past_daemons(["sh", "-c", script], tmp_path)
    pid = int((tmp_path / "pid").read_text())
    try:
        assert res.returncode == 0 and res.stdout.split() == ["started"] and res.stderr.split() == ["to-stderr"]
        os.kill(pid, 0)  # the daemon outlived the call: the call did not wait for it
    finally:
        os.kill(pid, signal.SIGKILL)


def test_code_version_names_the_commit_and_a_dirty_package(tmp_path):
    """What every new cell records as the code that trained it: the commit, -dirty when dfpipe/ or the benchmark's
    dfbench/ differs from it (changes elsewhere do not count; the ensemble card's version looks at dfpipe/ only),
    unknown outside git."""
    import subprocess

    from dfbench import code_version
    from dfbench.cells import CODE

    assert code_version(tmp_path) == "unknown"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e",
           "PATH": os.environ["PATH"], "HOME": str(tmp_path)}

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout

    (tmp_path / "dfpipe").mkdir()
    (tmp_path / "dfpipe" / "m.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    head = git("rev-parse", "HEAD").strip()
    assert code_version(tmp_path) == head[:12]
    (tmp_path / "README").write_text("elsewhere\n")
    assert code_version(tmp_path) == head[:12]
    (tmp_path / "dfbench").mkdir()  # the benchmark's own package: dirty for the cells, not for the pipeline's card
    (tmp_path / "dfbench" / "m.py").write_text("y = 1\n")
    assert code_version(tmp_path) == head[:12]
    assert code_version(tmp_path, paths=CODE) == head[:12] + "-dirty"
    git("add", "-A")
    git("commit", "-qm", "d")
    head = git("rev-parse", "HEAD").strip()
    assert code_version(tmp_path, paths=CODE) == head[:12]
    (tmp_path / "dfpipe" / "m.py").write_text("x = 2\n")
    assert code_version(tmp_path) == code_version(tmp_path, paths=CODE) == head[:12] + "-dirty"



def test_cells_record_the_code_their_process_started_with(monkeypatch):
    """A commit while a long in-process grid runs moves HEAD, not the code in memory: every cell the process trains
    records the version it saw first."""
    import dfbench as benchmark

    benchmark.process_code_version.cache_clear()
    try:
        monkeypatch.setattr(benchmark.cells, "code_version", lambda paths: "aaaaaaaaaaaa" if "dfbench" in paths else "")
        assert benchmark.process_code_version() == "aaaaaaaaaaaa"  # the benchmark's package counts too
        monkeypatch.setattr(benchmark.cells, "code_version", lambda paths: "bbbbbbbbbbbb")  # HEAD moved
        assert benchmark.process_code_version() == "aaaaaaaaaaaa"
    finally:
        benchmark.process_code_version.cache_clear()


@pytest.mark.parametrize("entry", Layout.entries())
def test_the_benchmark_moves_every_catalog_output_into_its_work_folder(tmp_path, entry):
    """The benchmark never lists a stage's paths: a cell is the catalog moved under its folders (Layout.under), so an
    output a stage adds to the catalog (parametrised over all of them: a new one is covered with no edit) lands in
    the training set's folder (stages 1-3) or the cell's (4-6), never in the repository's own data/, and inputs
    point at the grid's sources."""
    from dfbench import CELL_STAGES, SOURCE_STAGES, cell_layout, source_layout

    spec = GridSpec(data_root=str(tmp_path / "shared"))
    work, cell = tmp_path / "work", tmp_path / "work" / "src" / "r_s0_key"
    src, lay = source_layout(spec, "src", work), cell_layout(spec, "src", work, cell)
    stage = next((f.metadata["stage"] for f in dataclasses.fields(Layout) if f.name == entry))
    if stage in SOURCE_STAGES:
        assert Path(getattr(lay, entry)).is_relative_to(work / "src") and getattr(lay, entry) == getattr(src, entry)
        assert not Path(getattr(lay, entry)).is_relative_to(cell)
    elif stage in CELL_STAGES:
        assert Path(getattr(lay, entry)).is_relative_to(cell)
    else:  # an input: stage 1 reads the training set's folder (its label files), stage 6 the grid's data root
        assert stage == "" and set(SOURCE_STAGES) | set(CELL_STAGES) == set(STAGES)
        assert src.data_root == str((work / "src").resolve()) and lay.data_root == str((tmp_path / "shared").resolve())
    assert lay.test_labels == ""  # no test metrics in a cell: its held-out sets are stage 6's


# ----------------------------------------------------------------------------- five sources, leave-one-source-out
def _paired_folder(root, n_pairs, extra_fakes=()):
    """real/r<i>.jpg and fake/f<i>.jpg made from it (pairs.csv), plus ``extra_fakes``: (fake index, real index)."""
    rows = [(i, i) for i in range(n_pairs)] + list(extra_fakes)
    for f, r in rows:
        _img(root / "fake" / f"f{f}.jpg", 200)
        _img(root / "real" / f"r{r}.jpg", 10)
    (root / "pairs.csv").write_text("fake,real\n" + "".join(f"fake/f{f}.jpg,real/r{r}.jpg\n" for f, r in rows))
    return root


def test_a_fake_and_its_real_are_never_on_two_sides_of_the_split(tmp_path):
    """dfdc_faces: grouped by pairs.csv (a real with two fakes is one group of three); the split holds out 30% of the
    pairs whole, deterministically; a file in no pair is a group of its own."""
    from dfbench import pair_groups

    root = _paired_folder(tmp_path / "dfdc", 20, extra_fakes=[(20, 0)])
    _img(root / "real" / "lonely.jpg")
    src = load_source(root, heldout=0.3, seed=0)
    assert src.grouping == "pairs" and len(src.cross) == 42 and set(src.cross.columns) == {"img_name", "label", "group"}
    groups = src.cross.set_index("img_name").group
    assert groups["fake/f0.jpg"] == groups["fake/f20.jpg"] == groups["real/r0.jpg"] == "pair/real/r0.jpg"
    assert groups["real/lonely.jpg"] == "real/lonely.jpg"
    assert not set(src.train.group) & set(src.heldout.group)
    assert src.heldout.group.nunique() == 6  # round(0.3 * 20) pairs; the lonely real is a stratum of one: kept
    for part in (src.train, src.heldout):  # every pair is whole on its side
        assert (part[part.group.str.startswith("pair/")].groupby("group").label.agg(["min", "max"]).to_numpy()
                == [0, 1]).all()
    again = load_source(root, heldout=0.3, seed=0)
    assert again.heldout.equals(src.heldout) and not load_source(root, 0.3, seed=1).heldout.equals(src.heldout)
    names = src.cross.img_name
    assert pair_groups(root / "pairs.csv", names).equals(src.cross.group.rename("img_name"))


@pytest.mark.parametrize("body, msg", [
    ("real,fake\nreal/r0.jpg,fake/f0.jpg\n", "header is 'real,fake'; expected 'fake,real'"),
    ("fake,real\nfake/f0.jpg,real/r0.jpg\nfake/f0.jpg,real/r1.jpg\n", "fake 'fake/f0.jpg' is listed twice"),
    ("fake,real\nfake/f0.jpg,real/r9.jpg\n", "1 listed file\\(s\\) not among the source's images, e.g. 'real/r9.jpg'"),
])
def test_a_bad_pairs_file_is_refused_naming_it(tmp_path, body, msg):
    root = _paired_folder(tmp_path / "dfdc", 2)
    (root / "pairs.csv").write_text(body)
    with pytest.raises(InputError, match=f"pairs.csv: {msg}"):
        load_source(root)


def test_each_folder_sources_grouping_rule():
    """No pairs.csv: the genphotos rule by name (other names alone); the competition layout: each image alone."""
    from dfbench import GROUPINGS, source_groups

    items = pd.DataFrame({"img_name": ["real/001_03.jpg", "real/001_08.jpg", "fake/coco_00001.jpg"], "label": [0, 0, 1]})
    rule, groups = source_groups(Path("/nonexistent"), items)
    assert rule == "identity" and list(groups) == ["real/001", "real/001", "fake/coco_00001"]
    assert set(GROUPINGS) == {"image", "identity", "pairs"}


def test_the_split_holds_out_each_stratum_and_leaves_one_class_groups_as_before():
    """Strata: real-only groups, fake-only groups, mixed groups (pairs): each loses `heldout` of its groups. Adding
    mixed groups leaves the draw of the one-class strata where it was (the existing sources' splits are unchanged)."""
    pure = pd.DataFrame({"img_name": [f"real/{i:03d}_{k}.jpg" for i in range(10) for k in ("03", "08")]
                         + [f"fake/{i}.jpg" for i in range(10)], "label": [0] * 20 + [1] * 10})
    pure["group"] = pure.img_name.map(identity_group)
    pairs = pd.DataFrame({"img_name": [f"{c}/p{i}.jpg" for i in range(20) for c in ("real", "fake")],
                          "label": [0, 1] * 20, "group": [f"pair/{i}" for i in range(20) for _ in range(2)]})
    both = pd.concat([pure, pairs], ignore_index=True)
    train, held = split_groups(both, both.group, 0.3, seed=0)
    assert held.group.nunique() == 3 + 3 + 6 and not set(train.group) & set(held.group)
    pure_train, pure_held = split_groups(pure, pure.group, 0.3, seed=0)
    assert set(pure_held.img_name) == set(held.img_name[~held.group.str.startswith("pair/")])


def test_the_cap_keeps_whole_groups_class_balanced_and_is_seeded():
    from dfbench import cap_train

    pairs = pd.DataFrame({"img_name": [f"{c}/p{i}.jpg" for i in range(50) for c in ("real", "fake")],
                          "label": [0, 1] * 50, "group": [f"pair/{i}" for i in range(50) for _ in range(2)]})
    capped = cap_train(pairs, 20, seed=0)
    assert len(capped) == 20 and capped.label.sum() == 10 and (capped.groupby("group").size() == 2).all()
    assert list(capped.index) == list(range(20)) and capped.img_name.isin(pairs.img_name).all()
    assert capped.equals(cap_train(pairs, 20, seed=0)) and not capped.equals(cap_train(pairs, 20, seed=1))
    assert cap_train(pairs, 0, 0) is pairs and cap_train(pairs, 100, 0) is pairs  # 0 = no cap; under the cap: all
    # imbalanced, one-class groups of two reals: 10 per class, people whole (no group column: each image alone)
    people = pd.DataFrame({"img_name": [f"real/{i:03d}_{k}.jpg" for i in range(30) for k in ("03", "08")]
                           + [f"fake/{i}.jpg" for i in range(15)], "label": [0] * 60 + [1] * 15})
    people["group"] = people.img_name.map(identity_group)
    capped = cap_train(people, 20, seed=0)
    assert (capped.label == 0).sum() == 10 and (capped.label == 1).sum() == 10
    assert (capped[capped.label == 0].groupby("group").size() == 2).all()
    assert len(cap_train(people.drop(columns="group"), 20, seed=0)) == 20


def test_the_cap_applies_to_training_parts_only_and_is_in_the_key_only_when_set(tmp_path):
    from dfbench import cell_key, load_sources, shared_settings

    _paired_folder(tmp_path / "data" / "dfdc", 40)
    spec = GridSpec(data_root=str(tmp_path / "data"), sources=["dfdc"], recipes={"r": {"img_size": 96}})
    full, capped = load_sources(spec)["dfdc"], load_sources(dataclasses.replace(spec, max_train_per_source=10))["dfdc"]
    assert len(full.train) == 56 and len(capped.train) == 10 and capped.train.label.sum() == 5
    assert set(capped.train.img_name) <= set(full.train.img_name)
    assert capped.heldout.equals(full.heldout) and capped.cross.equals(full.cross)
    ecfg = recipe_config(spec, "r", 0)
    assert "max_train_per_source" not in shared_settings(spec)  # off: every cached key stays (pinned above)
    on = dataclasses.replace(spec, max_train_per_source=10)
    assert shared_settings(on)["max_train_per_source"] == 10 and cell_key(on, ecfg) != cell_key(spec, ecfg)


def test_the_eval_cap_draws_the_same_balanced_scored_parts_for_every_recipe_and_keys_cells_only(tmp_path):
    from dfbench import cell_key, load_sources, shared_settings

    _paired_folder(tmp_path / "data" / "dfdc", 40)
    spec = GridSpec(data_root=str(tmp_path / "data"), sources=["dfdc"], recipes={"r": {"img_size": 96}, "q": {}})
    full = load_sources(spec)["dfdc"]
    on = dataclasses.replace(spec, max_eval_per_source=12)
    capped = load_sources(on)["dfdc"]
    assert capped.train.equals(full.train)  # training parts untouched
    for part, whole in ((capped.heldout, full.heldout), (capped.cross, full.cross)):
        assert len(part) == 12 and part.label.sum() == 6 and set(part.img_name) <= set(whole.img_name)
        assert (part.groupby("group").label.nunique() == 2).all()  # a fake and its real scored together
    assert load_sources(on)["dfdc"].cross.equals(capped.cross)  # the same images on every call (recipe, seed)
    assert shared_settings(on) == shared_settings(spec)  # stages 1-3 are shared with the uncapped grid
    for recipe in ("r", "q"):
        ecfg = recipe_config(spec, recipe, 0)
        assert cell_key(on, ecfg) != cell_key(spec, ecfg)
    with pytest.raises(ConfigError, match="max_eval_per_source -3: 0 \\(no cap\\)"):
        (tmp_path / "g.yaml").write_text("sources: [a]\nmax_eval_per_source: -3\nrecipes: {baseline: {}}\n")
        load_grid(tmp_path / "g.yaml")


@pytest.mark.parametrize("body, msg", [
    ("train_on: [b+c, a+c]", "leave_one_out: train_on must hold out each source exactly once"),
    ("train_on: [c, a+c, a+b]", "leave_one_out: train_on must hold out each source exactly once"),
    ("train_on: [b+c, a+c, a+b]\nmax_train_per_source: -1", "max_train_per_source -1: 0 \\(no cap\\)"),
])
def test_a_leave_one_out_grid_must_hold_out_each_source_once(tmp_path, body, msg):
    path = tmp_path / "grid.yaml"
    path.write_text(f"sources: [a, b, c]\nleave_one_out: true\n{body}\nrecipes: {{baseline: {{}}}}\n")
    with pytest.raises(ConfigError, match=f"grid.yaml: {msg}"):
        load_grid(path)
    path.write_text("sources: [a, b, c]\nleave_one_out: true\ntrain_on: [b+c, a+c, a+b]\nrecipes: {baseline: {}}\n")
    assert load_grid(path).leave_one_out


def test_the_loso_grid_holds_out_each_of_the_five_sources_with_the_main_baseline():
    from dfbench import held_out_source

    loso, main = load_grid("bench/grid_loso.yaml"), load_grid("bench/grid.yaml")
    assert set(loso.sources) == {"yonsei_faces", "stylegan3_utk", "genphotos_frll", "dfdc_faces", "sd14_coco"}
    assert [held_out_source(loso, t) for t in loso.train_on] == loso.sources and loso.leave_one_out
    assert loso.seeds == [0, 1, 2] and loso.max_train_per_source > 0
    assert loso.recipes["baseline"] == main.recipes["baseline"]
    assert loso.robustness.degradations == ["jpeg75", "jpeg50", "half"] and loso.robustness.recipes == ["baseline"]
    same = ("epochs", "heldout", "split_seed", "max_side", "augment_sd", "cluster_split", "ensemble_predict", "evaluate")
    assert {k: getattr(loso, k) for k in same} == {k: getattr(main, k) for k in same}


def _loso_cells(tmp_path):
    """Three sources, each held out once; base and new for seeds 0 and 1; new is better on a and b (scores that
    follow the labels), worse on c."""
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60, int), np.ones(60, int)]
    good = _three_set_scores(tmp_path / "good.csv", y, y + rng.normal(0, 0.5, 120))
    bad = _three_set_scores(tmp_path / "bad.csv", y, y + rng.normal(0, 3, 120))
    aucs = {"base": {"a": (0.6, 0.7), "b": (0.5, 0.6), "c": (0.8, 0.8)},
            "new": {"a": (0.9, 0.8), "b": (0.7, 0.7), "c": (0.6, 0.7)}}
    trains = {"a": "b+c", "b": "a+c", "c": "a+b"}
    cells = []
    for recipe, csv in (("base", bad), ("new", good)):
        for seed in (0, 1):
            for held, train in trains.items():
                ev = {s: {"clean": {"auc": aucs[recipe][held][seed] if s == held else 0.99,
                                    "tpr_at_fpr_1e-2": 0.1 * (seed + 1) if s == held else 0.5}} for s in "abc"}
                cells.append({"train_source": train, "recipe": recipe, "seed": seed, "eval": ev, "scores_csv": csv})
    spec = GridSpec(sources=["a", "b", "c"], train_on=list(trains.values()), seeds=[0, 1], baseline="base",
                    leave_one_out=True)
    return cells, spec, good, bad


def test_the_loso_table_has_a_column_per_held_out_source_with_paired_intervals(tmp_path):
    from dfbench import paired_auc_diff, paired_seed_deltas

    cells, spec, good, bad = _loso_cells(tmp_path)
    lines = grid_table(cells, spec).splitlines()
    k = lines.index("### leave-one-source-out summary (ROC AUC; TPR at FPR 1e-2; mean of seeds)")
    assert lines[k + 4] == ("| recipe | a held out | b held out | c held out | mean | delta mean AUC vs baseline "
                            "| AUC above baseline |")
    assert lines[k + 6] == "| base | 0.650 (0.150) | 0.550 (0.150) | 0.800 (0.150) | 0.667 (0.150) | - | - |"
    new = lines[k + 7].split(" | ")
    assert new[0] == "| new" and new[1].startswith("0.850 (0.150) +") and new[4] == "0.733 (0.150)"
    assert new[6] == "2/3 |"  # above the baseline on a and b, not on c
    # the per-column delta is the paired one of the scores (both seeds read the same CSVs here: the plain pair)
    d, lo, hi = paired_auc_diff(good, bad, "a")
    col = re.match(r"0\.850 \(0\.150\) ([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\]", new[1])
    assert float(col.group(1)) == pytest.approx(d, abs=5e-4) and float(col.group(2)) > 0  # clearly better: > 0
    mean = re.match(r"([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\]", new[5])
    assert float(mean.group(1)) == pytest.approx(d, abs=5e-4)  # same scores on every set: the same difference
    assert float(mean.group(2)) < d < float(mean.group(3))
    # the interval pairs the seeds: identical pairs give the one-pair value, and the resamples do not depend on order
    one, boots1 = paired_seed_deltas([(good, bad)], "a", 200, seed=0)
    two, boots2 = paired_seed_deltas([(good, bad), (good, bad)], "a", 200, seed=0)
    assert one == pytest.approx(d) and two == pytest.approx(d) and np.allclose(boots1, boots2)
    # memoised per file state: a rewritten scores file is read again
    pd.read_csv(good).assign(score=lambda f: -f.score).to_csv(good, index=False)
    os.utime(good, ns=(1, 1))
    flipped = paired_seed_deltas([(good, bad)], "a", 200, seed=0)[0]
    assert flipped == pytest.approx(paired_auc_diff(good, bad, "a")[0]) and flipped < 0 < d
    assert "### summary of combined training sets" not in "\n".join(lines)  # the LOSO summary replaces it
    assert lines.count("### trained on b + c") == 1  # the per-set blocks stay


def test_a_held_out_column_is_the_mean_of_the_cells_that_left_that_source_out(tmp_path):
    """The one reading of a leave-one-source-out column (the table's summary, the model card's numbers): the recipe's
    cells not trained on the source that scored it, averaged over seeds; a cell trained on it (its in-source part)
    or one that never scored it does not count; none -> nan and 0 seeds."""
    from dfbench import held_out_means

    cells, _, _, _ = _loso_cells(tmp_path)
    assert held_out_means(cells, "new", "a") == {"auc": pytest.approx(0.85), "tpr_at_fpr_1e-2": pytest.approx(0.15),
                                                 "seeds": 2}
    in_source = {"train_source": "a", "recipe": "new", "seed": 0, "eval": {"a": {"clean": {"auc": 0.0,
                                                                                          "tpr_at_fpr_1e-2": 0.0}}}}
    unscored = {**cells[-3], "seed": 2, "eval": {}}  # new on b+c: held a out, but scored nothing
    assert held_out_means([*cells, in_source, unscored], "new", "a")["auc"] == pytest.approx(0.85)
    none = held_out_means(cells, "other", "a")
    assert np.isnan(none["auc"]) and np.isnan(none["tpr_at_fpr_1e-2"]) and none["seeds"] == 0


def test_the_loso_table_leaves_unfinished_columns_out_of_the_means(tmp_path):
    cells, spec, _, _ = _loso_cells(tmp_path)
    partial = [c for c in cells if not (c["recipe"] == "new" and c["train_source"] == "a+b")]
    lines = grid_table(partial, spec).splitlines()
    row = next(line for line in lines if line.startswith("| new | 0.850"))
    assert row.endswith("| - (-) | - (-) | - | 2/3 |")  # no c column: no mean, no mean delta
    # the same cells without leave_one_out: the combined-sets summary as before, no LOSO block
    plain = grid_table(cells, dataclasses.replace(spec, leave_one_out=False))
    assert "leave-one-source-out summary" not in plain and "### summary of combined training sets" in plain


def test_without_in_source_eval_cells_score_only_held_out_sources_and_the_loso_table_is_unchanged(tmp_path):
    from dfbench import cell_key
    from dfbench.cells import eval_sets

    cells, spec, _, _ = _loso_cells(tmp_path)
    full = grid_table(cells, spec).splitlines()
    held = {"b+c": "a", "a+c": "b", "a+b": "c"}
    lean = [{**c, "eval": {s: v for s, v in c["eval"].items() if s == held[c["train_source"]]}} for c in cells]
    lines = grid_table(lean, dataclasses.replace(spec, in_source_eval=False)).splitlines()
    k = full.index("### leave-one-source-out summary (ROC AUC; TPR at FPR 1e-2; mean of seeds)")
    assert lines[k:k + 8] == full[k:k + 8]  # the summary reads the held-out columns only
    block = lines.index("### trained on b + c")
    assert lines[block + 2].startswith("| recipe | a | mean cross |")  # no in-source column to show
    # eval_sets: the held-out source alone; the setting is in the cell key only when off
    for name in "abc":
        _paired_folder(tmp_path / "data" / name, 6)
    src_spec = GridSpec(data_root=str(tmp_path / "data"), sources=list("abc"), train_on=["b+c", "a+c", "a+b"],
                        leave_one_out=True, recipes={"r": {}})
    from dfbench import load_sources, training_set

    sources = load_sources(src_spec)
    ts = training_set("b+c", sources)
    assert [e.name for e in eval_sets(src_spec, ts, sources, tmp_path / "w")] == ["a", "b", "c"]
    off = dataclasses.replace(src_spec, in_source_eval=False)
    assert [e.name for e in eval_sets(off, ts, sources, tmp_path / "w")] == ["a"]
    ecfg = recipe_config(src_spec, "r", 0)
    assert cell_key(off, ecfg) != cell_key(src_spec, ecfg)


def test_groups_across_folds_counts_pairs_that_reach_into_val():
    from dfbench import Source, groups_across_folds

    train = pd.DataFrame({"img_name": ["real/r0.jpg", "fake/f0.jpg", "real/r1.jpg", "fake/f1.jpg", "real/x.jpg"],
                          "label": [0, 1, 0, 1, 0], "group": ["p0", "p0", "p1", "p1", "real/x.jpg"]})
    src = Source("d", train, train.iloc[:0], train, Path("/d"), "pairs")
    other = Source("o", train.assign(group=train.img_name), train.iloc[:0], train, Path("/o"))
    names = [f"{s}/{n}" for s in ("d", "o") for n in train.img_name]
    split = pd.DataFrame({"img_name": names + ["d/aug/1.png"], "origin": ["train"] * 10 + ["aug"],
                          "fold": [0, 0, 0, 1, 2, 3, 4, 0, 1, 2, 0], "subset": ["val", "val", "val"] + ["train"] * 8})
    assert groups_across_folds(split, [src, other]) == {"n_groups": 2, "n_across_folds": 1, "n_across_val": 1}
    alone = split[split.img_name.str.startswith("d/")].assign(img_name=lambda d: d.img_name.str[2:])
    assert groups_across_folds(alone, [src])["n_across_val"] == 1


def test_reconstruction_fakes_enter_the_cell_key_only_when_on():
    """Stage 2's reconstruct block (added after the cells were first cached) is left out of the key while off
    (per_real 0, whatever its other settings), so cached cells stay valid; switched on, it makes new cells."""
    import dfbench as benchmark

    spec = load_grid("bench/grid.yaml")
    ecfg = recipe_config(spec, "baseline", 0)
    off = benchmark.cell_key(spec, ecfg)
    assert "reconstruct" not in benchmark.shared_settings(spec)["augment_sd"]
    other_off = dataclasses.replace(spec, augment_sd={"reconstruct": {"per_real": 0.0, "methods": ["random_ae"]}})
    assert benchmark.cell_key(other_off, ecfg) == off
    on = dataclasses.replace(spec, augment_sd={"reconstruct": {"per_real": 1.0, "methods": ["taef2"]}})
    assert benchmark.cell_key(on, ecfg) != off
