import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dfpipe.metrics import MetricError, eer, roc_auc, summary, tpr_at_fpr


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
