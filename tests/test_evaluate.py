"""Stage 6: listing labelled sets, degradations, the AUC bootstrap, hand-checked metrics and a whole run
on two tiny sets scored by a random-weight expert through the ensemble's one scoring path."""

import json
import os
import pickle
import subprocess
import sys
import time
import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import layout_in, photo_like, write_jpeg
from sklearn.metrics import roc_auc_score
from test_serve_api import THRESHOLDS, make_card

from dfpipe.config import EvalSetConfig, EvaluateConfig
from dfpipe.data.images import decode_image
from dfpipe.evaluate import (bootstrap_auc, eval_sets, list_set, set_paths, markdown_table, parse_degradation, run as run_evaluate,
                             set_metrics, weighted_auc)
from dfpipe.metrics import MetricError
from dfpipe.ensemble_predict import Ensemble

REPO = Path(__file__).resolve().parents[1]
BROKEN = b"\xff\xd8\xff\xe0 cut short"


def _folder_set(root: Path, rng, n: int = 3, broken_fake: bool = False) -> None:
    """root/real/*.jpg (one nested), root/fake/*.jpg, a text file; optionally a corrupt fake."""
    for i in range(n):
        write_jpeg(root / "real" / ("sub" if i == 0 else "") / f"r{i}.jpg", photo_like(rng, 50 + 4 * i, 60))
        write_jpeg(root / "fake" / f"f{i}.jpg", cv2.GaussianBlur(photo_like(rng, 64, 48 + 4 * i), (0, 0), 2))
    (root / "real" / "notes.txt").write_text("not an image")
    if broken_fake:
        (root / "fake" / "broken.jpg").write_bytes(BROKEN)


def _csv_set(root: Path, rng, n: int = 3) -> Path:
    """root/img/*.jpg with a label CSV beside the folder; returns the CSV."""
    rows = ["img_name,target"]
    for i in range(2 * n):
        write_jpeg(root / "img" / f"x{i}.jpg", photo_like(rng, 56, 56))
        rows.append(f"x{i}.jpg,{i % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


# ----------------------------------------------------------------------------- listing
def test_folder_and_label_csv_layouts_list_the_right_labels(tmp_path, rng):
    _folder_set(tmp_path / "a", rng, n=2)
    _csv_set(tmp_path / "b", rng, n=2)
    a = list_set(EvalSetConfig("a", "a"), tmp_path)
    assert dict(zip(a.img_name, a.label)) == {"real/sub/r0.jpg": 0, "real/r1.jpg": 0,
                                              "fake/f0.jpg": 1, "fake/f1.jpg": 1}
    assert all(Path(p).is_file() for p in a.path)
    b = list_set(EvalSetConfig("b", str(tmp_path / "b" / "img"), str(tmp_path / "b" / "labels.csv")), "ignored")
    assert list(b.img_name) == [f"x{i}.jpg" for i in range(4)] and list(b.label) == [0, 1, 0, 1]
    assert b.path[3] == str(tmp_path / "b" / "img" / "x3.jpg")


def test_listing_errors_name_the_folder_and_duplicate_set_names_are_refused(tmp_path, rng):
    (tmp_path / "empty" / "real").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no images in .*empty/real or .*empty/fake"):
        list_set(EvalSetConfig("e", "empty"), tmp_path)
    write_jpeg(tmp_path / "half" / "real" / "r.jpg", photo_like(rng, 32, 32))
    with pytest.raises(ValueError, match=r"half/fake has no images"):
        list_set(EvalSetConfig("h", "half"), tmp_path)
    cfg = EvaluateConfig(sets=[EvalSetConfig("x", "half"), EvalSetConfig("x", "empty")])
    with pytest.raises(ValueError, match=r"duplicate set name\(s\) \['x'\]"):
        run_evaluate(cfg, layout_in(tmp_path, data_root=tmp_path, card=tmp_path / "none.json"))


# ----------------------------------------------------------------------------- degradations
def test_degradations_change_pixels_as_intended(rng):
    img = photo_like(rng, 96, 128)
    err = {q: np.abs(parse_degradation(f"jpeg{q}")(img).astype(float) - img).mean() for q in (95, 75, 50)}
    assert 0 < err[95] < err[75] < err[50]
    half = parse_degradation("half")(img)
    assert half.shape == (48, 64, 3) and half.dtype == np.uint8
    np.testing.assert_allclose(half.mean(axis=(0, 1)), img.mean(axis=(0, 1)), atol=1.0)  # area mean kept

    def high_freq(x):
        return cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64), cv2.CV_64F).var()

    blurred = parse_degradation("blur1")(img)
    assert blurred.shape == img.shape and high_freq(blurred) < 0.5 * high_freq(img)
    assert high_freq(parse_degradation("blur2.5")(img)) < high_freq(blurred)
    for name in ("jpeg75", "half", "blur1"):  # deterministic, and picklable for DataLoader workers
        d = parse_degradation(name)
        np.testing.assert_array_equal(d(img), pickle.loads(pickle.dumps(d))(img))


