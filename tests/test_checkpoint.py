"""best.pt and the input contract: saved once, read back into the same InputSpec and the same scores."""

import dataclasses

import pytest
import torch

from dfpipe.config import ExpertConfig
from dfpipe.data.preprocess import InputPolicy, InputSpec, Preprocess, Stage1
from dfpipe.ensemble_predict import CARD_FORMAT, Ensemble, load_expert
from dfpipe.errors import DataError
from dfpipe.models import build_expert, expert_from_description
from dfpipe.train_experts.checkpoint import save_checkpoint

CPU = torch.device("cpu")
STAGE1 = Stage1(max_side=512, face_crop="haar", face_margin=1.5, face_policy="skip")


def size_copies(obj, size: int, path: str = "") -> list[str]:
    """Where ``size`` is stored as an input size in a checkpoint or card (keys naming a size), weights aside."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() if k != "state_dict" for p in size_copies(v, size, f"{path}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in size_copies(v, size, f"{path}[{i}]")]
    return [path] if obj == size and path.rsplit(".", 1)[-1] in ("size", "img_size") else []


@pytest.fixture
def trained(tmp_path):
    """An expert with non-default weights (a fresh one cannot match by chance), saved as training saves it."""
    torch.manual_seed(0)
    cfg = ExpertConfig(pretrained="none", img_size=40, input_mode="resize_short_crop", proj_dim=8)
    model = build_expert(cfg).eval()
    with torch.no_grad():
        model.head[1].weight.normal_()
    path = tmp_path / "m" / "best.pt"
    save_checkpoint(path, model, STAGE1, cfg, "m", {"auc": 0.5})
    return path, model, cfg


def test_round_trip_gives_the_same_input_spec_and_outputs(trained):
    path, model, _ = trained
    assert model.input == InputSpec(40, "resize_short_crop", (0.5,) * 3, (0.5,) * 3)  # config + backbone's mean/std
    loaded = load_expert(path, CPU)
    assert loaded.model.input == model.input and loaded.preprocess == Preprocess(STAGE1, model.input)
    assert loaded.preprocess.input.policy == InputPolicy("resize_short_crop", 40)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    rebuilt = expert_from_description(ckpt["description"]).eval()
    rebuilt.load_state_dict(ckpt["state_dict"])
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        want = model(x)
        got = rebuilt(x)
        folded = loaded.model(x.contiguous(memory_format=torch.channels_last))  # BatchNorm folded
    for k in ("logits", "prob", "feat", "proj"):
        assert torch.equal(want[k], got[k]), k
    torch.testing.assert_close(folded["prob"], want["prob"], atol=1e-5, rtol=0)


def test_the_input_size_is_stored_once_in_a_checkpoint_and_not_in_the_card(trained, tmp_path):
    path, model, _ = trained
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert size_copies(ckpt, 40) == [".description.input.size"]
    assert ckpt["format"] == 2 and ckpt["stage1"] == dataclasses.asdict(STAGE1)
    assert ckpt["config"]["proj_dim"] == 8 and "img_size" not in ckpt["config"]
    card = Ensemble.load(path.parents[1], ["m"], ["identity"], "mean_prob", CPU).card({"t_decision": 0.5})
    assert card["format"] == CARD_FORMAT == 3 and size_copies(card, 40) == []
    assert card["experts"] == [{"name": "m", "checkpoint": "m/best.pt", "sha256": card["experts"][0]["sha256"]}]


def _format_1(ckpt: dict) -> dict:
    """The same checkpoint as the previous version wrote it (format 1): the size in three places."""
    desc = {k: v for k, v in ckpt["description"].items() if k != "input"}
    spec = ckpt["description"]["input"]
    desc.update(img_size=spec["size"], mean=spec["mean"], std=spec["std"],
                preprocess={"stage1": ckpt["stage1"], "input": {"mode": spec["mode"], "size": spec["size"]},
                            "mean": spec["mean"], "std": spec["std"]})
    return {"name": ckpt["name"], "description": desc, "state_dict": ckpt["state_dict"],
            "config": {**ckpt["config"], "img_size": spec["size"], "input_mode": spec["mode"]},
            "metrics": ckpt["metrics"], "format": 1}


def test_a_format_1_checkpoint_is_read_into_the_same_expert(trained, tmp_path):
    path, model, _ = trained
    old = _format_1(torch.load(path, map_location="cpu", weights_only=True))
    assert len(size_copies(old, 40)) == 3  # what this format replaced
    old_path = tmp_path / "old" / "best.pt"
    old_path.parent.mkdir()
    torch.save(old, old_path)
    new, was = load_expert(path, CPU), load_expert(old_path, CPU)
    assert was.preprocess == new.preprocess and was.description == new.description
    x = torch.randn(2, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(was.model(x)["prob"], new.model(x)["prob"])


@pytest.mark.parametrize("ckpt", [
    {"format": 1, "name": "m", "description": {"arch": "timm", "backbone": "tf_efficientnet_lite0", "img_size": 40}},
    {"name": "m", "state_dict": {}},  # no format at all
    {"format": 7, "name": "m"},
])
def test_an_unreadable_checkpoint_is_one_line_saying_to_retrain(tmp_path, ckpt):
    path = tmp_path / "best.pt"
    torch.save(ckpt, path)
    one_line = rf"^{path}: checkpoint format [^\n]*retrain the expert \(dvc repro train_experts\)$"
    with pytest.raises(DataError, match=one_line):
        load_expert(path, CPU)
