"""One preprocessing contract from stage 1 to the API: the same files get the same score from the HTTP API
(``POST /predict``), the CLI (``dfpipe predict`` and ``dfpipe scan``), the stage-5 path (the ensemble
scoring the stage-1 store that ``dfpipe.prepare_data.run`` made of those files) and ``prediction.txt`` (stage
5's test-set scoring and submission writer, the same files listed as the test set), with the face crop on and
off; nothing is retyped on a command line: the checkpoints say how to prepare an image.

The experts are tiny random-weight models whose preprocessing record is written as training writes it:
stage 1's ``store.json`` + the expert's input policy + its normalisation."""

import csv
import json

import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from conftest import layout_in, photo_like, write_jpeg
from matplotlib import cbook
from PIL import Image
from test_serve_api import THRESHOLDS, save_expert

from dfpipe.cli import main
from dfpipe.config import DatasetConfig, PrepareConfig
from dfpipe.data.dataset import StoreDataset
from dfpipe.data.images import decode_image
from dfpipe.prepare_data import run as prepare
from dfpipe.data.preprocess import downscale
from dfpipe.data.samples import load_manifest, load_pool
from dfpipe.data.store import read_store_record
from dfpipe.io import write_json
from dfpipe.ensemble_predict import Ensemble

TOL = 1e-5
FACES = ("astronaut.jpg", "hopper.jpg")  # photographs with one face OpenCV's Haar cascade finds
CASES = {  # name: (stage-1 settings, input mode)
    "face crop": ({"face_crop": "haar", "face_margin": 1.3, "face_policy": "whole"}, "resize"),
    "no face crop": ({"max_side": 200}, "resize_short_crop"),
}


def _files(folder) -> list:
    """Two face photographs (bundled with scikit-image and matplotlib: always there), an image without a
    face (kept whole under face_policy: whole), and a PNG."""
    hopper = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    rng = np.random.default_rng(5)
    write_jpeg(folder / "astronaut.jpg", skimage.data.astronaut())
    write_jpeg(folder / "hopper.jpg", hopper)
    write_jpeg(folder / "noface.jpg", photo_like(rng, 150, 230))
    Image.fromarray(photo_like(rng, 120, 90)).save(folder / "plain.png")
    return sorted(folder.iterdir())


@pytest.fixture(scope="module", params=sorted(CASES))
def world(request, tmp_path_factory):
    """Stage 1 on the files, an expert trained (here: saved) on that store's record, its stage-5 card."""
    settings, mode = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param.replace(" ", "_"))
    (root / "raw" / "imgs").mkdir(parents=True)
    files = _files(root / "raw" / "imgs")
    pd.DataFrame({"img_name": [f.name for f in files], "target": [i % 2 for i in range(len(files))]}
                 ).to_csv(root / "raw" / "labels.csv", index=False)
    layout = layout_in(root, data_root=root / "raw", prepared=root / "prepared", prepare_report=root / "report.json",
                       duplicates=root / "dup.csv")
    cfg = PrepareConfig(workers=1, datasets=[DatasetConfig(name="c", split="train", images="imgs", labels="labels.csv"),
                                             DatasetConfig(name="t", split="test", images="imgs", labels="")],
                        **settings)
    prepare(cfg, layout)
    stage1 = read_store_record(layout.prepared)  # what training reads and writes into the checkpoint
    save_expert(root / "models", "m", stage1, mode=mode, img_size=32)
    ens = Ensemble.load(root / "models", ["m"], ["identity", "hflip"], "mean_prob", torch.device("cpu"))
    write_json(root / "ensemble.json", ens.card(THRESHOLDS))
    ens = Ensemble.from_card(root / "ensemble.json", root / "models", torch.device("cpu"))
    return request.param, root, files, layout, ens


def _card_args(root) -> list[str]:
    return ["--models", str(root / "models"), "--card", str(root / "ensemble.json"), "--device", "cpu"]


def _api_scores(root, files) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from dfpipe.serve.api import ServeSettings, create_app

    settings = ServeSettings(models_dir=str(root / "models"), card=str(root / "ensemble.json"), device="cpu")
    out = {}
    with TestClient(create_app(settings)) as client:
        for f in files:
            r = client.post("/predict", files={"file": (f.name, f.read_bytes(), "application/octet-stream")})
            assert r.status_code == 200, r.text
            out[f.name] = r.json()["result"]
    return out


def _cli_predict_scores(root, files, capsys) -> dict[str, float]:
    capsys.readouterr()
    assert main(["predict", "--json", *map(str, files), *_card_args(root)]) == 0
    return {row["path"].rsplit("/", 1)[1]: row["score"] for row in json.loads(capsys.readouterr().out)}


