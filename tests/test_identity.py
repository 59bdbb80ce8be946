"""Issue 25, item 5: a model trained on the synthetic demo data says so in the CLI (a warning line), in every
scoring response of the API (``demo``, ``warning``) and in /health; a card made before stage 5 recorded its
provenance reads as unknown, never as a demo model."""

import base64
import json

import pytest
from conftest import photo_like, write_jpeg
from test_serve_api import DEMO_PROVENANCE, jpeg_bytes, make_card

from dfpipe.cli import main
from dfpipe.serve.identity import DEMO_WARNING, card_identity


@pytest.fixture(scope="module")
def demo_card(tmp_path_factory):
    models, card = make_card(tmp_path_factory.mktemp("demo"), provenance=DEMO_PROVENANCE)
    return ["--models", str(models), "--card", str(card), "--device", "cpu"]


@pytest.fixture(scope="module")
def old_card(tmp_path_factory):
    models, card = make_card(tmp_path_factory.mktemp("old"))  # no demo / training_data / commit: an older card
    return ["--models", str(models), "--card", str(card), "--device", "cpu"]


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if DEMO_WARNING in line]


def test_the_cli_warns_once_when_a_demo_model_scores(demo_card, tmp_path, rng, capsys):
    img = tmp_path / "in" / "a.jpg"
    write_jpeg(img, photo_like(rng, 60, 80))
    assert main(["predict", str(img), *demo_card]) == 0
    cap = capsys.readouterr()
    assert len(_warnings(cap.err)) == 1 and "WARNING" in _warnings(cap.err)[0]
    assert cap.out.count("\t") == 2  # the score line itself is unchanged
    assert main(["predict", "--json", str(img), *demo_card]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["demo"] is True
    assert main(["scan", str(tmp_path / "in"), "--out", str(tmp_path / "s.csv"), "--workers", "0", *demo_card]) == 0
    assert len(_warnings(capsys.readouterr().err)) == 1


def test_an_older_card_is_unknown_and_not_warned_about(old_card, tmp_path, rng, capsys):
    img = tmp_path / "a.jpg"
    write_jpeg(img, photo_like(rng, 60, 80))
    assert main(["predict", "--json", str(img), *old_card]) == 0
    cap = capsys.readouterr()
    assert not _warnings(cap.err) and json.loads(cap.out)[0]["demo"] is None
    who = card_identity(old_card[3])
    assert (who.demo, who.trained_on, who.commit, who.warning) == (None, "unknown", "unknown", None)
    assert who.header == "1 model · trained on unknown · commit unknown"


def test_the_card_identity_reads_in_plain_words(demo_card):
    who = card_identity(demo_card[3])
    assert who.demo is True and who.warning == DEMO_WARNING
    assert who.header == ("1 model · trained on 240 real + 240 fake images of the synthetic demo data (raw) · "
                          "commit 0123456789ab")


@pytest.fixture(scope="module")
def demo_client(demo_card):
    from fastapi.testclient import TestClient

    from dfpipe.serve.api import ServeSettings, create_app

    settings = ServeSettings(models_dir=demo_card[1], card=demo_card[3], device="cpu", explain_grid=2)
    with TestClient(create_app(settings)) as client:
        yield client


def test_every_scoring_response_says_it_is_a_demo_model(demo_client, rng):
    data = base64.b64encode(jpeg_bytes(rng)).decode()
    for path, body in (("/predict", {"image": data}), ("/explain", {"image": data}),
                       ("/predict/batch", {"images": [data, "%%% not base64"]})):
        r = demo_client.post(path, json=body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["demo"] is True and got["warning"] == DEMO_WARNING, path
        assert got["model"].startswith("m@")
    assert got["results"][1]["error"]  # a failed item does not lose the batch's identity
    h = demo_client.get("/health").json()["identity"]
    assert h["demo"] is True and h["warning"] == DEMO_WARNING and h["commit"] == "0123456789ab"
    assert h["header"].startswith("1 model · trained on 240 real + 240 fake images of the synthetic demo data")


def test_the_schema_documents_the_identity_fields(demo_client):
    spec = demo_client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("Prediction", "BatchPrediction", "Explanation"):
        assert {"demo", "warning"} <= set(spec[name]["required"]), name
        assert "demo data" in spec[name]["properties"]["demo"]["description"]
