"""The HTTP API through FastAPI's test client, on a tiny random-weight expert and its ensemble card."""

import asyncio
import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfpipe.config import ExpertConfig
from dfpipe.data.images import decode_image
from dfpipe.data.preprocess import Stage1
from dfpipe.io import write_json
from dfpipe.models import build_expert
from dfpipe.ensemble_predict import Ensemble
from dfpipe.train_experts.loop import save_checkpoint

THRESHOLDS = {"t_real": 0.3, "t_fake": 0.7, "t_decision": 0.5, "max_fpr": 0.01, "max_fnr": 0.01}


NATIVE = Stage1()  # stage 1 at its defaults: native resolution, no face crop


def save_expert(models: Path, name: str = "m", stage1: Stage1 = NATIVE, mode: str = "resize", img_size: int = 32,
                seed: int = 0) -> None:
    """A stage-4 checkpoint (tf_efficientnet_lite0, random weights) as training writes it: the model's
    description (its input contract: ``img_size``, ``mode``, the backbone's normalisation) and ``stage1``."""
    torch.manual_seed(seed)
    cfg = ExpertConfig(pretrained="none", img_size=img_size, input_mode=mode)
    save_checkpoint(models / name / "best.pt", build_expert(cfg).eval(), stage1, cfg, name, {})


# what stage 5 writes into the card of a model trained on the demo data (dfpipe.ensemble_predict.provenance)
DEMO_PROVENANCE = {"demo": True, "commit": "0123456789ab",
                   "training_data": {"demo": True, "summary": "240 real + 240 fake images of the synthetic demo data "
                                                              "(raw)"}}


def make_card(root: Path, thresholds: dict = THRESHOLDS, tta: tuple = ("identity", "hflip"),
              combine: str = "mean_prob", stage1: Stage1 = NATIVE, provenance: dict | None = None
              ) -> tuple[Path, Path]:
    """A stage-4 checkpoint (tf_efficientnet_lite0 at 32 px, random weights, native-resolution stage 1
    unless ``stage1`` says otherwise) and a stage-5 card for it, as ``dfpipe.ensemble_predict.run`` writes them
    (with ``provenance``: its demo, training_data and commit; without, a card that predates them).
    Returns (models_dir, card)."""
    save_expert(root / "models", "m", stage1)
    ens = Ensemble.load(root / "models", ["m"], list(tta), combine, torch.device("cpu"))
    write_json(root / "ensemble.json", ens.card(thresholds, provenance))
    return root / "models", root / "ensemble.json"


def expected_verdict(score: float, t: dict = THRESHOLDS) -> str:
    return "likely fake" if score >= t["t_fake"] else "likely real" if score < t["t_real"] else "uncertain"