@pytest.mark.parametrize("name", ["jpeg0", "jpeg101", "jpegx", "blur0", "blur", "quarter", "clean", ""])
def test_unknown_degradations_list_the_valid_forms(name):
    with pytest.raises(ValueError, match=r"valid forms: jpeg<q> .*half.*blur<sigma>"):
        parse_degradation(name)


# ----------------------------------------------------------------------------- AUC bootstrap
def test_weighted_auc_equals_sklearn_on_the_expanded_resample(rng):
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y, 1.0), 1)  # rounded: many ties
    pos, neg = s[y == 1], s[y == 0]
    w_pos, w_neg = rng.integers(0, 3, (4, len(pos))), rng.integers(0, 3, (4, len(neg)))
    got = weighted_auc(pos, neg, w_pos.astype(float), w_neg.astype(float))
    for b in range(4):
        ys = np.r_[np.ones(w_pos[b].sum()), np.zeros(w_neg[b].sum())]
        ss = np.r_[np.repeat(pos, w_pos[b]), np.repeat(neg, w_neg[b])]
        assert got[b] == pytest.approx(roc_auc_score(ys, ss), abs=1e-12)
    assert weighted_auc(pos, neg, np.ones((1, len(pos))), np.ones((1, len(neg))))[0] == pytest.approx(
        roc_auc_score(y, s), abs=1e-12)


def _scores(rng, n):
    y = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    return y, rng.normal(y * 1.0, 1.0)


def test_bootstrap_interval_brackets_auc_narrows_with_data_and_is_seeded(rng):
    widths = {}
    for n in (100, 2000):
        y, s = _scores(rng, n)
        t = time.perf_counter()
        aucs = bootstrap_auc(y, s, 1000, seed=3)
        if n == 2000:
            assert time.perf_counter() - t < 1.5  # vectorised: no sklearn call per resample
        lo, hi = np.percentile(aucs, [2.5, 97.5])
        assert lo < roc_auc_score(y, s) < hi
        widths[n] = hi - lo
        np.testing.assert_array_equal(aucs, bootstrap_auc(y, s, 1000, seed=3))
        assert not np.array_equal(aucs, bootstrap_auc(y, s, 1000, seed=4))
    assert widths[2000] < 0.5 * widths[100]
    y, s = _scores(rng, 300)  # chunking does not change the draws
    np.testing.assert_array_equal(bootstrap_auc(y, s, 50, 1), bootstrap_auc(y, s, 50, 1, max_cells=1000))


