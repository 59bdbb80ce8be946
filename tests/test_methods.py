"""The transfer methods of the benchmark: augmentation presets, the NPR expert, NCE on a projection head."""

import cv2
import numpy as np
import pytest
import torch

from dfpipe.config import ExpertConfig, LossWeights
from dfpipe.data.transforms import PRESETS, train_augment
from dfpipe.losses import JointLoss, supcon_infonce
from dfpipe.models import build_expert, expert_from_description
from dfpipe.models.registry import NPRExpert, npr


def _photo(size: int = 96) -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return cv2.resize(skimage_data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "none"])
def test_every_preset_is_deterministic_per_seed_and_keeps_shape(preset):
    img = _photo()
    aug = train_augment(preset, seed=0)
    outs = []
    for seed in (5, 6, 5):
        aug.set_random_seed(seed)
        outs.append(aug(image=img)["image"])
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert np.array_equal(outs[0], outs[2])
    if preset in ("safe", "safe_post"):  # patch masking, rotation and jitter always draw: another seed, another image
        assert not np.array_equal(outs[0], outs[1])


def _high_freq_energy(img: np.ndarray) -> float:
    return float(np.abs(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F)).mean())


def test_blur_jpeg_blurs_some_images_and_never_sharpens_on_average():
    img = _photo()
    aug = train_augment("blur_jpeg", seed=0)
    energy = []
    for seed in range(40):
        aug.set_random_seed(seed)
        energy.append(_high_freq_energy(aug(image=img)["image"]))
    ref = _high_freq_energy(img)
    # about half the draws are blurred (sigma up to 3): clearly less high-frequency energy
    assert sum(e < 0.6 * ref for e in energy) >= 8
    assert np.mean(energy) < ref


def test_randaugment_applies_two_ops_most_of_the_time():
    img = _photo()
    aug = train_augment("randaugment", seed=0)
    changed = 0
    for seed in range(30):
        aug.set_random_seed(seed)
        changed += int(np.abs(aug(image=img)["image"].astype(int) - img).mean() > 1.0)
    assert changed >= 20  # NoOp twice or a flip-only draw is rare


def test_npr_is_zero_on_nearest_upsampled_images_and_not_on_natural_ones():
    x = torch.rand(2, 3, 8, 8)
    up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")  # what a nearest up-sampler makes
    assert torch.equal(npr(up), torch.zeros_like(up))
    photo = torch.from_numpy(_photo(64)).permute(2, 0, 1)[None].float() / 255
    r = npr(photo)
    assert r.shape == photo.shape and r.abs().mean() > 1e-3
    # the top-left pixel of every 2x2 cell is the one kept: its residual is exactly 0
    assert torch.equal(r[..., ::2, ::2], torch.zeros_like(r[..., ::2, ::2]))


def test_npr_expert_sees_only_the_residual():
    torch.manual_seed(0)
    e = build_expert(ExpertConfig(pretrained="none", img_size=32), arch="npr").eval()
    assert isinstance(e, NPRExpert)
    x = torch.rand(1, 3, 16, 16)
    up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    flat = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():  # two different images with the same (zero) residual score the same
        torch.testing.assert_close(e(up)["logits"], e(flat)["logits"])


def test_projection_head_round_trips_and_feeds_the_nce_term():
    torch.manual_seed(0)
    cfg = ExpertConfig(pretrained="none", img_size=32, proj_dim=16)
    e = build_expert(cfg)
    assert e.describe()["proj_dim"] == 16
    rebuilt = expert_from_description(e.describe())
    rebuilt.load_state_dict(e.state_dict())  # same parameters, proj head included
    out = e(torch.randn(4, 3, 32, 32))
    assert out["proj"].shape == (4, 16) and out["feat"].shape == (4, e.feat_dim)
    y = torch.tensor([0, 1, 0, 1])
    loss = JointLoss(LossWeights(ce=0.0, kl=0.0, nce=1.0), temperature=0.1)(out, y)
    torch.testing.assert_close(loss["nce"], supcon_infonce(out["proj"], y, 0.1).detach())
    loss["total"].backward()
    assert e.proj[0].weight.grad.abs().sum() > 0


def test_nce_on_features_with_a_large_shared_positive_part_is_pinned_near_chance():
    """Why the head exists: pooled post-ReLU features share a large positive component, so all their
    cosines are near 1 and InfoNCE sits near chance even when the classes are separable; a linear
    projection can remove that component (here: centring), and then the same features score well."""
    torch.manual_seed(0)
    y = torch.arange(32) % 2
    signal = torch.where(y[:, None] == 1, 1.0, -1.0) * torch.rand(32, 64) * 0.05  # separable, small
    feats = 1.0 + signal + 0.01 * torch.rand(32, 64)  # >= 0, like pooled ReLU6 activations
    chance = float(np.log(31))
    assert abs(float(supcon_infonce(feats, y, 0.1)) - chance) < 0.1
    centred = feats - feats.mean(0, keepdim=True)
    assert float(supcon_infonce(centred, y, 0.1)) < chance - 0.5