def jpeg_bytes(rng: np.random.Generator, h: int = 60, w: int = 80) -> bytes:
    from conftest import photo_like

    buf = io.BytesIO()
    Image.fromarray(photo_like(rng, h, w)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from fastapi.testclient import TestClient

    from dfpipe.serve.api import ServeSettings, create_app

    models, card = make_card(tmp_path_factory.mktemp("serve"))
    settings = ServeSettings(models_dir=str(models), card=str(card), device="cpu", max_bytes=64 * 1024,
                             max_batch_images=4, explain_grid=4)
    with TestClient(create_app(settings)) as client:  # runs the lifespan: models loaded once here
        yield client, Ensemble.from_card(card, models, torch.device("cpu"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_predict_base64_contract_matches_the_ensemble(served, rng):
    client, ens = served
    data = jpeg_bytes(rng)
    want = float(ens.score_images([decode_image(data)])[0])
    r = client.post("/predict", json={"image": _b64(data)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"result", "verdict", "model", "demo", "warning"} and body["model"].startswith("m@")
    assert body["demo"] is None and body["warning"] is None  # a card without provenance: unknown, not a demo
    assert body["result"] == pytest.approx(want, abs=1e-6)
    assert body["verdict"] == expected_verdict(body["result"])
    # the original clients' variants: a data URL, wrapped lines, URL-safe alphabet without padding
    variants = [f"data:image/jpeg;base64,{_b64(data)}", base64.encodebytes(data).decode(),
                base64.urlsafe_b64encode(data).decode().rstrip("=")]
    for text in variants:
        assert client.post("/predict", json={"image": text}).json()["result"] == pytest.approx(want, abs=1e-6)


def test_multipart_upload_and_batch(served, rng):
    client, ens = served
    a, b = jpeg_bytes(rng, 50, 50), jpeg_bytes(rng, 90, 40)
    want = ens.score_images([decode_image(a), decode_image(b)])
    r = client.post("/predict", files={"file": ("a.jpg", a, "image/jpeg")})
    assert r.status_code == 200 and r.json()["result"] == pytest.approx(want[0], abs=1e-6)
    r = client.post("/predict/batch", json={"images": [_b64(a), _b64(b"not an image at all"), _b64(b)]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["result"] for x in (res[0], res[2])] == pytest.approx(list(want), abs=1e-6)
    assert res[1]["result"] is None and "not a usable image" in res[1]["error"]
    two = [("file", ("a.jpg", a, "image/jpeg")), ("file", ("b.jpg", b, "image/jpeg"))]
    r = client.post("/predict/batch", files=two)
    assert [x["result"] for x in r.json()["results"]] == pytest.approx(list(want), abs=1e-6)


def _bomb_png() -> bytes:
    """A 1-bit 12000 x 12000 PNG: ~20 KB on the wire, 144 megapixels once decoded."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")
    return buf.getvalue()


BAD_INPUTS = {  # name: (request kwargs, status, words in the message)
    "not base64": (dict(json={"image": "@@ not base64 !!"}), 400, "base64"),
    "data URL not base64": (dict(json={"image": "data:image/png,abc"}), 400, "base64"),
    "not an image": (dict(json={"image": base64.b64encode(b"GIF89a, no more").decode()}), 422, "not a usable image"),
    "empty": (dict(json={"image": ""}), 422, "'image' is empty"),  # the schema says minLength 1
    "empty once decoded": (dict(json={"image": "  \n"}), 400, "empty"),
    "empty upload": (dict(files={"file": ("e.jpg", b"", "image/jpeg")}), 400, "empty"),
    "too large": (dict(json={"image": base64.b64encode(b"\xff" * 70_000).decode()}), 413, "limit"),
    "too large upload": (dict(files={"file": ("big.jpg", b"\xff" * 70_000, "image/jpeg")}), 413, "limit"),
    "wrong content type": (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "content type"),
    "no content type": (dict(content=b"hello"), 415, "content type"),
    "missing field": (dict(json={"picture": "abc"}), 422, "missing field 'image'"),
    "missing file field": (dict(files={"other": ("x.jpg", b"abc", "image/jpeg")}), 422, "missing field 'file'"),
    "another file field": (dict(files={"image": ("x.jpg", b"abc", "image/jpeg")}), 422,
                           "missing field 'file': upload the image as multipart field 'file' "
                           "(unexpected field 'image'"),
    # the form schema says additionalProperties: false; the server names the stray field rather than ignore it
    "unexpected form field": (dict(files={"file": ("a.jpg", b"abc", "image/jpeg")}, data={"note": "x"}), 422,
                              "unexpected field 'note' in the form"),
    "unnamed form field": (dict(files={"file": ("a.jpg", b"abc", "image/jpeg")}, data={"": "-1.5"}), 422,
                           "unexpected field '' in the form"),
    "unexpected form file": (dict(files=[("file", ("a.jpg", b"abc", "image/jpeg")),
                                         ("other", ("b.jpg", b"abc", "image/jpeg"))]), 422, "unexpected field 'other'"),
    "too many form parts": (dict(files={"file": ("a.jpg", b"abc", "image/jpeg")},
                                 data={f"x{i}": "1" for i in range(10)}), 413, "too many parts in the form"),
    "not a string": (dict(json={"image": 42}), 422, "'image' must be a base64 string"),
    "not an object": (dict(json=["abc"]), 422, "must be an object"),
    "too long": (dict(json={"image": "A" * 200_000}), 413, "limit"),
    "two files": (dict(files=[("file", ("a.jpg", b"a", "image/jpeg")), ("file", ("b.jpg", b"b", "image/jpeg"))]),
                  422, "takes one image"),
    "invalid JSON": (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_4xx_with_a_message(served, case):
    client, _ = served
    kwargs, status, words = BAD_INPUTS[case]
    for url in ("/predict", "/explain"):
        r = client.post(url, **kwargs)
        assert r.status_code == status, (url, r.text)
        assert words in r.json()["detail"]


def test_a_multipart_body_of_undeclared_length_is_refused(served):
    client, _ = served
    chunked = (part for part in [b"--x\r\n", b"\xff" * 1000])  # a generator: sent without Content-Length
    r = client.post("/predict", content=chunked, headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 411 and "Content-Length" in r.json()["detail"]


def test_decompression_bomb_is_refused_before_decoding(served):
    client, _ = served
    bomb = _bomb_png()
    assert len(bomb) < 64 * 1024  # under the byte limit: only the pixel check can stop it
    r = client.post("/predict", files={"file": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "not a usable image: too large: 12000x12000 = 144 MP, the limit is 100 MP"


def test_batch_limits(served, rng):
    client, _ = served
    r = client.post("/predict/batch", json={"images": [_b64(jpeg_bytes(rng, 20, 20))] * 5})
    assert r.status_code == 422 and "limit is 4 images" in r.json()["detail"]  # the schema's maxItems: a 422
    r = client.post("/predict/batch", json={"images": []})
    assert r.status_code == 422 and "'images' is empty" in r.json()["detail"]
    # issue 25: an empty or undecodable item is that item's error, with its index; the others are scored
    r = client.post("/predict/batch", json={"images": [_b64(jpeg_bytes(rng, 20, 20)), "", "%%%not base64"]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[0]["result"] is not None and res[0]["error"] is None
    assert res[1]["result"] is None and "images[1] is empty" in res[1]["error"]
    assert res[2]["result"] is None and res[2]["error"].startswith("images[2]: ")
    r = client.post("/predict/batch", json={"images": "abc"})
    assert r.status_code == 422 and "must be a list" in r.json()["detail"]
    r = client.post("/predict/batch", files=[("file", ("a.jpg", jpeg_bytes(rng, 20, 20), "image/jpeg"))] * 5)
    assert r.status_code == 422 and "limit is 4 images" in r.json()["detail"]
    r = client.post("/predict/batch", json={"image": "x"})
    assert r.status_code == 422 and "missing field 'images'" in r.json()["detail"]
    two = [("file", ("a.jpg", jpeg_bytes(rng, 20, 20), "image/jpeg"))] * 2
    r = client.post("/predict/batch", files=[*two, ("images", ("c.jpg", b"abc", "image/jpeg"))])
    assert r.status_code == 422 and "unexpected field 'images' in the form" in r.json()["detail"]
    r = client.post("/predict/batch", files=two, data={"note": "x"})
    assert r.status_code == 422 and "unexpected field 'note' in the form" in r.json()["detail"]
    r = client.post("/predict/batch", files=two, data={f"x{i}": "1" for i in range(13)})  # 4 images + 8: 12 fields
    assert r.status_code == 413 and "too many parts in the form" in r.json()["detail"]


def test_health_docs_and_page(served):
    client, _ = served
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["experts"] == ["m"] and h["thresholds"]["t_fake"] == 0.7
    assert h["max_batch_images"] == 4
    assert h["stage1"] == {"max_side": 0, "face_crop": "none", "face_margin": 1.3, "face_policy": "whole",
                           "max_pixels": Stage1().max_pixels, "min_side": 16}  # the checkpoints', not a setting
    assert (h["max_pixels"], h["min_side"]) == (100_000_000, 16)  # the model's limits: stage 1's and the CLI's
    assert h["inputs"] == {"m": {"mode": "resize", "size": 32}}
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]["/predict"]["post"]["requestBody"]["content"]) == {"application/json",
                                                                               "multipart/form-data"}
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="score"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_the_schema_states_the_enforced_limits(served):
    """The request schema carries the limits the server enforces (tests/test_api_fuzz.py holds the server to
    it); every 4xx an endpoint can answer is documented with the error body."""
    client, _ = served
    spec = client.get("/openapi.json").json()
    ops = {path: spec["paths"][path]["post"] for path in ("/predict", "/predict/batch", "/explain")}
    single = ops["/predict"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["image"]
    assert single["minLength"] == 1 and single["maxLength"] == 64 * 1024 * 3 // 2 + 1024
    assert "64 KB" in single["description"]  # max_bytes = 64 KB, as the fixture sets it
    batch = ops["/predict/batch"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["images"]
    assert (batch["minItems"], batch["maxItems"]) == (1, 4) and "minLength" not in batch["items"]  # per-item errors
    form = ops["/predict/batch"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["file"]
    assert (form["minItems"], form["maxItems"]) == (1, 4)
    for path, op in ops.items():
        form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert (set(form["properties"]), form["required"], form["additionalProperties"]) == ({"file"}, ["file"], False)
        assert {"200", "400", "411", "413", "415", "422"} <= set(op["responses"]), path
        assert op["responses"]["413"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].startswith("#/components")
    assert spec["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Health"}


def test_a_rank_card_is_refused_for_serving(tmp_path, capsys):
    """combine: rank scores an image by its rank in the batch: served, one user's score would depend on
    the other requests batched with it. The service, the app and `dfpipe serve` refuse it at load time."""
    from fastapi.testclient import TestClient

    from dfpipe.cli import main
    from dfpipe.serve.api import ServeSettings, create_app
    from dfpipe.serve.service import ServeError, load_ensemble

    models, card = make_card(tmp_path, tta=("identity",), combine="rank")
    words = [str(card), "combine 'rank' cannot be served", "ensemble_predict.combine: mean_prob, mean_logit or stack"]
    with pytest.raises(ServeError) as err:
        load_ensemble(card, models, "cpu", serving=True)
    assert all(w in str(err.value) for w in words)
    assert load_ensemble(card, models, "cpu").combine == "rank"  # dfpipe predict / scan still score with it
    settings = ServeSettings(models_dir=str(models), card=str(card), device="cpu")
    with pytest.raises(ServeError, match="cannot be served"):
        create_app(settings, Ensemble.from_card(card, models, torch.device("cpu")))
    with pytest.raises(ServeError, match="cannot be served"), TestClient(create_app(settings)):
        pass  # the lifespan (service start-up) loads the card and refuses it
    assert main(["serve", "--port", "1", "--models", str(models), "--card", str(card), "--device", "cpu"]) == 2
    err_line = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dfpipe: error: ")]
    assert len(err_line) == 1 and all(w in err_line[0] for w in words)


def test_explain_returns_the_score_and_a_heatmap_overlay(served, rng):
    client, ens = served
    data = jpeg_bytes(rng, 60, 90)
    r = client.post("/explain", files={"file": ("a.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["result"] == pytest.approx(float(ens.score_images([decode_image(data)])[0]), abs=1e-6)
    png = base64.b64decode(body["heatmap"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (90, 60)  # the stage-1 image: no face crop, no max_side
    assert body["heatmap_region"] == "whole image" and body["heatmap_size"] == [90, 60]
    assert body["heatmap_scale"] > 0  # a random net still reacts to blurring some region


def test_occlusion_map_finds_the_region_the_score_depends_on(rng):
    from dfpipe.serve.explain import occlusion_map, overlay

    def detail_top_left(images):  # a "detector" that only looks at fine detail in the top-left 16 x 16
        return np.array([np.abs(np.diff(im[:16, :16].astype(float), axis=1)).mean() / 255 for im in images])

    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # noise: blurring removes detail everywhere
    score, heat = occlusion_map(detail_top_left, img, grid=8)
    assert score == pytest.approx(detail_top_left([img])[0]) and heat.shape == (64, 64)
    assert heat[:16, :16].mean() > 0 and np.abs(heat[32:, 32:]).max() == 0
    rgb, scale = overlay(img, heat)
    assert rgb.shape == img.shape and scale == pytest.approx(heat.max())
    np.testing.assert_array_equal(rgb[40:, 40:], img[40:, 40:])  # no evidence there: image untouched


def test_occlusion_map_of_a_large_stage1_image_is_scored_in_chunks(rng, monkeypatch):
    """Native-resolution stage-1 images: the occluded copies are scored a few at a time (bounded memory),
    with the same map; the map has the image's own (non-square) shape."""
    from dfpipe.serve import explain

    calls = []

    def mean_of_left_half(images):
        calls.append(len(images))
        return np.array([im[:, : im.shape[1] // 2].mean() / 255 for im in images])

    img = rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)
    score, heat = explain.occlusion_map(mean_of_left_half, img, grid=4, fill="mean")
    monkeypatch.setattr(explain, "CHUNK_PIXELS", 2 * 45 * 70)
    calls.clear()
    score2, heat2 = explain.occlusion_map(mean_of_left_half, img, grid=4, fill="mean")
    assert calls == [1, 2, 2, 2, 2, 1] and score2 == score and heat.shape == (45, 70)
    np.testing.assert_array_equal(heat2, heat)
    assert np.abs(heat[:, 52:]).max() == 0 and np.abs(heat[:, :18]).min() > 0  # the last cell (x 52..70) is right only


def test_micro_batcher_batches_concurrent_requests_and_keeps_order():
    import time

    from dfpipe.serve.service import MicroBatcher

    def slow_mean(images):  # stands for a model call; the sleep lets requests queue up
        time.sleep(0.02)
        return np.array([float(im.mean()) for im in images])

    async def go():
        b = MicroBatcher(slow_mean, max_batch=8)
        await b.start()
        imgs = [np.full((4, 4, 3), i, dtype=np.uint8) for i in range(20)]
        out = await asyncio.gather(*(b.score([im]) for im in imgs))
        await b.stop()
        return out, b.batch_sizes

    out, sizes = asyncio.run(go())
    assert [o[0] for o in out] == list(range(20))
    assert sum(sizes) == 20 and max(sizes) > 1 and max(sizes) <= 8


def test_app_factory_reads_its_settings_from_the_environment(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from dfpipe.serve.api import app_from_env

    models, card = make_card(tmp_path, tta=("identity",))
    monkeypatch.setenv("DFPIPE_MODELS", str(models))
    monkeypatch.setenv("DFPIPE_CARD", str(card))
    monkeypatch.setenv("DFPIPE_DEVICE", "cpu")
    monkeypatch.setenv("DFPIPE_MAX_BYTES", "1000")
    with TestClient(app_from_env()) as client:
        h = client.get("/health").json()
        assert h["tta"] == ["identity"] and h["max_bytes"] == 1000
        r = client.post("/predict", files={"file": ("a.jpg", b"\xff" * 1001, "image/jpeg")})
        assert r.status_code == 413