# ----------------------------------------------------------------------------- metrics of known scores
def test_set_metrics_hand_values_and_failed_files():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.4, 0.6, 0.35, 0.8, 0.9, np.nan])  # the last file failed to decode
    m = set_metrics(y, s, THRESHOLDS, bootstrap=200, seed=0)  # t_decision 0.5, t_fake 0.7, t_real 0.3
    assert (m["n_real"], m["n_fake"], m["n_failed"]) == (3, 3, 1)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(4 / 6)
    assert m["auc"] == pytest.approx(7 / 9)  # 0.35 beats one real, 0.8 and 0.9 beat all three
    shares = (m["share_likely_fake"], m["share_uncertain"], m["share_likely_real"])
    assert shares == pytest.approx((2 / 6, 3 / 6, 1 / 6))
    assert m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"]
    assert m["tpr_at_fpr_1e-2"] == pytest.approx(2 / 3) and m["eer"] == pytest.approx(1 / 3)
    assert "auc_ci_low" not in set_metrics(y, s, THRESHOLDS, bootstrap=0)
    with pytest.raises(MetricError):
        set_metrics(np.array([0, 0, 1]), np.array([0.2, 0.3, np.nan]), THRESHOLDS)


def test_markdown_table_has_a_row_per_set_and_the_mean():
    c = {"auc": 0.9, "ap": 0.8, "tpr_at_fpr_1e-2": 0.5, "tpr_at_fpr_1e-3": 0.4, "eer": 0.1, "f1": 0.85}
    metrics = {"s1": {"clean": {**c, "auc_ci_low": 0.85, "auc_ci_high": 0.95, "n_real": 5, "n_fake": 6},
                      "jpeg50": {**c, "auc": 0.7}},
               "mean": {"clean": c, "jpeg50": {**c, "auc": 0.7}}}
    lines = markdown_table(metrics, ["clean", "jpeg50"]).strip().splitlines()
    assert lines[0].split("|")[1:-1] == [" set ", " real/fake ", " AUC [95% CI] ", " AP ", " TPR@1e-2 ", " TPR@1e-3 ",
                                         " EER ", " F1 ", " AUC jpeg50 "]
    assert lines[2] == "| s1 | 5/6 | 0.900 [0.850, 0.950] | 0.800 | 0.500 | 0.400 | 0.100 | 0.850 | 0.700 |"
    assert lines[3].startswith("| mean |  | 0.900 | 0.800") and len(lines) == 4


# ----------------------------------------------------------------------------- the whole stage
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A card + expert, a folder-layout set with a corrupt fake and a label-CSV set, the config and layout, and
    the metrics stage 6 returned."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(7)
    models, card = make_card(root, tta=("identity",))
    _folder_set(root / "raw" / "folders", rng, n=4, broken_fake=True)
    _csv_set(root / "raw" / "csvset", rng, n=3)
    out = root / "reports"
    cfg = EvaluateConfig(sets=[EvalSetConfig("folders", "folders"),
                               EvalSetConfig("csvset", "csvset/img", "csvset/labels.csv")],
                         degradations=["jpeg50", "half"], bootstrap=200, seed=0, batch_size=4, workers=0)
    layout = layout_in(root, card=card, models=models, data_root=root / "raw", eval_metrics=out / "metrics.json",
                       eval_table=out / "table.md", eval_roc=out / "roc", eval_scores=out / "scores.csv")
    return cfg, layout, run_evaluate(cfg, layout)


