import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score
from sklearn.metrics import log_loss as sk_log_loss

from dfpipe.metrics import (MetricError, accuracy, average_precision, choose_thresholds, eer, log_loss, roc_auc,
                            summary, tpr_at_fpr, verdict)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 1)  # rounding makes many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_tpr_at_fpr_hand_case():
    # negatives 0.1..0.4, positives 0.35, 0.5, 0.6, 0.9
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.5, 0.6, 0.9])
    # no false alarm allowed: threshold just above 0.4 catches 3 of 4 fakes
    assert tpr_at_fpr(y, s, 1e-3) == 0.75
    # one false alarm of four (FPR 0.25) allows threshold 0.35: all four caught
    assert tpr_at_fpr(y, s, 0.25) == 1.0


def test_tpr_at_fpr_ties_move_together():
    # a positive tied with the top negative cannot be separated from it
    y = np.array([0, 1, 1])
    s = np.array([0.9, 0.9, 0.5])
    assert tpr_at_fpr(y, s, 1e-3) == 0.0


def test_eer_perfect_and_symmetric():
    y = np.array([0, 0, 1, 1])
    assert eer(y, np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    # fully inverted scores: every threshold errs -> EER 1
    assert eer(y, np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    # one swap out of two per class: EER 0.5
    assert eer(y, np.array([0.1, 0.6, 0.5, 0.9])) == pytest.approx(0.5)


def test_single_class_is_a_clear_error():
    with pytest.raises(MetricError, match="both classes"):
        summary(np.ones(4), np.random.rand(4))


def test_length_mismatch_and_nan():
    with pytest.raises(MetricError, match="labels but"):
        roc_auc([0, 1], [0.5])
    with pytest.raises(MetricError, match="NaN"):
        roc_auc([0, 1], [0.5, float("nan")])


def _tied_scores(n=400, seed=2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(np.round(rng.random(n) * 0.8 + 0.3 * y, 1), 0, 1)  # many ties, exact 0s and 1s


def test_ap_log_loss_accuracy_match_sklearn_with_ties():
    y, s = _tied_scores()
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))
    clipped = np.clip(s, 1e-7, 1 - 1e-7)  # scores of exactly 0/1 would make log loss infinite
    assert log_loss(y, s) == pytest.approx(sk_log_loss(y, clipped))
    for t in (0.3, 0.5, 0.7):  # ties at the threshold count as fake (score >= t)
        assert accuracy(y, s, t) == pytest.approx(accuracy_score(y, (s >= t).astype(int)))
    out = summary(y, s, threshold=0.7)
    assert out["threshold"] == 0.7 and out["accuracy"] == accuracy(y, s, 0.7)
    assert all(isinstance(v, (int, float)) for v in out.values())  # flat numbers for dvc metrics


def test_hand_values_of_ap_log_loss_accuracy():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.2, 0.8, 0.6, 0.4])
    # ranked: 0.8 (fake) 0.6 (real) 0.4 (fake) 0.2 -> precision 1 at recall .5, 2/3 at recall 1
    assert average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert log_loss(y, s) == pytest.approx(-(2 * np.log(0.8) + 2 * np.log(0.4)) / 4)
    assert accuracy(y, s, 0.5) == 0.5 and accuracy(y, s, 0.7) == 0.75


@pytest.mark.parametrize("fn", [average_precision, log_loss, accuracy, choose_thresholds])
def test_every_metric_refuses_one_class(fn):
    with pytest.raises(MetricError, match="both classes"):
        fn(np.zeros(5), np.linspace(0, 1, 5))


def test_tpr_at_1e3_with_few_negatives_means_no_false_alarm_at_all():
    # 20 reals: the smallest non-zero FPR is 0.05 >> 1e-3, so TPR@1e-3 = fakes above EVERY real,
    # and TPR@1e-2 is the same number (documented in the module docstring; n_neg is reported beside it)
    rng = np.random.default_rng(3)
    neg, pos = rng.random(20) * 0.6, 0.3 + rng.random(50) * 0.7
    y, s = np.r_[np.zeros(20), np.ones(50)], np.r_[neg, pos]
    expected = float(np.mean(pos > neg.max()))
    assert 0 < expected < 1
    assert tpr_at_fpr(y, s, 1e-3) == pytest.approx(expected)
    assert tpr_at_fpr(y, s, 1e-2) == pytest.approx(expected)
    assert summary(y, s)["n_neg"] == 20


def test_thresholds_and_verdicts():
    # reals 0.0..0.45, fakes 0.3..0.95: overlap between 0.3 and 0.45
    y = np.r_[np.zeros(10), np.ones(14)]
    s = np.r_[np.linspace(0, 0.45, 10), np.linspace(0.3, 0.95, 14)]
    t = choose_thresholds(y, s, max_fpr=0.01, max_fnr=0.01)
    assert t["t_fake"] == pytest.approx(s[10:][s[10:] > 0.45].min())  # lowest fake above every real
    assert t["t_real"] == pytest.approx(0.3)  # highest threshold still flagging every fake
    assert t["t_real"] <= t["t_decision"] <= t["t_fake"]
    assert verdict(0.99, t) == "likely fake" and verdict(0.1, t) == "likely real"
    assert verdict(0.4, t) == "uncertain"
    # separable: no uncertain band, the bands meet
    t2 = choose_thresholds(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.7, 0.9]))
    assert t2["t_real"] == t2["t_fake"] == 0.7 and verdict(0.5, t2) == "likely real"
