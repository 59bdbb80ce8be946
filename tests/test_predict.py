import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import save_expert_checkpoint
from dfpipe.config import ExpertConfig
from dfpipe.data.preprocess import Stage1
from dfpipe.data.store import write_png_shard, write_store_record
from dfpipe.models import build_expert
from dfpipe.ensemble_predict import (Ensemble, build_submission, check_submission, combine_scores, fit_stacking, load_expert,
                            parse_view)


def test_combine_scores_hand_values():
    pe = np.array([[0.9, 0.2, 0.5], [0.5, 0.4, 0.1]])
    np.testing.assert_allclose(combine_scores(pe, "mean_prob"), [0.7, 0.3, 0.3])
    # mean of logits: logit(0.9)=2.1972, logit(0.5)=0 -> sigmoid(1.0986) = 0.75
    assert combine_scores(pe, "mean_logit")[0] == pytest.approx(0.75, abs=1e-6)
    # ranks per expert: [2,0,1]/2 and [2,1,0]/2 -> mean [1, .25, .25]
    np.testing.assert_allclose(combine_scores(pe, "rank"), [1.0, 0.25, 0.25])
    with pytest.raises(ValueError, match="unknown combine"):
        combine_scores(pe, "max")


def _manifest(names, cache_index):
    return pd.DataFrame({"img_name": names, "cache_index": cache_index})


def test_build_submission_sorts_and_falls_back_for_undecodable():
    man = _manifest(["b.jpg", "c.jpg", "a.jpg"], [0, -1, 1])
    sub = build_submission(man, np.array([0.2, 0.9]), fallback=0.5)
    assert sub.img_name.tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert sub.y_pred.tolist() == [0.9, 0.2, 0.5]


def test_check_submission_refuses_wrong_names_and_scores():
    good = pd.DataFrame({"img_name": ["a", "b"], "y_pred": [0.1, 0.9]})
    check_submission(good, pd.Series(["b", "a"]))
    with pytest.raises(ValueError, match="1 missing"):
        check_submission(good.iloc[:1], pd.Series(["a", "b"]))
    with pytest.raises(ValueError, match="1 unexpected"):
        check_submission(good, pd.Series(["a"]))
    with pytest.raises(ValueError, match="duplicate"):
        check_submission(pd.DataFrame({"img_name": ["a", "a"], "y_pred": [0.1, 0.2]}), pd.Series(["a"]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_submission(pd.DataFrame({"img_name": ["a", "b"], "y_pred": [0.1, 1.2]}), pd.Series(["a", "b"]))


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = ExpertConfig(pretrained="none", img_size=32)
    model = build_expert(cfg).eval()
    path = tmp_path / "m" / "best.pt"
    save_expert_checkpoint(path, model, cfg, metrics={"auc": 0.5})
    return path, model


def test_load_expert_restores_the_weights(checkpoint):
    path, model = checkpoint
    loaded = load_expert(path, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)["prob"], model(x)["prob"])
    assert loaded.description["input"] == {"size": 32, "mode": "resize", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert loaded.preprocess.input is loaded.model.input and loaded.preprocess.stage1 == Stage1()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        Ensemble.load(tmp_path, ["nope"], ["identity"], "mean_prob", torch.device("cpu"))


def test_hflip_tta_makes_scores_mirror_invariant(checkpoint, rng):
    path, _ = checkpoint
    e = load_expert(path, torch.device("cpu"))
    img = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)  # any size: resized like stage 1
    mirrored = np.ascontiguousarray(img[:, ::-1])
    plain = Ensemble([e], ["identity"], "mean_prob", torch.device("cpu"))
    tta = Ensemble([e], ["identity", "hflip"], "mean_prob", torch.device("cpu"))
    a, b = tta.score_images([img, mirrored])
    assert a == pytest.approx(b, abs=1e-5)
    p1, p2 = plain.score_images([img, mirrored])
    assert abs(p1 - p2) > 1e-6  # without TTA a random net is not mirror invariant
    assert a == pytest.approx((p1 + p2) / 2, abs=1e-5)


def test_ensemble_rejects_bad_settings(checkpoint):
    e = load_expert(checkpoint[0], torch.device("cpu"))
    with pytest.raises(ValueError, match="TTA"):
        Ensemble([e], ["rot45"], "mean_prob", torch.device("cpu"))
    with pytest.raises(ValueError, match="combine"):
        Ensemble([e], ["identity"], "vote", torch.device("cpu"))


# ----------------------------------------------------------------------------- TTA views
def _cpu_ensemble(checkpoint, tta, combine="mean_prob"):
    return Ensemble([load_expert(checkpoint[0], torch.device("cpu"))], tta, combine, torch.device("cpu"))


def test_four_rotations_make_scores_rotation_invariant(checkpoint, rng):
    img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)  # the expert's size: no resize in the way
    turned = [np.ascontiguousarray(np.rot90(img, k)) for k in range(4)]
    rot = _cpu_ensemble(checkpoint, ["identity", "rot90", "rot180", "rot270"])
    np.testing.assert_allclose(rot.score_images(turned), rot.score_images([img])[0], atol=1e-5)
    plain = _cpu_ensemble(checkpoint, ["identity"]).score_images(turned)
    assert np.ptp(plain) > 1e-6  # a random net alone is not rotation invariant