def test_run_evaluate_writes_every_output(world):
    _, layout, metrics = world
    assert json.loads(Path(layout.eval_metrics).read_text()) == metrics
    assert set(metrics) == {"folders", "csvset", "mean"}
    for name in ("folders", "csvset"):
        assert set(metrics[name]) == {"clean", "jpeg50", "half"}
        roc = pd.read_csv(Path(layout.eval_roc) / f"roc_{name}.csv")
        assert list(roc.columns) == ["fpr", "tpr", "threshold"] and roc.fpr.iloc[-1] == 1 and roc.tpr.iloc[-1] == 1
    assert set(metrics["mean"]["clean"]) >= {"auc", "ap", "tpr_at_fpr_1e-2", "tpr_at_fpr_1e-3"}
    assert metrics["mean"]["half"]["auc"] == pytest.approx((metrics["folders"]["half"]["auc"]
                                                            + metrics["csvset"]["half"]["auc"]) / 2)

    def numbers(d):  # dvc metrics show: nested dicts of numbers only
        return all(numbers(v) if isinstance(v, dict) else isinstance(v, (int, float)) for v in d.values())

    assert numbers(metrics)
    rows = [ln for ln in Path(layout.eval_table).read_text().splitlines() if ln.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["set", "folders", "csvset", "mean"]
    assert "AUC half" in rows[0] and "AUC jpeg50" in rows[0]
    scores = pd.read_csv(layout.eval_scores)
    assert list(scores.columns) == ["set", "degradation", "img_name", "label", "score"]
    assert len(scores) == 3 * (9 + 6)  # every file under every degradation, failed ones included (empty score)


def test_corrupt_file_is_counted_not_fatal(world):
    _, layout, metrics = world
    for d in ("clean", "jpeg50", "half"):
        m = metrics["folders"][d]
        assert (m["n_real"], m["n_fake"], m["n_failed"]) == (4, 4, 1)
        assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == 8
        assert metrics["csvset"][d]["n_failed"] == 0
    scores = pd.read_csv(layout.eval_scores)
    broken = scores[scores.img_name == "fake/broken.jpg"]
    assert len(broken) == 3 and broken.score.isna().all()


def test_scores_are_the_ensembles_one_scoring_path(world):
    cfg, layout, _ = world
    ens = Ensemble.from_card(layout.card, layout.models, torch.device("cpu"))
    files = list_set(cfg.sets[1], layout.data_root)
    scores = pd.read_csv(layout.eval_scores).query("set == 'csvset'")
    want, _ = ens.score_files(list(files.path), workers=0)
    clean = scores[scores.degradation == "clean"]
    assert list(clean.img_name) == list(files.img_name)
    np.testing.assert_allclose(clean.score, want, atol=1e-6)
    jpeg = parse_degradation("jpeg50")  # degraded at full size, then the checkpoints' preprocessing
    want_jpeg = ens.score_images([jpeg(decode_image(p)) for p in files.path])
    np.testing.assert_allclose(scores[scores.degradation == "jpeg50"].score, want_jpeg, atol=1e-6)
    assert not np.allclose(want_jpeg, want, atol=1e-6)


def test_a_set_without_usable_fakes_is_a_clear_error(world, tmp_path, rng):
    cfg, layout, _ = world
    write_jpeg(tmp_path / "bad" / "real" / "r.jpg", photo_like(rng, 40, 40))
    (tmp_path / "bad" / "fake").mkdir()
    (tmp_path / "bad" / "fake" / "f.jpg").write_bytes(BROKEN)
    bad = replace(cfg, sets=[EvalSetConfig("badset", "bad")], degradations=[])
    with pytest.raises(ValueError, match=r"evaluate set 'badset' \(clean\): no usable fake image \(1 failed"):
        run_evaluate(bad, replace(layout, data_root=str(tmp_path), eval_metrics=str(tmp_path / "m.json")))
    assert not (tmp_path / "m.json").exists()


# ----------------------------------------------------------------------------- sets: [] = the data root's test set
def _test_set(raw: Path, rng, labels: bool) -> list[str]:
    """raw/testset/*.jpg (3 real, 3 blurred fake) and, with ``labels``, raw/testset_label_private.txt (the
    default layout's names); returns the image names."""
    names = []
    for i in range(6):
        img = photo_like(rng, 52, 60)
        write_jpeg(raw / "testset" / f"t{i}.jpg", cv2.GaussianBlur(img, (0, 0), 2) if i % 2 else img)
        names.append(f"t{i}.jpg")
    if labels:
        pd.DataFrame({"img_name": names, "target": [i % 2 for i in range(6)]}).to_csv(
            raw / "testset_label_private.txt", index=False)
    return names


def test_no_sets_scores_the_data_roots_own_test_set_as_test(world, tmp_path, rng):
    """evaluate.sets: [] (the default) = paths.test_dir scored against paths.test_labels, as set "test"."""
    cfg, layout, _ = world
    raw = tmp_path / "raw"
    names = _test_set(raw, rng, labels=True)
    out = layout_in(tmp_path, data_root=raw, card=layout.card, models=layout.models)  # the default test entries
    metrics = run_evaluate(replace(cfg, sets=[], degradations=["jpeg50"]), out)
    assert set(metrics) == {"test", "mean"} and set(metrics["test"]) == {"clean", "jpeg50"}
    clean = metrics["test"]["clean"]
    assert (clean["n_real"], clean["n_fake"], clean["n_failed"]) == (3, 3, 0)
    scores = pd.read_csv(out.eval_scores)
    assert set(scores.set) == {"test"} and list(scores.img_name[scores.degradation == "clean"]) == names
    ens = Ensemble.from_card(layout.card, layout.models, torch.device("cpu"))
    want, _ = ens.score_files([str(raw / "testset" / n) for n in names], workers=0)
    np.testing.assert_allclose(scores.score[scores.degradation == "clean"], want, atol=1e-6)
    assert clean["auc"] == pytest.approx(roc_auc_score([i % 2 for i in range(6)], want), abs=1e-9)
    assert json.loads(Path(out.eval_metrics).read_text()) == metrics
    assert (Path(out.eval_roc) / "roc_test.csv").is_file()


@pytest.mark.parametrize("labels", ["missing", "not named"])
def test_no_sets_and_no_test_labels_writes_empty_outputs_with_a_warning(tmp_path, rng, caplog, labels):
    """No labelled set at all (the test labels are not out yet, or paths.test_labels is ""): nothing to score,
    no error; stage 6's declared outputs exist (DVC needs them), empty. The card and models do not exist: any
    attempt to score would fail."""
    raw = tmp_path / "raw"
    _test_set(raw, rng, labels=False)  # test images are there, their labels are not
    layout = layout_in(tmp_path / "out", data_root=raw, card=tmp_path / "no_card.json", models=tmp_path / "none",
                       **({"test_labels": ""} if labels == "not named" else {}))
    with caplog.at_level(logging.WARNING, logger="dfpipe.evaluate"):
        metrics = run_evaluate(EvaluateConfig(), layout)
    assert metrics == {}
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "no labelled set" in warned[0].getMessage()
    if labels == "missing":
        assert str(raw / "testset_label_private.txt") in warned[0].getMessage()  # where it looked
    assert json.loads(Path(layout.eval_metrics).read_text()) == {}
    scores = pd.read_csv(layout.eval_scores)
    assert list(scores.columns) == ["set", "degradation", "img_name", "label", "score"] and len(scores) == 0
    assert Path(layout.eval_roc).is_dir() and not any(Path(layout.eval_roc).iterdir())
    assert "no labelled set" in Path(layout.eval_table).read_text()
    assert not (tmp_path / "no_card.json").exists()


def test_stage_script_reports_bad_config_in_one_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("evaluate:\n  degradations: [jpeg75, sharpen]\n  sets:\n    - {name: a, images: a}\n")
    (tmp_path / "data" / "raw" / "a").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(REPO / "06_evaluate.py"), "--params", str(p)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown degradation 'sharpen'" in res.stderr and "Traceback" not in res.stderr


def test_default_set_is_checked_at_the_paths_list_set_reads(tmp_path):
    """evaluate.sets empty: the data root's test set counts only when its folder and label file are there, found
    as :func:`list_set` will read them (relative to the data root, or absolute)."""
    root = tmp_path / "raw"
    (root / "test").mkdir(parents=True)
    assert set_paths(EvalSetConfig("s", "test", ""), root) == (root / "test", None)
    assert set_paths(EvalSetConfig("s", "test", str(tmp_path / "l.csv")), root)[1] == tmp_path / "l.csv"
    layout = layout_in(tmp_path, data_root=root, test_dir="test", test_labels="labels.csv")
    assert eval_sets(EvaluateConfig(), layout) == []  # no label file yet
    (root / "labels.csv").write_text("img_name,target\n")
    (test,) = eval_sets(EvaluateConfig(), layout)
    assert set_paths(test, layout.data_root) == (root / "test", root / "labels.csv")
