"""All six stages, end to end, on a tiny demo dataset in a temp dir (CPU, about a minute)."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dfpipe.config import (AugmentConfig, EvaluateConfig, ExpertConfig, LossWeights, PredictConfig,
                           PrepareConfig, SplitConfig, TrainConfig)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_expert(**kw) -> ExpertConfig:
    # the winners' full recipe (generated fakes, KL to the EMA teacher, NCE), so every code path runs end to end,
    # on native pixels (crop): the demo's up-sampling artefact is lost in a resize (val/test AUC 0.78/0.61 with
    # resize, 0.87/0.86 with crop, CE alone, measured on this fixture)
    base = dict(img_size=64, input_mode="crop", epochs=3, batch_size=16, lr=2e-3, lr_ref_batch=16, ema_epochs=1.0, warmup_epochs=0.2,
                augment="light", use_augmented=True, loss=LossWeights(ce=1.0, kl=0.5, nce=0.1))
    base.update(kw)
    return ExpertConfig(**base)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """All six stages on a copy of the demo data laid out somewhere else, the one setting changed from the
    default layout being ``data_root`` (issue: "one setting points the whole DAG at a user's data"). The stages
    run from an empty working directory, where the default ``data/raw`` does not exist: a stage that read its
    input from anywhere but ``data_root`` would fail. Returns (working dir, layout, stage 5 metrics, stage 6's)."""
    from dfpipe import evaluate
    from dfpipe.augment_sd import run as run_augment
    from dfpipe.cluster_split import run as run_split
    from dfpipe.demo import make_demo_dataset
    from dfpipe.ensemble_predict import run as run_predict
    from dfpipe.layout import Layout
    from dfpipe.prepare_data import run as prepare
    from dfpipe.train_experts import run as run_train

    t = tmp_path_factory.mktemp("pipe")
    # one learnable kind everywhere (blocky up-sampling, the demo's generator-like artefact), so the test can
    # ask that the whole pipeline learns: val and test AUC well above chance (test_the_pipeline_learns)
    make_demo_dataset(t / "made", seed=0, n_train=160, n_val=32, n_test=32, size_range=(64, 96),
                      fake_kinds=dict.fromkeys(("train", "val", "test"), ["upsample"]))
    users = t / "users_data" / "phase1"
    shutil.copytree(t / "made", users)
    shutil.rmtree(t / "made")  # only the copy is left to read
    before = {p: p.stat().st_mtime_ns for p in users.rglob("*")}
    layout = Layout(data_root=str(users))
    assert layout == dataclasses.replace(Layout(), data_root=str(users))  # nothing else differs from the default
    work = t / "work"
    work.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # the default layout's outputs are relative: they land in here
        prepare(PrepareConfig(workers=1), layout)
        run_augment(AugmentConfig(fakes_per_real=0.5), layout)
        run_split(SplitConfig(img_size=64, n_clusters=4, n_folds=2, per_class=False), layout)
        best = run_train(TrainConfig(workers=0, experts={
            "a": tiny_expert(), "b": tiny_expert(img_size=48, loss=LossWeights(kl=0.0, nce=0.2), augment="strong",
                                                 seed=1)}), layout)
        assert set(best) == {"a", "b"}  # no expert named: every expert of the config
        metrics = run_predict(PredictConfig(experts=["a", "b"]), layout)
        evaluated = evaluate.run(EvaluateConfig(degradations=["jpeg50"], bootstrap=50, workers=0), layout)
    assert sorted(p.name for p in t.iterdir()) == ["users_data", "work"]  # every output in the working dir
    assert {p: p.stat().st_mtime_ns for p in users.rglob("*")} == before  # and the user's data left as it was
    return work, layout, metrics, evaluated


def out(t: Path, layout, name: str) -> Path:
    """Entry ``name`` of the default layout, which the fixture ran inside the working dir ``t``."""
    return t / getattr(layout, name)


def test_submission_has_one_row_per_test_image_in_sorted_order(run):
    t, layout, _, _ = run
    lines = out(t, layout, "submission").read_text().splitlines()
    assert lines[0] == "img_name,y_pred"
    names = sorted(p.name for p in Path(layout.data("test_dir")).iterdir())  # the copy's test set
    assert [ln.split(",")[0] for ln in lines[1:]] == names
    scores = np.array([float(ln.split(",")[1]) for ln in lines[1:]])
    assert ((scores >= 0) & (scores <= 1)).all() and scores.std() > 0


def test_the_pipeline_learns(run):
    """Issue 15: the end-to-end run is above chance on the val fold and on the test set (labels it never saw)."""
    _, _, metrics, _ = run
    val, test = metrics["val"]["ensemble"]["auc"], metrics["test"]["ensemble"]["auc"]
    print(f"end-to-end AUC: val {val:.3f}, test {test:.3f}")
    assert val > 0.7 and test > 0.7, (val, test)


def test_metrics_agree_with_sklearn_on_the_val_fold(run):
    from sklearn.metrics import roc_auc_score

    from dfpipe.data.preprocess import fit
    from dfpipe.data.samples import load_pool
    from dfpipe.data.store import StoreReader
    from dfpipe.ensemble_predict import Ensemble, combine_scores

    t, layout, metrics, _ = run
    assert json.loads(out(t, layout, "metrics").read_text())["val"]["ensemble"]["auc"] == \
        metrics["val"]["ensemble"]["auc"]
    splits = pd.read_csv(out(t, layout, "splits"))
    val_uids = set(splits.uid[(splits.subset == "val") & (splits.origin != "aug")])
    pool = load_pool(out(t, layout, "prepared"))
    val = pool[pool.uid.isin(val_uids)]
    ens = Ensemble.load(out(t, layout, "models"), ["a", "b"], ["identity", "hflip"], "mean_prob", torch.device("cpu"))
    reader = StoreReader()
    imgs = [reader.image(p, i) for p, i in zip(val.cache_path, val.cache_index)]  # native sizes
    scores = ens.score_images(imgs)
    assert metrics["val"]["ensemble"]["auc"] == pytest.approx(roc_auc_score(val.label, scores), abs=1e-6)
    assert set(metrics["val"]["experts"]) == {"a", "b"}
    assert "test" in metrics and metrics["n_test"] == 32
    # per-method breakdown: the val-fold generated fakes of each editing method against the val reals
    assert set(metrics["val"]["by_method"]) >= {"original"} and len(metrics["val"]["by_method"]) >= 2
    assert out(t, layout, "roc_png").stat().st_size > 1000 and out(t, layout, "card").is_file()
    # the ensemble of the two is the mean of the experts' own scores
    pe = ens.score_batch({p.key: torch.from_numpy(np.stack([fit(im, p) for im in imgs])) for p in ens.policies})
    np.testing.assert_allclose(combine_scores(pe, "mean_prob"), scores, atol=1e-6)


def test_the_card_says_what_the_model_was_trained_on(run):
    """Issue 25: a model trained on the demo data looked real. The demo's dataset card reaches the ensemble card
    through stage 1's data card; the CLI, API and page read it from there (tests/test_identity.py)."""
    t, layout, _, _ = run
    card = json.loads(out(t, layout, "card").read_text())
    assert card["demo"] is True and card["training_data"]["demo"] is True
    assert card["training_data"]["summary"] == "96 real + 96 fake images of the synthetic demo data (phase1)"
    assert card["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{12}(-dirty)?", card["commit"])


def test_checkpoints_describe_themselves_and_hold_ema_weights(run):
    t, layout, _, _ = run
    ckpt = torch.load(out(t, layout, "models") / "a" / "best.pt", map_location="cpu", weights_only=True)
    d = ckpt["description"]
    assert d["input"] == {"size": 64, "mode": "crop", "mean": [0.5] * 3, "std": [0.5] * 3}  # stored once
    assert ckpt["stage1"]["max_side"] == 0 and ckpt["format"] == 2
    assert "img_size" not in ckpt["config"] and "input_mode" not in ckpt["config"]
    assert ckpt["config"]["loss"]["kl"] == 0.5
    from test_train import live_history

    hist = live_history(out(t, layout, "train_logs") / "a")  # <train_logs>/<expert>
    assert list(hist.epoch) == [1, 2, 3]
    assert {"loss", "ce", "kl", "nce", "val_auc", "val_tpr_at_fpr_1e-3", "lr", "images_per_s"} <= set(hist.columns)
    assert hist.kl.iloc[-1] > 0  # the EMA teacher differs from the student, so KL is active


def test_splits_keep_generated_images_with_their_source(run):
    from dfpipe.cluster_split.cluster import check_split

    t, layout, _, _ = run
    df = pd.read_csv(out(t, layout, "splits"), keep_default_na=False)
    assert (df.groupby("cluster").fold.nunique() == 1).all()
    fold = df.set_index("uid").fold
    aug = df[df.origin == "aug"]
    assert len(aug) > 0 and (fold.loc[aug.source_uid].to_numpy() == aug.fold.to_numpy()).all()
    # no training splice has its donor in val (stage 2 drew donors from every real image)
    donors = aug[(aug.subset == "train") & (aug.donor_uid != "")]
    assert len(donors) > 0 and not (df.set_index("uid").subset.loc[donors.donor_uid] == "val").any()
    check_split(df, val_fold=0)
    assert out(t, layout, "cluster_plot").stat().st_size > 1000


def test_stage_6_scores_the_data_roots_own_test_set(run):
    """evaluate.sets: [] = the test set of data_root (its released labels): the same images and labels stage 5
    scored, so the clean AUC is stage 5's test AUC; every output lands at its layout entry."""
    t, layout, metrics, evaluated = run
    assert set(evaluated) == {"test", "mean"} and set(evaluated["test"]) == {"clean", "jpeg50"}
    clean = evaluated["test"]["clean"]
    assert clean["n_real"] + clean["n_fake"] == metrics["n_test"] == 32 and clean["n_failed"] == 0
    assert clean["auc"] == pytest.approx(metrics["test"]["ensemble"]["auc"], abs=1e-3)
    assert json.loads(out(t, layout, "eval_metrics").read_text()) == json.loads(json.dumps(evaluated))
    scores = pd.read_csv(out(t, layout, "eval_scores"))
    assert set(scores.set) == {"test"} and len(scores) == 2 * 32
    assert (out(t, layout, "eval_roc") / "roc_test.csv").is_file()
    assert "\n| test | " in out(t, layout, "eval_table").read_text()


def test_every_picture_is_drawn_and_explains_itself(run, monkeypatch):
    """Issue 25: stage 2's sheet has column titles and outlined masks, stage 3's sheet marks the val fold, each expert
    has its training curves as a PNG, and ``dfpipe report`` lists them all."""
    import cv2

    from dfpipe.augment_sd.sheet import OUTLINE, TITLE_H
    from dfpipe.cluster_split.pictures import VAL_BGR
    from dfpipe.report import pictures

    t, layout, _, _ = run
    sheet = cv2.cvtColor(cv2.imread(str(out(t, layout, "augmented") / "contact_sheet.png")), cv2.COLOR_BGR2RGB)
    assert (sheet[:TITLE_H] < 128).any() and np.all(sheet[TITLE_H:] == OUTLINE, axis=2).sum() > 100
    assert np.all(cv2.imread(str(out(t, layout, "cluster_examples"))) == VAL_BGR, axis=2).sum() > 1000
    curves = [out(t, layout, "train_logs") / e / "plots" / "metrics" / "curves.png" for e in ("a", "b")]
    assert all(cv2.imread(str(c)) is not None for c in curves)
    monkeypatch.chdir(t)  # the layout's entries are relative to the working dir
    assert pictures(layout) == [layout.roc_png, layout.cluster_plot, layout.cluster_examples,
                                str(Path(layout.augmented) / "contact_sheet.png"),
                                *(str(c.relative_to(t)) for c in curves)]


# ----------------------------------------------------------------------------- the DVC DAG itself
def _dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_dvc_repro_runs_the_dag_and_reruns_only_what_changed(tmp_path):
    from dfpipe.demo import make_demo_dataset

    work = tmp_path / "repo"
    work.mkdir()
    for item in ("dvc.yaml", "params.yaml", ".dvcignore", "dfpipe", *sorted(p.name for p in REPO.glob("0*_*.py"))):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / item, **(
            {"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    _dvc(work, "init", "-q")
    _dvc(work, "config", "core.analytics", "false")
    make_demo_dataset(work / "data" / "raw", seed=0, n_train=32, n_val=12, n_test=8, size_range=(64, 80))
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prepare_data"].update(workers=1)
    params["cluster_split"].update(img_size=64, n_clusters=2, n_folds=2)
    for e in params["train_experts"]["experts"].values():
        e.update(img_size=48, epochs=1, batch_size=16)
    params["train_experts"]["workers"] = 0
    params["evaluate"].update(degradations=["jpeg50"], bootstrap=50, workers=0)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    dvc_yaml = (work / "dvc.yaml").read_bytes()
    _dvc(work, "repro", "-q")
    assert (work / "submissions" / "prediction.txt").is_file()
    shown = _dvc(work, "metrics", "show")
    assert "ensemble" in shown and "reports/eval/metrics.json" in shown  # stage 5's and stage 6's metrics
    # stage 4's DVCLive summaries: the best epoch of each expert
    assert "reports/train/lite0_a/metrics.json" in shown and "reports/train/lite0_b/metrics.json" in shown
    metrics = json.loads(_dvc(work, "metrics", "show", "--json"))
    expert = metrics[""]["data"]["reports/train/lite0_a/metrics.json"]["data"]
    # evaluate.sets: [] scored the data root's own (labelled) test set, as set "test"
    evaluated = metrics[""]["data"]["reports/eval/metrics.json"]["data"]
    assert set(evaluated) == {"test", "mean"} and evaluated["test"]["clean"]["n_real"] + \
        evaluated["test"]["clean"]["n_fake"] == 8
    assert 0 <= expert["val_auc"] <= 1 and expert["best_epoch"] == 1 and expert["step"] == 1
    # and its per-epoch curves, one .tsv per metric, x = step
    plots = json.loads(_dvc(work, "plots", "show", "--json"))["data"]
    curve = "reports/train/lite0_a/plots/metrics/val_auc.tsv"
    assert curve in plots and "reports/train/lite0_b/plots/metrics/loss.tsv" in plots, sorted(plots)
    points = plots[curve][0]["content"]["data"]["values"]
    assert [(p["step"], float(p["val_auc"])) for p in points] == [("1", expert["val_auc"])]
    # the same curves as a picture in that folder: an image plot, which needs no CDN to show
    assert [p["type"] for p in plots["reports/train/lite0_a/plots/metrics/curves.png"]] == ["image"]
    assert (work / "dvc.yaml").read_bytes() == dvc_yaml  # DVCLive left the pipeline alone
    assert (work / "reports" / "eval" / "table.md").read_text().count("\n| test | ") == 1
    # nothing changed: nothing to run
    assert json.loads(_dvc(work, "status", "--json")) == {}
    # one expert's param changed: only that expert and the ensemble run again
    params["train_experts"]["experts"]["lite0_a"]["lr"] = 5e-4
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(_dvc(work, "status", "--json"))) == {"train_experts@lite0_a"}
    ran = set(re.findall(r"Running stage '([^']+)'", _dvc(work, "repro")))
    assert ran == {"train_experts@lite0_a", "ensemble_predict", "evaluate"}
    # `dvc repro <stage>` reruns that one stage when forced, nothing else
    ran = set(re.findall(r"Running stage '([^']+)'", _dvc(work, "repro", "-f", "-s", "augment_sd")))
    assert ran == {"augment_sd"}
