"""The detector shipped in dfpipe/assets/detector (issue 23 item 5): what predict, scan and serve load when no card
is named; a named card (the DAG's) wins. The shipped files themselves: size bound, provenance, model card."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import photo_like, write_jpeg
from test_serve_api import make_card

from dfpipe.cli import main
from dfpipe.ensemble_predict import Ensemble
from dfpipe.serve import service

SHIPPED = Path(service.__file__).resolve().parents[1] / "assets" / "detector"


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A tiny ensemble laid out as a shipped detector (card + experts in one folder), patched in as the shipped one."""
    models, card = make_card(tmp_path / "made")
    d = tmp_path / "detector"
    shutil.copytree(models, d)
    shutil.copyfile(card, d / "ensemble.json")
    monkeypatch.setattr(service, "SHIPPED_DIR", d)
    return d


def test_no_card_named_resolves_to_the_shipped_detector_and_a_named_one_wins(shipped, tmp_path, monkeypatch):
    assert service.resolve_model(None, None) == (str(shipped / "ensemble.json"), str(shipped))
    assert service.resolve_model("mine.json", None) == ("mine.json", service.DEFAULT_MODELS)
    assert service.resolve_model(None, "my_models") == (service.DEFAULT_CARD, "my_models")
    monkeypatch.setattr(service, "SHIPPED_DIR", tmp_path / "none")  # an install without one: the DAG's
    assert service.resolve_model(None, None) == (service.DEFAULT_CARD, service.DEFAULT_MODELS)


def test_predict_without_a_card_scores_with_the_shipped_detector(shipped, tmp_path, rng, capsys):
    img = tmp_path / "a.jpg"
    write_jpeg(img, photo_like(rng, 64, 80))
    assert main(["predict", "--json", str(img), "--device", "cpu"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    ref = Ensemble.from_card(shipped / "ensemble.json", shipped, torch.device("cpu"))
    from dfpipe.serve.scan import score_paths

    scores, _ = score_paths(ref, [img], workers=0)
    assert row["score"] == pytest.approx(float(scores[0]), abs=1e-6)


def test_the_repo_ships_a_detector_within_30_mb_with_its_provenance_and_model_card():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    card = json.loads((SHIPPED / "ensemble.json").read_text())
    assert card["demo"] is False and card["commit"] != "unknown"
    for src in ("yonsei_faces", "stylegan3_utk", "genphotos_frll", "dfdc_faces", "sd14_coco"):
        assert src in (SHIPPED / "MODEL_CARD.md").read_text()
    text = (SHIPPED / "MODEL_CARD.md").read_text()
    for section in ("## Training data (research use only)", "## How well it does", "## Intended use",
                    "## Known failures"):
        assert section in text
    ens = Ensemble.from_card(SHIPPED / "ensemble.json", SHIPPED, torch.device("cpu"))  # checksums verified
    assert ens.names == [e["name"] for e in card["experts"]]


def test_predict_with_the_real_shipped_detector_gives_a_score(tmp_path, rng, capsys):
    img = tmp_path / "face.jpg"
    write_jpeg(img, photo_like(rng, 120, 100))
    assert main(["predict", "--json", str(img), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    (row,) = json.loads(out)
    assert 0.0 <= row["score"] <= 1.0 and row["demo"] is False
    assert "synthetic demo data" not in err  # the shipped detector is not the demo model
