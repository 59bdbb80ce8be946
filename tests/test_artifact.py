"""The artifact expert (issue 23 item 2): residual fronts on tiny known tensors, the cut backbone (bundled and
scratch), SAFE's augment preset on native pixels, multi-crop TTA through every scoring path, and a tiny training
run of arch artifact through stage 4's loop."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pywt
import torch
import torch.nn.functional as F

from conftest import layout_in, photo_like, save_expert_checkpoint, write_cache_pool
from dfpipe.config import ExpertConfig, LossWeights, TrainConfig, from_dict
from dfpipe.data.dataset import StoreDataset
from dfpipe.data.preprocess import InputPolicy, InputSpec, crop_grid, crop_origin, fit
from dfpipe.data.transforms import PatchMask, train_augment
from dfpipe.ensemble_predict import Ensemble, load_expert
from dfpipe.ensemble_predict.tta import parse_view
from dfpipe.errors import ConfigError
from dfpipe.models import EXPERTS, Expert, build_expert, create_backbone, expert_from_description
from dfpipe.models.artifact import ArtifactExpert, StagesBackbone
from dfpipe.models.residual import (FRONTS, apply_front, front_channels, haar_highpass, median_residual,
                                   middle_of_8, npr)
from dfpipe.train_experts.loop import run

LITE0, MOBILENET = "tf_efficientnet_lite0", "mobilenetv2_100"


@pytest.fixture(scope="module", autouse=True)
def dfpipe_cache(tmp_path_factory):
    """Bundled weights converted into a temp cache, never into the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFPIPE_CACHE", str(tmp_path_factory.mktemp("dfpipe_cache")))
        yield


def artifact_cfg(**kw) -> ExpertConfig:
    base = dict(arch="artifact", backbone=LITE0, pretrained="none", img_size=32, input_mode="crop", front="dwt",
                stages=2)
    return ExpertConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- fronts
@pytest.mark.parametrize("name", ["dwt", "median", "npr"])
def test_a_constant_image_has_no_residual(name):
    x = torch.full((2, 3, 8, 10), 0.37)
    out = apply_front(name, x)
    assert out.shape == ((2, 9, 4, 5) if name == "dwt" else (2, 3, 8, 10))
    assert torch.equal(out, torch.zeros_like(out))
    assert front_channels(name) == out.shape[1]


def test_dwt_is_pywts_haar_detail_bands_per_channel():
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    out = haar_highpass(x)  # (B, 3C, H / 2, W / 2)
    assert out.shape == (2, 9, 3, 4)
    for b in range(2):
        for c in range(3):
            _, (ch, cv, cd) = pywt.dwt2(x[b, c].numpy(), "haar")
            for k, band in enumerate((ch, cv, cd)):
                np.testing.assert_allclose(out[b, 3 * c + k].numpy(), band, atol=1e-12)
    # orthonormal: the detail bands hold exactly the energy the approximation (LL) does not
    ll = F.avg_pool2d(x, 2) * 2
    torch.testing.assert_close((out ** 2).sum() + (ll ** 2).sum(), (x ** 2).sum())
    assert haar_highpass(torch.randn(1, 3, 7, 9)).shape == (1, 9, 3, 4)  # an odd last row / column is dropped


def test_dwt_of_one_bright_pixel():
    x = torch.zeros(1, 3, 4, 4)
    x[0, 1, 1, 1] = 2.0  # channel 1, bottom-right pixel of the first 2x2 cell
    out = haar_highpass(x)
    want = torch.zeros(1, 9, 2, 2)
    want[0, 3:6, 0, 0] = torch.tensor([-1.0, -1.0, 1.0])  # LH, HL, HH of channel 1: +-2/2
    assert torch.equal(out, want)


def test_median_residual_of_one_bright_pixel_is_that_pixel_alone():
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 3, 3] = 5.0
    assert torch.equal(median_residual(x), x)  # its neighbours' 8 neighbours hold one 5 and seven 0s: median 0


def test_middle_of_8_is_the_4th_and_5th_smallest():
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=8)))  # (256, 8): every 0-1 input
    for v in (bits, torch.randn(5000, 8)):
        lo, hi = middle_of_8(list(v.T))
        s = v.sort(dim=1).values
        assert torch.equal(lo, s[:, 3]) and torch.equal(hi, s[:, 4])