def test_scale_view_feeds_the_expert_at_a_different_size(checkpoint, rng):
    from dfpipe.data.transforms import to_model_input

    ens = _cpu_ensemble(checkpoint, ["scale0.75", "hflip+scale0.75"])
    m = ens.experts[0].model
    x = torch.from_numpy(rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8))  # the expert's resize32 input
    inp = to_model_input(x, 24, m.mean, m.std)  # 0.75 * img_size 32
    with torch.no_grad():
        want = (m(inp)["prob"] + m(torch.flip(inp, dims=[3]))["prob"]) / 2
    np.testing.assert_allclose(ens.score_batch({"resize32": x})[0], want.numpy(), atol=1e-5)
    full = _cpu_ensemble(checkpoint, ["identity"]).score_batch({"resize32": x})[0]
    assert np.abs(full - ens.score_batch({"resize32": x})[0]).max() > 1e-6


def test_view_batch_stacks_every_view_of_a_group_in_view_order(rng):
    from dfpipe.ensemble_predict.tta import view_batch

    x = torch.from_numpy(rng.standard_normal((2, 3, 5, 5)).astype(np.float32))
    views = [parse_view(n) for n in ("identity", "hflip", "vflip", "rot90", "rot180", "rot270")]
    want = torch.cat([x, x.flip(3), x.flip(2), x.rot90(1, (2, 3)), x.rot90(2, (2, 3)), x.rot90(3, (2, 3))])
    assert torch.equal(view_batch(views, x), want)  # view v of image b at row v B + b
    assert torch.equal(view_batch(views[1:2], x), views[1].apply(x))


def test_view_groups_are_resolved_once_not_per_batch(checkpoint, rng, monkeypatch):
    """An expert's views grouped by (policy, size) at load time; scoring a batch re-derives none of them."""
    from dfpipe.ensemble_predict import tta

    ens = _cpu_ensemble(checkpoint, ["identity", "scale0.75", "hflip", "hflip+scale0.75"])
    ((p1, s1, v1), (p2, s2, v2)), = ens.groups
    assert (s1, s2) == (32, 24) and p1 == p2 and [v.name for v in v1 + v2] == [
        "identity", "hflip", "scale0.75", "hflip+scale0.75"]
    sized = []
    monkeypatch.setattr(tta.View, "size", lambda self, n: sized.append(self) or 0)
    x = torch.from_numpy(rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8))
    assert ens.score_batch({p1.key: x}).shape == (1, 3) and sized == []


def test_combine_val_and_generated_scores_share_one_scale():
    from dfpipe.ensemble_predict.combine import combine_val, with_generated

    val_pe, y = np.array([[0.9, 0.2, 0.6, 0.1], [0.7, 0.4, 0.8, 0.3]]), np.array([1, 0, 1, 0])
    gen_pe = np.array([[0.95, 0.05], [0.85, 0.15]])
    stack, scores, numbers = combine_val("mean_prob", ["a", "b"], val_pe, y, 2)
    assert stack is None and numbers == {"mean_prob": {"w_a": 0.5, "w_b": 0.5}}
    np.testing.assert_allclose(scores, [0.8, 0.3, 0.7, 0.2])
    val_s, gen_s = with_generated("mean_prob", None, val_pe, scores, gen_pe)
    assert val_s is scores and np.allclose(gen_s, [0.9, 0.1])
    _, rank_val, _ = combine_val("rank", ["a", "b"], val_pe, y, 2)
    joint_val, joint_gen = with_generated("rank", None, val_pe, rank_val, gen_pe)
    # ranked over val and generated together (6 images: ranks / 5), not val alone (ranks / 3)
    np.testing.assert_allclose(joint_val, [0.7, 0.4, 0.7, 0.2])
    np.testing.assert_allclose(joint_gen, [1.0, 0.0])
    np.testing.assert_allclose(rank_val, [5 / 6, 1 / 3, 5 / 6, 0.0])
    stack, oof, numbers = combine_val("stack", ["a", "b"], val_pe, y, 2)
    assert set(numbers["stack"]) == {"intercept", "coef_a", "coef_b"} and len(stack["coef"]) == 2
    assert oof.shape == (4,) and not np.allclose(oof, combine_scores(val_pe, "stack", stack))  # out-of-fold


