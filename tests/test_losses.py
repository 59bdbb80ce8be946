"""Losses against values worked out by hand with plain ``math`` on tiny examples."""

import math

import pytest
import torch

import dfpipe.losses as losses_mod
from dfpipe.config import LossWeights
from dfpipe.losses import JointLoss, ce_loss, kl_consistency, supcon_infonce


def _softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _unit(v):
    n = math.sqrt(_dot(v, v))
    return [x / n for x in v]


def _supcon_reference(feats, labels, t, queue=(), queue_labels=()):
    """SupCon L_out written as loops over Python lists."""
    u = [_unit(f) for f in feats]
    keys = u + [_unit(q) for q in queue]
    key_labels = list(labels) + list(queue_labels)
    per_anchor = []
    for i, ui in enumerate(u):
        cands = [a for a in range(len(keys)) if a != i]
        denom = sum(math.exp(_dot(ui, keys[a]) / t) for a in cands)
        pos = [a for a in cands if key_labels[a] == labels[i]]
        if pos:
            per_anchor.append(-sum(math.log(math.exp(_dot(ui, keys[p]) / t) / denom) for p in pos) / len(pos))
    return sum(per_anchor) / len(per_anchor)


# ----------------------------------------------------------------------------- cross-entropy
def test_ce_plain_matches_hand_value():
    logits = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    labels = [0, 1, 1]
    expected = sum(-math.log(_softmax(z)[y]) for z, y in zip(logits, labels)) / 3
    got = ce_loss(torch.tensor(logits), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ce_with_smoothing_and_class_weights_matches_documented_formula():
    logits = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    labels = [0, 1, 1]
    eps, w, k = 0.2, [1.0, 3.0], 2
    num = 0.0
    for z, y in zip(logits, labels):
        p = _softmax(z)
        num += (1 - eps) * w[y] * -math.log(p[y]) + eps / k * sum(w[c] * -math.log(p[c]) for c in range(k))
    expected = num / sum(w[y] for y in labels)  # = num / 7
    got = ce_loss(torch.tensor(logits), torch.tensor(labels), label_smoothing=eps, class_weights=w)
    assert got.item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- KL
def test_kl_matches_hand_value_and_scales_with_t_squared():
    student = [[1.0, 2.0], [0.0, 0.0]]
    teacher = [[3.0, 0.0], [1.0, -1.0]]
    t = 2.0
    total = 0.0
    for s, te in zip(student, teacher):
        ps, pt = _softmax(s, t), _softmax(te, t)
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    expected = total / 2 * t * t
    got = kl_consistency(torch.tensor(student), torch.tensor(teacher), temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    same = kl_consistency(torch.tensor(teacher), torch.tensor(teacher), temperature=t)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_kl_gradient_reaches_student_only():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[3.0, 0.0], [1.0, -1.0]], requires_grad=True)
    kl_consistency(student, teacher, 2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # the EMA teacher is detached


# ----------------------------------------------------------------------------- InfoNCE
def test_supcon_three_samples_by_hand():
    # u0 = (1, 0), u1 = (0.6, 0.8), u2 = (0, -1); anchors 0 and 1 are each other's only positive,
    # anchor 2 (the only label-1 sample) has no positive and is left out of the mean.
    feats, labels, t = [[1.0, 0.0], [3.0, 4.0], [0.0, -1.0]], [0, 0, 1], 0.5
    l0 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(0.0 / t)))
    l1 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(-0.8 / t)))
    got = supcon_infonce(torch.tensor(feats), torch.tensor(labels), temperature=t)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert got.item() == pytest.approx(_supcon_reference(feats, labels, t), rel=1e-6)


