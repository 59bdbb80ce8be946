"""The frozen-backbone probe (``freeze_backbone``; UnivFD, Ojha et al. 2023): the backbone stays out of autograd
and in eval mode through ``train()`` (SyncBatchNorm conversion and a DDP wrap included), and a short real run of
the loop on bundled ImageNet weights leaves its weights and BN buffers bit-identical to the pretrained ones while
the head learns, keeps only the head in the optimizer, resumes to the byte and round-trips through ``best.pt``.
Off, the expert and its optimizer are what they were (the other test files run that path)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import convert_sync_batchnorm
from torch.nn.parallel import DistributedDataParallel

from dfpipe.config import ConfigError, ExpertConfig, LossWeights
from dfpipe.models import EXPERTS, build_expert, create_backbone, expert_from_description, trainable_parameters
from dfpipe.ensemble_predict.experts import load_expert
from dfpipe.train_experts import loop
from test_models import LITE0, dfpipe_cache  # noqa: F401 - autouse: bundled weights converted into a temp cache
from test_train import _cfg, _load, _run, _write_pool, kill_at_epoch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 32


def _expert(freeze: bool = True, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_expert(ExpertConfig(pretrained="none", img_size=SIZE, freeze_backbone=freeze, **kw))


def _backbone_modes(model: torch.nn.Module) -> set[bool]:
    return {m.training for m in model.backbone.modules()}


def _backbone_state(state: dict, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- the expert
@pytest.mark.parametrize("arch", EXPERTS.names())
def test_frozen_backbone_stays_in_eval_mode_and_out_of_autograd(arch, caplog):
    with caplog.at_level(logging.WARNING, logger="dfpipe.models.registry"):
        e = _expert(arch=arch, proj_dim=8, info_heads=2)
    assert "freeze_backbone with pretrained: none" in caplog.text  # a random-feature probe: allowed, warned
    heads = [p for n, p in e.named_parameters() if not n.startswith("backbone.")]
    assert not any(p.requires_grad for p in e.backbone.parameters()) and all(p.requires_grad for p in heads)
    assert [id(p) for p in trainable_parameters(e)] == [id(p) for p in heads]  # what the optimizer gets
    for _ in range(2):  # train() after eval() too: the backbone never leaves eval mode
        e.train()
        assert e.training and _backbone_modes(e) == {False}
        assert e.head.training and e.proj.training and e.info.training
        out = e(torch.randn(4, 3, SIZE, SIZE))
        (F.cross_entropy(out["logits"], torch.tensor([0, 1, 0, 1])) + out["proj"].square().mean()
         + out["info_logits"].square().mean() + out["info_loo_logits"].square().mean()).backward()
        assert all(p.grad is None for p in e.backbone.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
        x = torch.randn(2, 3, SIZE, SIZE)
        assert not e.features(x).requires_grad and not e.feature_map(x).requires_grad  # computed under no_grad
        e.zero_grad(set_to_none=True)
        e.eval()
        assert _backbone_modes(e) == {False} and not e.head.training


def test_flag_off_is_the_plain_expert_and_the_same_architecture():
    plain, frozen = _expert(freeze=False), _expert()
    assert [id(p) for p in trainable_parameters(plain)] == [id(p) for p in plain.parameters()]
    plain.train()
    assert _backbone_modes(plain) == {True}
    assert plain.describe() == frozen.describe()  # checkpoints of both rebuild the same inference model
    _assert_bit_identical(plain.state_dict(), frozen.state_dict())  # same seed: same initial weights


def test_sync_batchnorm_conversion_keeps_the_backbone_frozen():
    """Stage 4 converts before the EMA copy and the DDP wrap (sync_bn on N GPUs): the converted layers share
    the frozen parameters and the expert's ``train()`` still keeps them in eval mode."""
    e = convert_sync_batchnorm(_expert())
    sync = [m for m in e.backbone.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert sync and not any(p.requires_grad for p in e.backbone.parameters())
    e.train()
    assert _backbone_modes(e) == {False} and e.head.training


def test_ddp_reduces_only_the_heads_and_keeps_the_backbone_in_eval(tmp_path):
    """A one-process gloo group, as the loop's DDP wrap (find_unused_parameters off): the frozen parameters are
    no unused gradients for DDP (a trainable but unused one fails the second step), ``train()`` on the wrapper
    reaches the expert's override, and the backbone's state does not move."""
    e = _expert()
    before = {k: v.clone() for k, v in e.backbone.state_dict().items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(e, find_unused_parameters=False)
        opt = torch.optim.AdamW(trainable_parameters(e), lr=1e-2)
        head_before = e.head[1].weight.detach().clone()
        for _ in range(3):
            ddp.train()
            assert _backbone_modes(e) == {False}
            loss = F.cross_entropy(ddp(torch.randn(4, 3, SIZE, SIZE))["logits"], torch.tensor([0, 1, 0, 1]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        dist.destroy_process_group()
    _assert_bit_identical(before, e.backbone.state_dict())
    assert not torch.equal(head_before, e.head[1].weight)


# ----------------------------------------------------------------------------- settings
def test_settings_a_frozen_backbone_cannot_train_with(caplog):
    with pytest.raises(ConfigError, match=r"freeze_backbone trains only the heads.*set loss.ce > 0 \(it is 0.0\)"):
        loop._check_frozen(ExpertConfig(freeze_backbone=True, loss=LossWeights(ce=0.0, kl=0.5)))
    loop._check_frozen(ExpertConfig(freeze_backbone=False, loss=LossWeights(ce=0.0, kl=0.5)))  # not frozen: fine
    with caplog.at_level(logging.WARNING, logger="dfpipe.train_experts.loop"):
        loop._check_frozen(ExpertConfig(freeze_backbone=True, info_heads=2, loss=LossWeights(nce=0.1)))
        assert caplog.text == ""  # NCE on the fused branches trains them: nothing to warn about
        loop._check_frozen(ExpertConfig(freeze_backbone=True, proj_dim=16, loss=LossWeights(nce=0.1)))
    assert "loss.nce = 0.1 with freeze_backbone" in caplog.text


# ----------------------------------------------------------------------------- the training loop
@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("probepool")
    _write_pool(root)
    return root


def test_a_frozen_run_trains_only_the_head_resumes_exactly_and_round_trips(pool, monkeypatch):
    """Bundled ImageNet weights, EMA with a KL teacher, 2 epochs of 3 steps: the backbone's weights and BN
    buffers in the student, the EMA, ``last.pt`` and ``best.pt`` are the pretrained ones to the bit, and it ran
    in eval mode on every training step; the head moved; AdamW holds the head's two tensors only. A run killed
    after epoch 1 resumes to the same bytes, and ``best.pt`` scores the same loaded the normal way."""
    kw = dict(pretrained="bundled", freeze_backbone=True, epochs=2, ema_epochs=0.5,
              loss=LossWeights(ce=1.0, kl=0.5))
    built, modes = {}, []
    real_build = loop.build_expert

    def spy(ecfg):
        model = real_build(ecfg)
        built["init"] = {k: v.clone() for k, v in model.state_dict().items()}
        built["model"] = model
        model.head.register_forward_pre_hook(lambda m, a: modes.append((m.training, model.backbone.training)))
        return model

    # the reference: the bundled ImageNet weights as the backbone loads them (converted into the temp cache here)
    pretrained = create_backbone(LITE0, pretrained="bundled", num_classes=0).state_dict()
    monkeypatch.setattr(loop, "build_expert", spy)
    _run(_cfg(pool, "models_a", **kw), pool, "a")
    assert (True, False) in modes and {b for _, b in modes} == {False}  # training steps ran, the backbone in eval
    assert any(k.endswith("running_var") for k in pretrained)
    _assert_bit_identical(_backbone_state(built["init"]), pretrained)
    best, last = _load(pool / "models_a" / "e" / "best.pt"), _load(pool / "models_a" / "e" / "last.pt")
    for state, prefix in ((built["model"].state_dict(), "backbone."), (last["model"], "backbone."),
                          (last["ema"], "module.backbone."), (best["state_dict"], "backbone.")):
        _assert_bit_identical(_backbone_state(state, prefix), pretrained)
    for k in ("head.1.weight", "head.1.bias"):
        assert not torch.equal(last["model"][k], built["init"][k]) and not torch.equal(best["state_dict"][k],
                                                                                       built["init"][k]), k
    opt = last["optimizer"]
    assert len(opt["param_groups"]) == 1 and len(opt["param_groups"][0]["params"]) == 2
    assert [tuple(s["exp_avg"].shape) for s in opt["state"].values()] == [(2, 1280), (2,)]
    assert best["config"]["freeze_backbone"] is True and "freeze_backbone" not in best["description"]

    real_epoch = kill_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(pool, "models_b", **kw), pool, "b")
    monkeypatch.setattr(loop, "_train_epoch", real_epoch)
    _run(_cfg(pool, "models_b", **kw), pool, "b")
    for f in ("best.pt", "last.pt"):  # resumed = uninterrupted, to the byte: the optimizer state fits its groups
        assert (pool / "models_a" / "e" / f).read_bytes() == (pool / "models_b" / "e" / f).read_bytes(), f

    x = torch.randn(6, 3, SIZE, SIZE)
    trained = real_build(ExpertConfig(**{**kw, "img_size": SIZE})).eval()
    trained.load_state_dict(best["state_dict"])
    rebuilt = expert_from_description(best["description"]).eval()  # not frozen: an inference model
    rebuilt.load_state_dict(best["state_dict"])
    loaded = load_expert(pool / "models_a" / "e" / "best.pt", torch.device("cpu"))  # BatchNorm folded
    with torch.no_grad():
        a, b = trained(x), rebuilt(x)
        folded = loaded.model(x.to(memory_format=torch.channels_last))["prob"]
    for k in ("logits", "prob", "feat"):
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(folded, a["prob"], atol=1e-5, rtol=0)
    assert len(torch.unique(a["prob"])) == 6