def test_parse_view_accepts_combinations_and_rejects_nonsense():
    v = parse_view("hflip+scale1.25")
    assert (v.geo, v.scale, v.size(32)) == ("hflip", 1.25, 40)
    assert parse_view("rot270").geo == "rot270" and parse_view("scale0.875").geo == "identity"
    for bad in ("rot45", "scale9", "hflip+vflip", "scale0.5+scale2", ""):
        with pytest.raises(ValueError, match="TTA view"):
            parse_view(bad)


# ----------------------------------------------------------------------------- stacking
def test_stacking_is_logistic_regression_on_logits_with_out_of_fold_scores():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    pe = np.clip(np.stack([0.5 + 0.3 * (y - 0.5) + 0.2 * rng.standard_normal(80),
                           0.5 + 0.05 * rng.standard_normal(80)]), 0.01, 0.99)
    weights, oof = fit_stacking(pe, y, folds=5)
    logits = np.log(pe / (1 - pe)).T
    ref = LogisticRegression().fit(logits, y)
    np.testing.assert_allclose(weights["coef"], ref.coef_[0], rtol=1e-6)
    np.testing.assert_allclose(combine_scores(pe, "stack", weights), ref.predict_proba(logits)[:, 1], atol=1e-9)
    assert abs(weights["coef"][0]) > abs(weights["coef"][1])  # the informative expert weighs more
    assert oof.shape == (80,) and np.abs(oof - ref.predict_proba(logits)[:, 1]).max() > 1e-4  # not in-sample
    with pytest.raises(ValueError, match="fitted"):
        combine_scores(pe, "stack")
    with pytest.raises(ValueError, match="2 validation images of each class"):
        fit_stacking(pe[:, :3], np.array([0, 0, 1]))


