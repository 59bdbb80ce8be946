"""The local / global information losses of Ba et al. 2024 and mixup (dfpipe.models.info, dfpipe.losses):
hand values and the properties the terms rest on, which heads each term trains, the expert's checkpoint
round trip and fp32 heads, a few training steps that learn, and the loop (mixup applied, resume exact).
The two-process DDP check of the gathered LIL is in test_train_ddp.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import save_expert_checkpoint
from dfpipe.config import ConfigError, ExpertConfig, LossWeights
from dfpipe.losses import (JointLoss, ce_loss, global_information_loss, info_divergence, local_information_loss,
                           mixup)
from dfpipe.models import EXPERTS, build_expert, expert_from_description
from dfpipe.ensemble_predict.experts import load_expert
from dfpipe.train_experts import loop
from test_train import _cfg, _load, _run, _write_pool, kill_at_epoch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 32


def _softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _info_expert(n: int = 3, arch: str = "timm", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_expert(ExpertConfig(pretrained="none", img_size=SIZE, info_heads=n, arch=arch, **kw))


# ----------------------------------------------------------------------------- the divergences
def test_divergences_match_hand_values():
    p, q, t = [1.0, -0.5], [0.2, 0.3], 1.5
    ps, qs = _softmax(p, t), _softmax(q, t)
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(ps, qs))
    got_kl = info_divergence(torch.tensor([p]), torch.tensor([q]), t, "kl")
    got_w = info_divergence(torch.tensor([p]), torch.tensor([q]), t, "wasserstein")
    assert got_kl.shape == (1,) and got_kl.item() == pytest.approx(kl, rel=1e-6)
    assert got_w.item() == pytest.approx(abs(ps[1] - qs[1]), rel=1e-6)  # two classes: |p_fake - q_fake|
    with pytest.raises(ConfigError, match="info_mi"):
        info_divergence(torch.tensor([p]), torch.tensor([q]), t, "js")


@pytest.mark.parametrize("kind", ["kl", "wasserstein"])
def test_divergence_is_zero_for_equal_distributions_and_grows_as_they_part(kind):
    p = torch.tensor([[0.3, -0.2], [2.0, 1.0], [-1.0, 0.5]])
    assert torch.equal(info_divergence(p, p.clone(), 1.5, kind), torch.zeros(3))
    same = info_divergence(p, p + 7.0, 1.5, kind)  # the same softmax, up to rounding: the same distribution
    torch.testing.assert_close(same, torch.zeros(3), atol=1e-6, rtol=0)
    shift = torch.tensor([1.0, -1.0])  # moves q's mass towards class 0, further each step
    values = torch.stack([info_divergence(p, p + s * shift, 1.5, kind) for s in (0.5, 1.0, 2.0, 4.0)])  # (4, 3)
    assert (values > 0).all() and (values.diff(dim=0) > 0).all()


# ----------------------------------------------------------------------------- LIL and GIL
@pytest.mark.parametrize("kind", ["kl", "wasserstein"])
def test_lil_is_one_for_redundant_local_features_and_falls_as_they_differ(kind):
    g = torch.Generator().manual_seed(0)
    joint = torch.randn(5, 2, generator=g)
    noise = torch.randn(5, 3, 2, generator=g)
    redundant = joint.unsqueeze(1).repeat(1, 3, 1)  # every leave-one-out head predicts as the joint one
    assert local_information_loss(joint, redundant, 1.5, kind).item() == 1.0
    lils = [local_information_loss(joint, redundant + s * noise, 1.5, kind).item() for s in (0.5, 1.0, 2.0)]
    assert 1.0 > lils[0] > lils[1] > lils[2] > 0.0
    loo = redundant + noise
    want = math.exp(-sum(info_divergence(joint, loo[:, i], 1.5, kind) for i in range(3)).mean().item())
    assert local_information_loss(joint, loo, 1.5, kind).item() == pytest.approx(want, rel=1e-6)


def test_lil_and_gil_gradients_reach_the_heads_compared_not_the_target():
    g = torch.Generator().manual_seed(1)
    joint = torch.randn(4, 2, generator=g, requires_grad=True)
    loo = torch.randn(4, 2, 2, generator=g, requires_grad=True)
    logits = torch.randn(4, 2, generator=g, requires_grad=True)
    (local_information_loss(joint, loo, 1.5) + global_information_loss(joint, logits, 1.5)).backward()
    assert joint.grad is None  # q(y|f) is a target in both terms
    assert loo.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0


def test_gil_is_zero_when_z_predicts_as_f_and_matches_hand_value():
    joint = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert global_information_loss(joint, joint.clone(), 1.5).item() == 0.0
    logits = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    kls = [sum(a * (math.log(a) - math.log(b)) for a, b in zip(_softmax(p, 1.5), _softmax(q, 1.5)))
           for p, q in zip(joint.tolist(), logits.tolist())]
    assert global_information_loss(joint, logits, 1.5).item() == pytest.approx(sum(kls) / 2, rel=1e-6)


def test_lil_takes_the_batch_mean_over_the_gathered_ranks():
    """exp of the global mean, not a mean of per-rank exps: the gather (DDP) concatenates the other ranks."""
    g = torch.Generator().manual_seed(2)
    joint, loo = torch.randn(8, 2, generator=g), torch.randn(8, 2, 2, generator=g)
    others = info_divergence(joint[4:].unsqueeze(1).expand_as(loo[4:]), loo[4:], 1.5).sum(1)  # "rank 1"'s (4,)
    ranked = local_information_loss(joint[:4], loo[:4], 1.5, gather=lambda t: torch.cat([t, others]))
    assert ranked.item() == pytest.approx(local_information_loss(joint, loo, 1.5).item(), rel=1e-6)
    alone = local_information_loss(joint[:4], loo[:4], 1.5)
    assert alone.item() != pytest.approx(ranked.item(), rel=1e-3)


# ----------------------------------------------------------------------------- mixup
def test_mixup_mixes_inputs_and_labels_with_one_drawn_weight():
    x = torch.arange(6 * 3, dtype=torch.float32).reshape(6, 3)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    xm, yb, lam = mixup(x, y, 0.5, np.random.default_rng(7))
    ref = np.random.default_rng(7)  # the same draws, in the documented order: lam, then the permutation
    lam_ref = ref.beta(0.5, 0.5)
    perm = torch.from_numpy(ref.permutation(6))
    assert lam == lam_ref and 0.0 < lam < 1.0
    assert torch.equal(yb, y[perm]) and not torch.equal(perm, torch.arange(6))
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm])
    assert mixup(x, y, 0.5, np.random.default_rng(8))[2] != lam
    with pytest.raises(ConfigError, match="alpha"):
        mixup(x, y, 0.0, np.random.default_rng(0))


def test_mixed_cross_entropy_is_the_soft_target_cross_entropy():
    """lam CE(y_a) + (1 - lam) CE(y_b) = CE against the mixed one-hot target (no class weights): checked
    for the classifier's term and for the variational heads' term."""
    g = torch.Generator().manual_seed(3)
    logits, joint = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    loo = torch.randn(6, 2, 2, generator=g)
    ya, yb, lam = torch.tensor([0, 1, 1, 0, 1, 0]), torch.tensor([1, 1, 0, 0, 0, 1]), 0.3
    soft = lam * F.one_hot(ya, 2).float() + (1 - lam) * F.one_hot(yb, 2).float()
    out = {"logits": logits, "info_logits": joint, "info_loo_logits": loo}
    res = JointLoss(LossWeights(ce=1.0))(out, ya, mix=(yb, lam))
    assert res["ce"].item() == pytest.approx(F.cross_entropy(logits, soft).item(), rel=1e-6)
    want_info = F.cross_entropy(joint, soft) + (F.cross_entropy(loo[:, 0], soft) + F.cross_entropy(loo[:, 1], soft)) / 2
    assert res["info_ce"].item() == pytest.approx(want_info.item(), rel=1e-6)
    plain = JointLoss(LossWeights(ce=1.0))(out, ya)
    assert JointLoss(LossWeights(ce=1.0))(out, ya, mix=(yb, 1.0))["total"].item() == plain["total"].item()
    assert plain["ce"].item() == pytest.approx(ce_loss(logits, ya).item(), rel=1e-6)


# ----------------------------------------------------------------------------- the expert
@pytest.mark.parametrize("arch", EXPERTS.names())
def test_info_expert_outputs_in_training_and_only_the_fused_path_at_inference(arch):
    e = _info_expert(3, arch).train()
    assert e.info.dim == 1280 // 3 and e.head[1].in_features == e.info.dim
    out = e(torch.randn(4, 3, SIZE, SIZE))
    assert out["logits"].shape == (4, 2) and out["feat"].shape == (4, e.info.dim)
    assert out["info_logits"].shape == (4, 2) and out["info_loo_logits"].shape == (4, 3, 2)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert set(e.eval()(torch.randn(2, 3, SIZE, SIZE))) == {"logits", "prob", "feat"}
    if arch == "npr":  # the branches read the filtered input too: two images with a zero NPR residual score alike
        up = torch.nn.functional.interpolate(torch.randn(1, 3, SIZE // 2, SIZE // 2), scale_factor=2, mode="nearest")
        with torch.no_grad():
            torch.testing.assert_close(e(up)["logits"], e(torch.zeros(1, 3, SIZE, SIZE))["logits"])
    assert "info_heads" not in build_expert(ExpertConfig(pretrained="none", img_size=SIZE)).describe()
    with pytest.raises(ConfigError, match="info_heads"):
        _info_expert(1)


def _grads(e: torch.nn.Module, weights: LossWeights) -> dict[str, float]:
    e.zero_grad(set_to_none=True)
    out = e(torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    JointLoss(weights)(out, torch.tensor([0, 1, 0, 1, 1, 0]))["total"].backward()
    parts = {"stem": e.backbone.conv_stem, "local": e.info.local, "fuse": e.info.fuse, "joint": e.info.joint,
             "leave_out": e.info.leave_out, "head": e.head}
    return {k: sum(float(p.grad.abs().sum()) for p in m.parameters() if p.grad is not None) for k, m in parts.items()}


def test_each_term_trains_the_heads_it_should():
    e = _info_expert(3).train()
    ce = _grads(e, LossWeights(ce=1.0))  # CE + the variational heads' CE: everything
    assert all(v > 0 for v in ce.values()), ce
    lil = _grads(e, LossWeights(ce=0.0, lil=1.0))  # through the leave-one-out heads into the branches
    assert lil["leave_out"] > 0 and lil["local"] > 0 and lil["stem"] > 0
    assert lil["joint"] == lil["fuse"] == lil["head"] == 0.0  # the joint head is the target; z is not involved
    gil = _grads(e, LossWeights(ce=0.0, gil=1.0))  # through the fused z and the classifier
    assert gil["head"] > 0 and gil["fuse"] > 0 and gil["local"] > 0
    assert gil["joint"] == gil["leave_out"] == 0.0


def test_lil_or_gil_without_branches_is_refused():
    out = build_expert(ExpertConfig(pretrained="none", img_size=SIZE)).train()(torch.randn(2, 3, SIZE, SIZE))
    with pytest.raises(ConfigError, match="info_heads"):
        JointLoss(LossWeights(ce=1.0, lil=1.0))(out, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="info_heads"):
        loop._loss_fn(ExpertConfig(loss=LossWeights(gil=1.0)), None, torch.device("cpu"))
    with pytest.raises(ConfigError, match="info_mi"):
        JointLoss(LossWeights(), info_mi="mine")


def test_info_heads_are_fp32_under_bf16_autocast(monkeypatch):
    """A bf16 feature map (what CUDA autocast gives) still yields fp32 logits from every head, the same
    numbers as from the fp32 map."""
    e = _info_expert(2).train()
    fmap = torch.rand(8, e.feat_dim, 2, 2).to(torch.bfloat16)
    monkeypatch.setattr(e, "feature_map", lambda x: fmap)
    x = torch.zeros(8, 3, SIZE, SIZE)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = e(x)
    torch.manual_seed(0)  # the same dropout masks
    monkeypatch.setattr(e, "feature_map", lambda x: fmap.float())
    ref = e(x)
    for k in ("logits", "prob", "feat", "info_logits", "info_loo_logits"):
        assert out[k].dtype == torch.float32, k
        torch.testing.assert_close(out[k], ref[k])


def test_checkpoint_round_trip_scores_identically(tmp_path):
    e = _info_expert(4)
    with torch.no_grad():  # non-default heads, so a fresh model could not match by chance
        for p in (*e.info.parameters(), *e.head.parameters()):
            p.normal_(0, 0.05)
    e.eval()
    desc = e.describe()
    assert desc["info_heads"] == 4
    save_expert_checkpoint(tmp_path / "best.pt", e, ExpertConfig(info_heads=4), name="x", metrics={"auc": 0.5})
    x = torch.randn(5, 3, SIZE, SIZE)
    rebuilt = expert_from_description(desc).eval()
    with torch.no_grad():
        before = rebuilt(x)["prob"]
        rebuilt.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True)["state_dict"])
        a, b = e(x), rebuilt(x)
        loaded = load_expert(tmp_path / "best.pt", torch.device("cpu"))  # BatchNorm folded, channels_last
        folded = loaded.model(x.to(memory_format=torch.channels_last))["prob"]
    assert not torch.allclose(before, a["prob"])
    for k in ("logits", "prob", "feat"):
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(folded, a["prob"], atol=1e-5, rtol=0)
    assert len(torch.unique(a["prob"])) == 5


def test_a_tiny_info_expert_learns_a_separable_batch():
    """CE + LIL + GIL on a fixed batch whose fakes carry a bright square: the total and the classifier's CE
    fall within 25 AdamW steps, every term stays finite, LIL stays in (0, 1]."""
    e = _info_expert(2, dropout=0.0).train()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(12) % 2
    x = torch.randn(12, 3, SIZE, SIZE, generator=g) * 0.3
    x[y == 1, :, 8:20, 8:20] += 2.0
    loss_fn = JointLoss(LossWeights(ce=1.0, lil=1.0, gil=1.0))
    opt = torch.optim.AdamW(e.parameters(), lr=1e-3)
    rows = []
    for _ in range(25):
        res = loss_fn(e(x), y)
        opt.zero_grad()
        res["total"].backward()
        opt.step()
        rows.append({k: float(v.detach()) for k, v in res.items()})
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert all(0.0 < r["lil"] <= 1.0 for r in rows)
    first, last = rows[0], np.mean([r["total"] for r in rows[-5:]])
    assert last < 0.7 * first["total"], rows
    assert np.mean([r["ce"] for r in rows[-5:]]) < 0.5 * first["ce"]


# ----------------------------------------------------------------------------- the training loop
@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("infopool")
    _write_pool(root)
    return root


def test_the_loop_trains_with_branches_and_mixup_and_resumes_exactly(pool, monkeypatch):
    """Every training batch is mixed (one draw per step), the epoch rows hold the information terms, and a
    run killed after epoch 1 resumes to the uninterrupted run's checkpoints, to the byte: the mixup draws
    are a function of (seed, epoch, rank)."""
    kw = dict(epochs=2, info_heads=2, mixup=0.5, ema_epochs=0.0, loss=LossWeights(ce=1.0, lil=1.0, gil=1.0))
    calls = []
    real_mixup = loop.mixup

    def counting(*args):
        calls.append(args[2])
        return real_mixup(*args)

    monkeypatch.setattr(loop, "mixup", counting)
    best_a, hist_a = _run(_cfg(pool, "models_a", **kw), pool, "a")
    assert len(calls) == 2 * 3 and set(calls) == {0.5}  # 24 images, batch 8: 3 steps an epoch
    for k in ("ce", "info_ce", "lil", "gil"):
        assert np.isfinite(hist_a[k]).all() and (hist_a[k] > 0).all(), k
    assert (hist_a.lil <= 1.0).all() and (hist_a.kl == 0).all()
    ckpt = _load(pool / "models_a" / "e" / "best.pt")
    assert ckpt["description"]["info_heads"] == 2 and any(k.startswith("info.") for k in ckpt["state_dict"])

    real_epoch = kill_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(pool, "models_b", **kw), pool, "b")
    monkeypatch.setattr(loop, "_train_epoch", real_epoch)
    best_b, hist_b = _run(_cfg(pool, "models_b", **kw), pool, "b")
    assert best_a == best_b
    for f in ("best.pt", "last.pt"):
        assert (pool / "models_a" / "e" / f).read_bytes() == (pool / "models_b" / "e" / f).read_bytes(), f
    # and mixup changes training: the same run without it ends elsewhere
    _run(_cfg(pool, "models_c", **{**kw, "mixup": 0.0}), pool, "c")
    assert (pool / "models_a" / "e" / "last.pt").read_bytes() != (pool / "models_c" / "e" / "last.pt").read_bytes()