def test_median_residual_keeps_edges_out_and_checkerboards_in():
    edge = torch.zeros(1, 2, 6, 6)
    edge[..., 3:] = 1.0  # a vertical step: each pixel's neighbours are at least 5 of its own side
    assert torch.equal(median_residual(edge), torch.zeros_like(edge))
    yy, xx = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    board = ((yy + xx) % 2).float().view(1, 1, 6, 6)  # 4 neighbours alike, 4 opposite: median 0.5
    torch.testing.assert_close(median_residual(board), board - 0.5)


def test_npr_front_is_the_npr_residual():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 3.0  # not the pixel nearest-neighbour down-sampling keeps: it stays in the residual
    assert torch.equal(apply_front("npr", x), x)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 3.0  # the kept pixel: its copy over the cell is subtracted from the other three
    want = torch.zeros(1, 1, 4, 4)
    want[0, 0, :2, :2] = -3.0
    want[0, 0, 0, 0] = 0.0
    assert torch.equal(apply_front("npr", x), want)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(apply_front("npr", x), npr(x))


@pytest.mark.parametrize("name", ["dwt", "median", "npr"])
def test_fronts_are_fp32_under_bf16_autocast(name):
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = apply_front(name, x.to(torch.bfloat16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, apply_front(name, x.to(torch.bfloat16).float()))


def test_fronts_are_the_configs_choices():
    assert set(FRONTS) == {"none", "dwt", "median", "npr"}
    with pytest.raises(ConfigError, match="unknown residual front"):
        front_channels("sobel")


# ----------------------------------------------------------------------------- the expert
def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("pretrained", ["bundled", "none"])
@pytest.mark.parametrize("backbone,front,stages,feat,params", [
    (LITE0, "dwt", 2, 24, (10_000, 30_000)),  # stem + 2 stages: tiny
    (LITE0, "median", 5, 112, (0.6e6, 0.8e6)),
    (MOBILENET, "dwt", 6, 160, (1.2e6, 1.5e6)),  # about SAFE's 1.44 M
])
def test_artifact_expert_forward_backward_shapes(backbone, front, stages, feat, params, pretrained):
    torch.manual_seed(0)
    e = build_expert(artifact_cfg(backbone=backbone, front=front, stages=stages, pretrained=pretrained, img_size=64))
    assert isinstance(e, ArtifactExpert) and isinstance(e, Expert) and isinstance(e.backbone, StagesBackbone)
    assert e.feat_dim == feat and params[0] < _n_params(e) < params[1]
    assert e.backbone.conv_stem.weight.shape[1] == front_channels(front)
    e.train()
    out = e(torch.randn(4, 3, 64, 64))
    assert out["logits"].shape == (4, 2) and out["prob"].shape == (4,) and out["feat"].shape == (4, feat)
    assert all(torch.isfinite(v).all() for v in out.values())
    F.cross_entropy(out["logits"], torch.tensor([0, 1, 0, 1])).backward()
    assert e.backbone.conv_stem.weight.grad.abs().sum() > 0  # the gradient reaches the first layer
    e.eval()
    with torch.no_grad():
        assert torch.isfinite(e(torch.randn(2, 3, 64, 64))["prob"]).all()


def test_bundled_first_stages_hold_the_imagenet_weights():
    e = build_expert(artifact_cfg(pretrained="bundled", front="dwt", stages=3))
    full = create_backbone(LITE0, pretrained="bundled", num_classes=0)
    for name, t in full.blocks[:3].state_dict().items():
        assert torch.equal(e.backbone.blocks.state_dict()[name], t), name
    w = full.conv_stem.weight  # (32, 3, 3, 3) -> (32, 9, 3, 3): repeated over the 3 bands of each channel, x 3/9
    torch.testing.assert_close(e.backbone.conv_stem.weight, w.repeat(1, 3, 1, 1) / 3)
    scratch = build_expert(artifact_cfg(pretrained="none", front="median", stages=3))
    assert not torch.equal(scratch.backbone.blocks[0][0].conv_dw.weight, full.blocks[0][0].conv_dw.weight)


def test_a_cut_backbone_gets_heads_of_its_width():
    e = build_expert(artifact_cfg(front="median", stages=3, info_heads=2, proj_dim=16)).train()  # 40-wide features
    out = e(torch.randn(3, 3, 32, 32))
    assert e.feat_dim == 40 and out["feat"].shape == (3, 20)  # two local branches of 40 // 2, fused
    assert out["proj"].shape == (3, 16) and out["info_loo_logits"].shape == (3, 2, 2)
    assert e.head[1].in_features == 20 and e.info.local.in_channels == 40


def test_the_description_rebuilds_the_same_expert():
    torch.manual_seed(0)
    e = build_expert(artifact_cfg(front="median", stages=3, img_size=48)).eval()
    desc = e.describe()
    assert (desc["arch"], desc["front"], desc["stages"]) == ("artifact", "median", 3)
    rebuilt = expert_from_description({**desc, "preprocess": {}}).eval()
    rebuilt.load_state_dict(e.state_dict())
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        a, b = e(x), rebuilt(x)
    for k in ("logits", "prob", "feat"):
        assert torch.equal(a[k], b[k]), k


def test_off_values_leave_the_expert_as_the_timm_one():
    torch.manual_seed(0)
    plain = build_expert(ExpertConfig(pretrained="none", img_size=32))
    torch.manual_seed(0)
    off = build_expert(ExpertConfig(arch="artifact", pretrained="none", img_size=32))  # front none, stages 0
    assert off.describe() == {**plain.describe(), "arch": "artifact", "front": "none", "stages": 0}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x)["logits"], off.eval()(x)["logits"])
    assert "front" not in plain.describe()  # other experts' descriptions (and checkpoints) are unchanged