# ----------------------------------------------------------------------------- decoding files
def test_score_files_matches_stage1_pixels_and_reports_bad_files(checkpoint, rng, tmp_path):
    from conftest import photo_like, write_jpeg

    from dfpipe.data.images import decode_image

    ens = _cpu_ensemble(checkpoint, ["identity", "hflip"])
    paths = []
    for i, (h, w) in enumerate([(70, 90), (40, 30), (120, 60)]):
        write_jpeg(tmp_path / f"{i}.jpg", photo_like(rng, h, w))
        paths.append(tmp_path / f"{i}.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    paths.insert(1, tmp_path / "bad.jpg")
    scores, errors = ens.score_files(paths, batch_size=2, workers=0)
    assert np.isnan(scores[1]) and len(errors) == 1 and errors[0][0] == str(paths[1]) and errors[0][1]
    want = ens.score_images([decode_image(p) for p in paths if p.name != "bad.jpg"])
    np.testing.assert_allclose(scores[[0, 2, 3]], want, atol=1e-6)


# ----------------------------------------------------------------------------- stage 5 on a tiny made-up pool
def _fake_stage_outputs(t, rng):
    """Stage 1-4 outputs in miniature: a store (val + test, one test image undecodable), generated
    images, splits with clusters, and two random-weight experts of different sizes and input policies."""
    from conftest import photo_like

    prep, aug = t / "prepared", t / "aug"
    prep.mkdir()
    aug.mkdir()
    val_imgs = [photo_like(rng, 48, 40 + i) for i in range(16)]  # native sizes differ
    test_imgs = [photo_like(rng, 44 + i, 48) for i in range(5)]
    write_png_shard(prep / "val-000000.bin", val_imgs)
    write_png_shard(prep / "test-000000.bin", test_imgs)
    write_store_record(prep, Stage1())
    rows = [dict(uid=f"val/v{i:02d}.jpg", img_name=f"v{i:02d}.jpg", split="val", label=i % 2,
                 cache_file="val-000000.bin", cache_index=i, error="") for i in range(16)]
    rows += [dict(uid=f"test/t{i}.jpg", img_name=f"t{i}.jpg", split="test", label=-1, cache_file="test-000000.bin",
                  cache_index=i, error="") for i in range(5)]
    rows.append(dict(uid="test/broken.jpg", img_name="broken.jpg", split="test", label=-1, cache_file="",
                     cache_index=-1, error="corrupt or truncated image: x"))
    man = pd.DataFrame(rows).assign(path="", orig_w=48, orig_h=48)
    man.to_csv(prep / "manifest.csv", index=False)
    write_png_shard(aug / "aug-000000.bin", [photo_like(rng, 48, 48) for _ in range(6)])
    methods = ["self_blend", "splice"] * 3
    pd.DataFrame({"uid": [f"aug/{m}_{i}.png" for i, m in enumerate(methods)],
                  "img_name": [f"{m}_{i}.png" for i, m in enumerate(methods)], "label": 1,
                  "source_uid": [f"val/v{2 * i:02d}.jpg" for i in range(6)], "method": methods,
                  "cache_file": "aug-000000.bin", "cache_index": range(6)}).to_csv(aug / "manifest.csv", index=False)
    splits = pd.DataFrame({"uid": [r["uid"] for r in rows[:16]] + [f"aug/{m}_{i}.png" for i, m in enumerate(methods)],
                           "origin": ["val"] * 16 + ["aug"] * 6, "subset": "val", "fold": 0,
                           "cluster": [0] * 10 + [1] * 6 + [0] * 6})
    splits.loc[12:15, "cluster"] = 1
    splits.to_csv(t / "splits.csv", index=False)
    for name, size, mode in (("a", 32, "resize"), ("b", 24, "crop")):  # two sizes, two input policies
        torch.manual_seed(size)
        cfg = ExpertConfig(pretrained="none", img_size=size, input_mode=mode)
        save_expert_checkpoint(t / "models" / name / "best.pt", build_expert(cfg).eval(), cfg, name=name)
    return prep, aug, test_imgs


TEST_LABELS = [0, 1, 0, 1, 0]  # of t0.jpg .. t4.jpg (the "released" labels of the test set)


@pytest.mark.parametrize("labels", ["missing", "none", "present"])
def test_run_predict_writes_submission_reports_and_a_card_the_cli_can_reload(tmp_path, rng, labels, monkeypatch):
    """``labels``: the data root has no test label file at ``paths.test_labels`` (a challenge's test set before
    its labels are out: a submission, no test metrics, no error), ``paths.test_labels`` is "" (none), or the file
    is there (test metrics, on the decodable test images it names)."""
    import json

    from sklearn.metrics import roc_auc_score

    from conftest import layout_in
    from dfpipe.config import PredictConfig
    from dfpipe.ensemble_predict import run as run_predict

    prep, aug, test_imgs = _fake_stage_outputs(tmp_path, rng)
    out, raw = tmp_path / "out", tmp_path / "raw"
    raw.mkdir()
    if labels == "present":  # the broken image is left out: its row is the fallback score, never a metric
        pd.DataFrame({"img_name": [f"t{i}.jpg" for i in range(5)], "target": TEST_LABELS}).to_csv(
            raw / "testset_label_private.txt", index=False)
    layout = layout_in(tmp_path, data_root=raw, prepared=prep, augmented=aug, splits=tmp_path / "splits.csv",
                       models=tmp_path / "models", submission=out / "prediction.txt", metrics=out / "metrics.json",
                       roc=out / "roc.csv", roc_png=out / "roc.png", failures=out / "failures.csv",
                       card=out / "ensemble.json", **({"test_labels": ""} if labels == "none" else {}))
    assert Path(layout.data("test_labels")).is_file() == (labels == "present")
    cfg = PredictConfig(experts=["a", "b"], tta=["identity", "rot180"], combine="stack", stack_folds=3,
                        batch_size=8)
    stage5 = importlib.import_module("dfpipe.ensemble_predict.pipeline")
    drawn, plot_roc = [], stage5.plot_roc
    monkeypatch.setattr(stage5, "plot_roc", lambda path, sets: (drawn.append(sets), plot_roc(path, sets)))
    metrics = run_predict(cfg, layout)
    sub = pd.read_csv(out / "prediction.txt")
    assert sub.img_name.tolist() == ["broken.jpg"] + [f"t{i}.jpg" for i in range(5)]
    assert sub.y_pred.iloc[0] == 0.5 and sub.y_pred.between(0, 1).all()
    fails = pd.read_csv(out / "failures.csv")
    assert fails.img_name.tolist() == ["broken.jpg"] and "corrupt" in fails.error.iloc[0]
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["val"]["by_method"]) == {"original", "self_blend", "splice"}
    assert saved["val"]["by_cluster"]["cluster_1"]["n"] == 6 and "auc" in saved["val"]["by_cluster"]["cluster_0"]
    assert set(saved["combine"]["stack"]) == {"intercept", "coef_a", "coef_b"}
    assert {"ap", "log_loss", "accuracy"} <= set(saved["val"]["ensemble"]) and metrics["n_test_failed"] == 1
    assert (out / "roc.png").stat().st_size > 5000
    # the selection fold is never passed off as held-out: flagged in metrics.json, explained in the card
    assert saved["val"]["selection_biased"] == 1
    card_protocol = json.loads((out / "ensemble.json").read_text())["protocol"]
    assert "selection-biased" in card_protocol["val"] and "out-of-fold" in card_protocol["val"]
    if labels == "present":
        test = saved["test"]["ensemble"]
        assert test["n_pos"] == 2 and test["n_neg"] == 3 and "test" in card_protocol
        assert test["auc"] == pytest.approx(roc_auc_score(TEST_LABELS, sub.y_pred.iloc[1:]), abs=1e-6)
        assert metrics["test"] == saved["test"]
        # roc.png: the held-out test curves beside the val ones, on the images the test metrics count
        (val_set, test_set), = drawn
        assert (val_set.name, test_set.name) == ("val", "test") and test_set.labels.tolist() == TEST_LABELS
        assert test_set.n_neg == 3 and list(test_set.scores) == ["ensemble", "a", "b"]
        np.testing.assert_allclose(test_set.scores["ensemble"], sub.y_pred.iloc[1:], atol=1e-6)
    else:
        assert [[s.name for s in sets] for sets in drawn] == [["val"]]
        assert "test" not in card_protocol and "test" not in saved and "test" not in metrics  # no test labels

    def numbers(d):  # dvc metrics: nested dicts of numbers only
        return all(numbers(v) if isinstance(v, dict) else isinstance(v, (int, float)) for v in d.values())
    assert numbers(saved)

    ens = Ensemble.from_card(out / "ensemble.json", tmp_path / "models", torch.device("cpu"))
    assert ens.combine == "stack" and ens.stack["coef"] == [saved["combine"]["stack"]["coef_a"],
                                                            saved["combine"]["stack"]["coef_b"]]
    np.testing.assert_allclose(ens.score_images(test_imgs), sub.y_pred.iloc[1:], atol=2e-6)
    assert ens.verdict(1.0) == "likely fake" and ens.verdict(-1.0) == "likely real"
    # a retrained expert no longer matches the card
    torch.save({**torch.load(tmp_path / "models" / "b" / "best.pt", weights_only=True), "metrics": {"x": 1.0}},
               tmp_path / "models" / "b" / "best.pt")
    with pytest.raises(ValueError, match="rerun stage 5"):
        Ensemble.from_card(out / "ensemble.json", tmp_path / "models", torch.device("cpu"))