def _cli_scan_scores(root, files, tmp_path) -> dict[str, float]:
    out = tmp_path / "scan.csv"
    assert main(["scan", str(files[0].parent), "--out", str(out), "--workers", "0", *_card_args(root)]) == 0
    with out.open(newline="") as fh:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(fh)}


def _store_scores(layout, ens) -> dict[str, float]:
    """Stage 5's path: the stage-1 store's images, cut to the experts' input policies in the loader."""
    from torch.utils.data import DataLoader

    pool = load_pool(layout.prepared, splits=("train",))
    loader = DataLoader(StoreDataset(pool, ens.policies), batch_size=3, shuffle=False, num_workers=0)
    scores = ens.combine_experts(ens.score_loader(loader))
    return dict(zip(pool.img_name, map(float, scores)))


def _submission_scores(layout, ens, tmp_path) -> dict[str, float]:
    """What stage 5 writes to prediction.txt for the same files listed as the test set (its own test-set
    scoring and submission writer, then the file read back)."""
    from dfpipe.io import write_csv
    from dfpipe.ensemble_predict import build_submission
    from dfpipe.ensemble_predict.pipeline import _test_set

    test_all, _, test_pool = _test_set(layout.prepared)
    scores = ens.combine_experts(ens.score_pool(test_pool, 3, "score test"))
    write_csv(tmp_path / "prediction.txt", build_submission(test_all, scores, 0.5), float_format="%.6f")
    sub = pd.read_csv(tmp_path / "prediction.txt")
    return dict(zip(sub.img_name, sub.y_pred))


def test_api_cli_and_stage5_give_the_same_score(world, capsys, tmp_path):
    name, root, files, layout, ens = world
    api = _api_scores(root, files)
    by_path = {"CLI predict": _cli_predict_scores(root, files, capsys),
               "CLI scan": _cli_scan_scores(root, files, tmp_path),
               "stage 5 (store)": _store_scores(layout, ens),
               "prediction.txt": _submission_scores(layout, ens, tmp_path)}
    assert sorted(api) == sorted(f.name for f in files)
    for path, scores in by_path.items():
        assert sorted(scores) == sorted(api), path
        for f, want in api.items():
            assert scores[f] == pytest.approx(want, abs=TOL), (name, path, f)


def test_the_face_crop_comes_from_the_checkpoint_and_is_applied(world):
    """A face-crop expert is served face-cropped (its score is not the whole image's); the other is not."""
    name, root, _, layout, ens = world
    api = _api_scores(root, [root / "raw" / "imgs" / f for f in FACES])
    man = load_manifest(layout.prepared)
    man = man[man.split == "train"].set_index("img_name")  # the files are listed as train and as test
    for f in FACES:
        whole = downscale(decode_image(root / "raw" / "imgs" / f), ens.stage1.max_side)
        uncropped = float(ens.score_prepared([whole])[0])  # the whole image through the same input policy
        stage1 = ens.stage1_image(decode_image(root / "raw" / "imgs" / f))
        if name == "face crop":
            assert ens.stage1.face_crop == "haar" and man.loc[f, "face"] == "found"
            assert stage1.shape[0] == stage1.shape[1] < min(whole.shape[:2])  # the square face crop
            assert (man.loc[f, "width"], man.loc[f, "height"]) == (stage1.shape[1], stage1.shape[0])
            assert abs(api[f] - uncropped) > 1e-4, f  # the API really scores the crop
        else:
            assert ens.stage1.face_crop == "none" and stage1.shape == whole.shape and max(whole.shape) == 200
            assert api[f] == pytest.approx(uncropped, abs=TOL)


def test_explain_maps_the_stage1_image(world):
    """/explain scores what /predict scores and draws its map over the stage-1 image (the face crop)."""
    from fastapi.testclient import TestClient

    from dfpipe.serve.api import ServeSettings, create_app

    name, root, _, _, ens = world
    f = root / "raw" / "imgs" / "astronaut.jpg"
    stage1 = ens.stage1_image(decode_image(f))
    settings = ServeSettings(models_dir=str(root / "models"), card=str(root / "ensemble.json"), device="cpu",
                             explain_grid=3)
    with TestClient(create_app(settings)) as client:
        body = client.post("/explain", files={"file": (f.name, f.read_bytes(), "image/jpeg")}).json()
        health = client.get("/health").json()
    assert body["result"] == pytest.approx(float(ens.score_prepared([stage1])[0]), abs=TOL)
    assert body["heatmap_size"] == [stage1.shape[1], stage1.shape[0]]
    assert body["heatmap_region"] == ("face crop" if name == "face crop" else "whole image")
    assert health["stage1"]["face_crop"] == ens.stage1.face_crop and health["stage1"]["max_side"] == ens.stage1.max_side
