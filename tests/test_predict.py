import numpy as np
import pandas as pd
import pytest
import torch

from dfpipe.config import ExpertConfig
from dfpipe.models import build_expert
from dfpipe.predict import Ensemble, build_submission, check_submission, combine_scores, load_expert
from dfpipe.train.loop import save_checkpoint


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
    model = build_expert(ExpertConfig(pretrained="none", img_size=32)).eval()
    desc = {**model.describe(), "cache_size": 48}
    path = tmp_path / "m" / "best.pt"
    save_checkpoint(path, model, desc, ExpertConfig(img_size=32), "m", {"auc": 0.5})
    return path, model


def test_load_expert_restores_the_weights(checkpoint):
    path, model = checkpoint
    loaded = load_expert(path, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)["prob"], model(x)["prob"])
    assert loaded.description["cache_size"] == 48


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
        Ensemble([e], ["rot90"], "mean_prob", torch.device("cpu"))
    with pytest.raises(ValueError, match="combine"):
        Ensemble([e], ["identity"], "vote", torch.device("cpu"))