def test_fold_batchnorm_keeps_the_scores(rng):
    from dfpipe.ensemble_predict import fold_batchnorm

    torch.manual_seed(0)
    model = build_expert(ExpertConfig(pretrained="none", img_size=32)).eval()
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)["logits"]
        assert fold_batchnorm(model) > 10
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        torch.testing.assert_close(model(x)["logits"], want, atol=1e-4, rtol=1e-4)


def test_auto_scoring_workers_leave_two_cores_to_the_model(monkeypatch):
    from dfpipe.ensemble_predict.ensemble import scoring_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert scoring_workers(-1, cpu) == 0 and scoring_workers(-1, cuda) == 1 and scoring_workers(3, cpu) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert scoring_workers(-1, cpu) == 8 and scoring_workers(-1, cuda) == 8


def test_score_files_reports_progress_per_batch(tmp_path, rng):
    """Issue 25: `scan`'s bar moved once per 512 images; score_files now says how many files each batch settled."""
    from conftest import photo_like, write_jpeg
    from test_serve_api import make_card

    from dfpipe.ensemble_predict import Ensemble

    models, card = make_card(tmp_path / "c", tta=("identity",))
    ens = Ensemble.from_card(card, models, torch.device("cpu"))
    paths = []
    for i in range(7):
        write_jpeg(tmp_path / f"{i}.jpg", photo_like(rng, 40, 48))
        paths.append(tmp_path / f"{i}.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    calls = []
    scores, errors = ens.score_files([*paths, tmp_path / "bad.jpg"], batch_size=3, workers=0, progress=calls.append)
    assert sum(calls) == 8 and len(calls) == 3 and max(calls) <= 3 and len(errors) == 1


def roc_sets(rng):
    """A val set (34 reals) and a test set (300 reals), each scored by the ensemble and one expert."""
    from dfpipe.ensemble_predict.roc_plot import RocSet

    out = []
    for name, n_neg, n_pos in (("val", 34, 20), ("test", 300, 100)):
        y = np.r_[np.zeros(n_neg, int), np.ones(n_pos, int)]
        scores = {k: 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 1.5 * y))) for k in ("ensemble", "a")}
        out.append(RocSet(name, "selection-biased" if name == "val" else "held out", y, scores))
    return out