def test_settings_are_checked_with_clear_errors():
    with pytest.raises(ConfigError, match="settings of arch 'artifact'"):
        ExpertConfig(front="dwt")
    with pytest.raises(ConfigError, match="unknown key|not allowed"):
        from_dict(ExpertConfig, {"arch": "artifact", "front": "sobel", "input_mode": "crop"}, "params.yaml:e")
    with pytest.raises(ConfigError, match="stages must be >= 0"):
        artifact_cfg(stages=-1)
    with pytest.raises(ConfigError, match="input_mode: crop"):
        build_expert(artifact_cfg(input_mode="resize"))
    with pytest.raises(ConfigError, match="has 7 stages"):
        build_expert(artifact_cfg(stages=8))
    with pytest.raises(ConfigError, match="EfficientNet-family"):
        build_expert(artifact_cfg(backbone="resnet18"))


def test_artifact_is_registered():
    assert "artifact" in EXPERTS


# ----------------------------------------------------------------------------- the safe preset
def _d4(img: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / right-angle rotations of an (H, W) array."""
    out = []
    for k in range(4):
        r = np.rot90(img, k)
        out += [r, r[:, ::-1]]
    return out


def test_safe_preset_moves_pixels_without_resampling_them():
    """A grey image through 'safe': right-angle rotations and flips move pixels, brightness / contrast map each
    value through one monotone function, masking zeroes cells. So outside the zeros the output must be a
    monotone function of some D4 transform of the input, pixel by pixel, which no interpolation would leave."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (48, 48), dtype=np.uint8)
    img = np.repeat(grey[..., None], 3, axis=2)
    aug = train_augment("safe", seed=0)
    for seed in range(12):
        aug.set_random_seed(seed)
        out = aug(image=img)["image"]
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # still grey
        o = out[..., 0].astype(int)
        kept = o > 0  # masked cells (and values mapped to 0)

        def monotone(t: np.ndarray) -> bool:
            order = np.argsort(t[kept], kind="stable")
            a, b = t[kept][order], o[kept][order]
            return bool((np.diff(b)[np.diff(a) >= 0] >= 0).all() and (np.diff(b)[np.diff(a) == 0] == 0).all())

        assert any(monotone(t.astype(int)) for t in _d4(grey)), seed


def test_patch_mask_zeroes_whole_grid_cells_and_at_most_three_quarters():
    img = np.full((40, 50, 3), 200, dtype=np.uint8)
    mask = PatchMask(max_ratio=0.75, patch=16, p=1.0)
    seen = set()
    for seed in range(20):
        mask.set_random_seed(seed)
        out = mask(image=img)["image"]
        cells = out[:32, :48].reshape(2, 16, 3, 16, 3)
        per_cell = cells.min(axis=(1, 3, 4))
        assert ((cells.max(axis=(1, 3, 4)) == per_cell)).all()  # a cell is all 0 or untouched
        assert set(np.unique(per_cell)) <= {0, 200} and (per_cell == 0).mean() <= 0.75
        assert (out[32:] == 200).all() and (out[:, 48:] == 200).all()  # the border narrower than a cell: kept
        seen.add(int((per_cell == 0).sum()))
    assert len(seen) > 2  # the share is drawn


# ----------------------------------------------------------------------------- multi-crop TTA
def test_crop_grid_and_fit_give_native_crops():
    assert crop_grid((10, 12), 4, 9) == [(y, x) for y in (0, 3, 6) for x in (0, 4, 8)]
    assert crop_grid((10, 12), 4, 9)[4] == crop_origin((10, 12), 4, None)  # the middle one is the central crop
    img = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    p = InputPolicy("crop", 8, crops=4)
    out = fit(img, p)
    assert out.shape == p.shape == (4, 8, 8, 3) and p.key == "crop8x4"
    for crop, (y, x) in zip(out, [(0, 0), (0, 16), (12, 0), (12, 16)]):  # the corners, every pixel as it came
        assert np.array_equal(crop, img[y:y + 8, x:x + 8])
    with pytest.raises(ValueError, match="test-time"):
        fit(img, p, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="k x k grid"):
        InputPolicy("resize", 32, crops=4)
    with pytest.raises(ConfigError, match="k x k grid"):
        InputPolicy("crop", 32, crops=5)
    # an expert's input contract is single-crop: crops are a test-time view, never stored with the weights
    spec = InputSpec(32, "crop", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert spec.policy == InputPolicy("crop", 32) and spec.policy.crops == 1 and "crops" not in spec.to_dict()


def test_parse_crops_views():
    v = parse_view("crops4+hflip")
    assert (v.crops, v.geo, v.scale) == (4, "hflip", 1.0)
    assert parse_view("scale1.5+crops9").crops == 9 and parse_view("identity").crops == 1
    for bad in ("crops5", "crops4+crops9", "crops"):
        with pytest.raises(ConfigError, match="unknown TTA view"):
            parse_view(bad)


@pytest.fixture(scope="module")
def crop_models(tmp_path_factory) -> Path:
    """Two random experts: an artifact one (median front, native 24 px crops) and a resized timm one."""
    models = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    art = build_expert(artifact_cfg(front="median", stages=3, img_size=24)).eval()
    save_expert_checkpoint(models / "art" / "best.pt", art, artifact_cfg(front="median", stages=3, img_size=24), name="art")
    plain = build_expert(ExpertConfig(pretrained="none", img_size=24)).eval()
    save_expert_checkpoint(models / "plain" / "best.pt", plain, ExpertConfig(img_size=24), name="plain")
    return models


def _ens(models: Path, names: list[str], tta: list[str]) -> Ensemble:
    return Ensemble.load(models, names, tta, "mean_prob", torch.device("cpu"))


def test_multi_crop_view_is_the_mean_over_the_grid_crops(crop_models):
    imgs = [photo_like(np.random.default_rng(i), 40 + 4 * i, 50) for i in range(3)]
    ens = _ens(crop_models, ["art"], ["crops4"])
    got = ens.score_images(imgs)
    single = _ens(crop_models, ["art"], ["identity"])
    for img, score in zip(imgs, got):
        crops = fit(img, InputPolicy("crop", 24, crops=4))
        want = single.score_images(list(crops)).mean()  # each 24 x 24 crop scored as its own image
        np.testing.assert_allclose(score, want, rtol=1e-5)
    assert np.array_equal(got, ens.score_images(imgs))  # deterministic
    assert np.abs(got - single.score_images(imgs)).max() > 1e-6  # not the central crop alone
    # combined with a flip: each crop mirrored, then averaged with the plain view
    both = _ens(crop_models, ["art"], ["crops4", "crops4+hflip"]).score_images(imgs)
    flipped = _ens(crop_models, ["art"], ["crops4+hflip"]).score_images(imgs)
    np.testing.assert_allclose(both, (got + flipped) / 2, rtol=1e-5)


def test_a_resized_expert_scores_its_one_image_under_crops(crop_models):
    imgs = [photo_like(np.random.default_rng(i), 40, 56) for i in range(3)]
    ens = _ens(crop_models, ["art", "plain"], ["crops9"])
    assert [p.key for p in ens.policies] == ["crop24x9", "resize24"]
    np.testing.assert_allclose(ens.score_images(imgs), (_ens(crop_models, ["art"], ["crops9"]).score_images(imgs)
                                                       + _ens(crop_models, ["plain"], ["identity"]).score_images(imgs))
                               / 2, rtol=1e-5)


def test_card_records_the_crops_and_every_scoring_path_agrees(crop_models, tmp_path):
    """API (score_images), CLI (score_files from a card) and the submission path (stored images through
    StoreDataset) give the same multi-crop scores."""
    from conftest import write_jpeg
    from dfpipe.data.images import decode_image
    from dfpipe.data.store import write_png_shard

    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        write_jpeg(tmp_path / f"{i}.jpg", photo_like(rng, 36 + 5 * i, 44))
        paths.append(tmp_path / f"{i}.jpg")
    ens = _ens(crop_models, ["art", "plain"], ["crops4", "hflip"])
    card = ens.card({"t_decision": 0.5, "t_fake": 0.9, "t_real": 0.1})
    assert card["tta"] == ["crops4", "hflip"]
    (tmp_path / "card.json").write_text(json.dumps(card))
    cli = Ensemble.from_card(tmp_path / "card.json", crop_models, torch.device("cpu"))
    files, errors = cli.score_files(paths, batch_size=3, workers=0)
    assert not errors
    decoded = [decode_image(p) for p in paths]
    np.testing.assert_allclose(files, ens.score_images(decoded), atol=1e-6)
    write_png_shard(tmp_path / "test-000000.bin", decoded)
    pool = pd.DataFrame({"cache_path": str(tmp_path / "test-000000.bin"), "cache_index": range(4), "label": -1})
    loader = torch.utils.data.DataLoader(StoreDataset(pool, cli.policies), batch_size=3)
    np.testing.assert_allclose(cli.combine_experts(cli.score_loader(loader)), files, atol=1e-6)


def test_device_decode_cuts_the_same_grid_of_crops(crop_models, tmp_path):
    """decode='device' (here torchvision's CPU decoder) slices the same native crops as the workers' path."""
    from conftest import write_jpeg

    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        write_jpeg(tmp_path / f"{i}.jpg", photo_like(rng, 30 + 7 * i, 41))
        paths.append(tmp_path / f"{i}.jpg")
    ens = _ens(crop_models, ["art"], ["crops9", "identity"])
    dev, e1 = ens.score_files(paths, batch_size=2, workers=0, decode="device")
    cpu, e2 = ens.score_files(paths, batch_size=2, workers=0)
    assert e1 == e2 == []
    np.testing.assert_array_equal(dev, cpu)


# ----------------------------------------------------------------------------- a tiny training run
def test_arch_artifact_trains_saves_and_loads(tmp_path, one_torch_thread):
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 16), ("val", 8)):
        labels = np.arange(n) % 2
        imgs = rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8)
        imgs[labels == 1] = (imgs[labels == 1] // 4) * 4  # fakes: a pixel-level trace (2 lost bits)
        splits[split] = (imgs, labels)
    write_cache_pool(tmp_path, splits, n_clusters=2)
    ecfg = artifact_cfg(front="dwt", stages=2, img_size=32, epochs=1, batch_size=8, lr=3e-3, augment="safe_post",
                        loss=LossWeights(ce=1.0))
    cfg = TrainConfig(workers=0, experts={"art": ecfg})
    layout = layout_in(tmp_path, splits=tmp_path / "splits.csv", prepared=tmp_path / "prepared",
                       augmented=tmp_path / "aug", models=tmp_path / "models")
    best = run(cfg, layout, "art")["art"]
    assert best["epoch"] == 1 and 0.0 <= best["auc"] <= 1.0
    ckpt = torch.load(tmp_path / "models" / "art" / "best.pt", map_location="cpu", weights_only=True)
    desc = ckpt["description"]
    assert (desc["arch"], desc["front"], desc["stages"]) == ("artifact", "dwt", 2)
    assert (desc["input"]["mode"], desc["input"]["size"]) == ("crop", 32)
    assert ckpt["config"]["augment"] == "safe_post" and ckpt["config"]["front"] == "dwt"
    loaded = load_expert(tmp_path / "models" / "art" / "best.pt", torch.device("cpu"))  # BatchNorm folded
    model = expert_from_description(desc).eval()
    model.load_state_dict(ckpt["state_dict"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)["prob"], model(x)["prob"], atol=1e-5, rtol=1e-4)
    assert any(p.abs().sum() > 0 for p in ckpt["state_dict"].values())
    scores = Ensemble([loaded], ["crops4"], "mean_prob", torch.device("cpu")).score_images(list(splits["val"][0]))
    assert scores.shape == (8,) and np.isfinite(scores).all()