def test_supcon_several_positives_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 3, generator=g)
    labels = [0, 0, 0, 1, 1, 2]  # anchor 5 has no positive; anchors 0-2 have two
    expected = _supcon_reference(feats.tolist(), labels, 0.3)
    got = supcon_infonce(feats, torch.tensor(labels), temperature=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_supcon_queue_adds_positives_and_negatives_without_grad():
    feats = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, -1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    queue = torch.tensor([[1.0, -1.0], [-2.0, 1.0]], requires_grad=True)
    queue_labels = torch.tensor([1, 0])
    expected = _supcon_reference(feats.tolist(), [0, 0, 1], 0.5, queue.tolist(), [1, 0])
    got = supcon_infonce(feats, labels, 0.5, queue_feats=queue, queue_labels=queue_labels)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    got.backward()
    assert feats.grad.abs().sum() > 0 and queue.grad is None


def test_supcon_without_positives_is_zero_with_grad():
    feats = torch.randn(4, 8, requires_grad=True)
    loss = supcon_infonce(feats, torch.tensor([0, 1, 2, 3]), temperature=0.1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_supcon_gradient_pulls_positives_together():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    opt = torch.optim.SGD([feats], lr=0.1)
    before = torch.cosine_similarity(feats[0], feats[1], dim=0).item()
    for _ in range(5):
        opt.zero_grad()
        supcon_infonce(feats, labels, 0.5).backward()
        opt.step()
    assert torch.cosine_similarity(feats[0], feats[1], dim=0).item() > before


# ----------------------------------------------------------------------------- joint loss
def _batch():
    g = torch.Generator().manual_seed(0)
    out = {"logits": torch.randn(4, 2, generator=g, requires_grad=True),
           "feat": torch.randn(4, 5, generator=g, requires_grad=True)}
    return out, torch.tensor([0, 1, 1, 0]), torch.randn(4, 2, generator=g)


def test_joint_loss_is_the_weighted_sum_and_gradients_flow():
    out, labels, teacher = _batch()
    fn = JointLoss(LossWeights(ce=1.0, kl=0.5, nce=0.1), label_smoothing=0.1, temperature=0.2, kl_temperature=2.0,
                   class_weights=[1.0, 2.0])
    res = fn(out, labels, teacher_logits=teacher)
    assert set(res) == {"total", "ce", "kl", "nce"}
    ce = ce_loss(out["logits"], labels, 0.1, [1.0, 2.0])
    kl = kl_consistency(out["logits"], teacher, 2.0)
    nce = supcon_infonce(out["feat"], labels, 0.2)
    for k, v in {"ce": ce, "kl": kl, "nce": nce}.items():
        assert res[k].item() == pytest.approx(v.item(), rel=1e-6) and v.item() > 0
    assert res["total"].item() == pytest.approx(ce.item() + 0.5 * kl.item() + 0.1 * nce.item(), rel=1e-6)
    assert res["total"].requires_grad and not any(res[k].requires_grad for k in ("ce", "kl", "nce"))
    res["total"].backward()
    assert out["logits"].grad.abs().sum() > 0 and out["feat"].grad.abs().sum() > 0


def test_joint_loss_skips_zero_weight_terms(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a zero-weight term was computed")

    monkeypatch.setattr(losses_mod, "supcon_infonce", boom)
    monkeypatch.setattr(losses_mod, "kl_consistency", boom)
    out, labels, teacher = _batch()
    res = JointLoss(LossWeights(ce=1.0, kl=0.0, nce=0.0))(out, labels, teacher_logits=teacher)
    assert res["kl"].item() == 0.0 and res["nce"].item() == 0.0
    assert res["total"].item() == pytest.approx(res["ce"].item()) and res["ce"].item() > 0
    res["total"].backward()
    assert out["feat"].grad is None  # the NCE term never touched the features


def test_joint_loss_kl_is_zero_without_teacher():
    out, labels, _ = _batch()
    res = JointLoss(LossWeights(ce=0.0, kl=1.0, nce=0.0))(out, labels)
    assert res["kl"].item() == 0.0 and res["total"].item() == 0.0
    res["total"].backward()  # still a valid graph


def test_joint_loss_class_weights_follow_the_module_device():
    fn = JointLoss(LossWeights(), class_weights=[1.0, 3.0]).to(torch.float64)
    assert fn.class_weights.dtype == torch.float64 and "class_weights" not in fn.state_dict()


def test_joint_loss_rejects_bad_weights():
    with pytest.raises(ValueError, match="all loss weights are 0"):
        JointLoss(LossWeights(ce=0.0, kl=0.0, nce=0.0))
    with pytest.raises(ValueError, match=">= 0"):
        JointLoss(LossWeights(ce=1.0, kl=-0.1, nce=0.0))


def test_joint_loss_nce_runs_on_the_gathered_batch_and_ce_on_the_local_one():
    """Under DDP ``gather`` concatenates every rank's batch: NCE sees all of them, CE only this rank's."""
    out, labels, _ = _batch()
    g = torch.Generator().manual_seed(1)
    other_feats, other_labels = torch.randn(4, 5, generator=g), torch.tensor([1, 0, 0, 1])  # "rank 1"

    def gather(t):
        return torch.cat([t, other_feats if t.is_floating_point() else other_labels])

    res = JointLoss(LossWeights(ce=1.0, kl=0.0, nce=1.0), temperature=0.2, gather=gather)(out, labels)
    want = supcon_infonce(torch.cat([out["feat"], other_feats]), torch.cat([labels, other_labels]), 0.2)
    assert res["nce"].item() == pytest.approx(want.item(), rel=1e-6)
    assert res["nce"].item() != pytest.approx(supcon_infonce(out["feat"], labels, 0.2).item(), rel=1e-3)
    assert res["ce"].item() == pytest.approx(ce_loss(out["logits"], labels).item(), rel=1e-6)
    res["total"].backward()
    assert out["feat"].grad.abs().sum() > 0