def test_roc_figure_has_val_and_test_curves_the_diagonal_and_the_reals_behind_tpr_at_fpr(rng):
    """Before: the val curves only, no diagonal, no word on how many reals a TPR@FPR rests on."""
    from dfpipe.ensemble_predict.roc_plot import roc_figure
    from dfpipe.metrics import tpr_at_fpr

    val, test = roc_sets(rng)
    fig = roc_figure([val, test])
    lin, log = fig.axes
    curves = [ln for ln in lin.get_lines() if ln.get_label().startswith(("ensemble", "a,"))]
    assert [ln.get_label().split(":")[0] for ln in curves] == ["ensemble, val", "a, val", "ensemble, test", "a, test"]
    assert [ln.get_linestyle() for ln in curves] == ["-", "-", "--", "--"]
    diagonal = [ln for ln in lin.get_lines() if ln.get_label() == "chance (AUC 0.5)"]
    assert len(diagonal) == 1 and np.array_equal(diagonal[0].get_xydata(), [[0, 0], [1, 1]])
    assert len(log.get_lines()) == len(lin.get_lines()) + 2  # + the FPR 1e-2 / 1e-3 marks
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(legend) == 4 and "over 34 reals" in legend[0] and "over 300 reals" in legend[2]
    assert f"TPR@1e-2 {tpr_at_fpr(test.labels, test.scores['ensemble'], 1e-2):.2f}" in legend[2]
    assert "over" not in legend[1]  # the experts' entries stay short
    assert "held out" in fig.get_suptitle() and "selection-biased" in fig.get_suptitle()


def test_roc_png_is_written_atomically_deterministically_and_readable_by_others(tmp_path, monkeypatch, rng):
    """A plot that fails half-way leaves the previous roc.png whole (no partial file under the real name, no temp
    file); a written one has the mode a plain open gives (0644 under umask 022, not mkstemp's 0600), no date or
    version in it, and the same bytes from the same scores."""
    import os

    import matplotlib.figure

    from dfpipe.ensemble_predict.roc_plot import plot_roc

    sets = roc_sets(rng)
    png = tmp_path / "reports" / "roc.png"
    old = os.umask(0o022)
    try:
        plot_roc(png, sets)
    finally:
        os.umask(old)
    first = png.read_bytes()
    assert first.startswith(b"\x89PNG") and png.stat().st_mode & 0o777 == 0o644
    assert b"Software" not in first and b"atplotlib" not in first
    plot_roc(tmp_path / "again.png", sets)
    assert (tmp_path / "again.png").read_bytes() == first
    (tmp_path / "again.png").unlink()
    real = matplotlib.figure.Figure.savefig

    def dies_half_way(self, fname, *args, **kwargs):
        real(self, fname, *args, **kwargs)
        with open(fname, "r+b") as fh:
            fh.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        plot_roc(png, sets[:1])
    assert png.read_bytes() == first and sorted(p.name for p in png.parent.iterdir()) == ["roc.png"]
