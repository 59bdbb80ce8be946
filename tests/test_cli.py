"""The ``dfpipe`` command line: predict, scan (CSV rows for good and bad images, resume) and its errors."""

import csv
import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from conftest import photo_like, write_jpeg
from test_serve_api import THRESHOLDS, expected_verdict, make_card

from dfpipe.cli import main
from dfpipe.ensemble_predict import Ensemble


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    models, card = make_card(tmp_path_factory.mktemp("cli"))
    return ["--models", str(models), "--card", str(card), "--device", "cpu"]


@pytest.fixture
def folder(tmp_path, rng):
    """3 good JPEGs (one nested), a corrupt .jpg, an empty .png and a text file that is no image."""
    root = tmp_path / "in"
    for rel, (h, w) in {"a.jpg": (60, 80), "sub/b.jpg": (40, 40), "sub/deeper/c.jpg": (90, 50)}.items():
        write_jpeg(root / rel, photo_like(rng, h, w))
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def ref(card) -> Ensemble:
    """The same ensemble loaded directly: what the CLI's numbers must equal."""
    return Ensemble.from_card(card[3], card[1], torch.device("cpu"))


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_scan_writes_a_row_per_image_with_scores_verdicts_and_errors(card, ref, folder, tmp_path, capsys):
    out = tmp_path / "results.csv"
    assert main(["scan", str(folder), "--out", str(out), "--workers", "0", *card]) == 0
    rows = {r["path"]: r for r in _rows(out)}
    assert sorted(rows) == ["a.jpg", "empty.png", "sub/b.jpg", "sub/broken.jpg", "sub/deeper/c.jpg"]
    good = ["a.jpg", "sub/b.jpg", "sub/deeper/c.jpg"]
    want, _ = ref.score_files([folder / p for p in good], workers=0)
    for p, w in zip(good, want):
        assert float(rows[p]["score"]) == pytest.approx(w, abs=1e-6)
        assert rows[p]["verdict"] == expected_verdict(float(rows[p]["score"])) and rows[p]["error"] == ""
    assert rows["empty.png"]["verdict"] == "error" and "empty" in rows["empty.png"]["error"]
    assert rows["sub/broken.jpg"]["verdict"] == "error" and rows["sub/broken.jpg"]["score"] == ""
    assert "3 scored" in capsys.readouterr().out


def test_scan_decoding_on_the_device_gives_the_same_rows(card, folder, tmp_path):
    """--decode device (batched torchvision decode; nvJPEG on a GPU, libjpeg-turbo here) scores plain JPEGs
    as the workers do, and still reports the broken and empty files."""
    a, b = tmp_path / "workers.csv", tmp_path / "device.csv"
    assert main(["scan", str(folder), "--out", str(a), "--workers", "0", *card]) == 0
    assert main(["scan", str(folder), "--out", str(b), "--workers", "0", "--decode", "device", *card]) == 0
    ra, rb = ({r["path"]: r for r in _rows(x)} for x in (a, b))
    assert sorted(ra) == sorted(rb)
    for p in ra:
        assert ra[p]["verdict"] == rb[p]["verdict"]
        if ra[p]["score"]:
            assert float(rb[p]["score"]) == pytest.approx(float(ra[p]["score"]), abs=1e-3)


def test_scan_resumes_after_a_kill_without_duplicates(card, folder, tmp_path, capsys):
    out = tmp_path / "results.csv"
    assert main(["scan", str(folder), "--out", str(out), "--workers", "0", *card]) == 0
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:7])  # header + 2 rows + a row cut short by the kill
    assert main(["scan", str(folder), "--out", str(out), "--workers", "0", *card]) == 0
    resumed = _rows(out)
    assert len(resumed) == 5 and len({r["path"] for r in resumed}) == 5
    assert sorted(out.read_text().splitlines()) == sorted(full.splitlines())  # the same rows
    (folder / "new.jpg").write_bytes((folder / "a.jpg").read_bytes())
    assert main(["scan", str(folder), "--out", str(out), "--workers", "0", *card]) == 0
    rows = {r["path"]: r for r in _rows(out)}
    assert len(_rows(out)) == 6 and rows["new.jpg"]["score"] == rows["a.jpg"]["score"] != ""
    # rows that ended in an error are tried again (a file fixed meanwhile gets its score); the others stay
    (folder / "sub" / "broken.jpg").write_bytes((folder / "a.jpg").read_bytes())
    (folder / "empty.png").unlink()
    assert main(["scan", str(folder), "--out", str(out), "--workers", "0", *card]) == 0
    rows = {r["path"]: r for r in _rows(out)}
    assert len(_rows(out)) == 5 and rows["sub/broken.jpg"]["score"] == rows["a.jpg"]["score"]
    assert main(["scan", str(folder), "--out", str(out), *card]) == 0
    assert "nothing to do" in capsys.readouterr().out and len(_rows(out)) == 5


def test_a_rerun_with_another_model_scores_every_row_again(card, folder, tmp_path):
    """Issue 25: the CSV had no model column, so after retraining a rerun said "nothing to do" and kept the old
    scores. Each row names its model (experts and card digest); rows of another model, or of a scan written before
    the column existed, are scored again."""
    from dfpipe.serve.service import card_model_id

    out = tmp_path / "results.csv"
    assert main(["scan", str(folder), "--out", str(out), "--workers", "0", *card]) == 0
    first = {r["path"]: r for r in _rows(out)}
    assert {r["model"] for r in first.values()} == {card_model_id(card[3])} and "@" in card_model_id(card[3])
    models, other = make_card(tmp_path / "retrained", thresholds={**THRESHOLDS, "t_decision": 0.6})
    args = ["--models", str(models), "--card", str(other), "--device", "cpu"]
    assert card_model_id(other) != card_model_id(card[3])
    assert main(["scan", str(folder), "--out", str(out), "--workers", "0", *args]) == 0
    again = {r["path"]: r for r in _rows(out)}
    assert sorted(again) == sorted(first) and {r["model"] for r in again.values()} == {card_model_id(other)}
    # a scan CSV of the former four columns: read, rewritten with the model column, every row scored again
    old = tmp_path / "old.csv"
    old.write_text("path,score,verdict,error\na.jpg,0.5,uncertain,\n")
    assert main(["scan", str(folder), "--out", str(old), "--workers", "0", *card]) == 0
    assert old.read_text().splitlines()[0] == "path,score,verdict,error,model"
    assert {r["path"] for r in _rows(old)} == set(first) and all(r["model"] for r in _rows(old))


def test_scan_and_predict_face_crop_as_the_checkpoint_says(tmp_path, capsys):
    """The face crop comes from the checkpoints' preprocessing record, not from a command-line option."""
    from skimage import data

    from dfpipe.data.faces import apply_face_crop
    from dfpipe.data.images import decode_image
    from dfpipe.data.preprocess import Stage1

    models, face_card = make_card(tmp_path / "face", tta=("identity",), stage1=Stage1(face_crop="haar"))
    args = ["--models", str(models), "--card", str(face_card), "--device", "cpu"]
    ens = Ensemble.from_card(face_card, models, torch.device("cpu"))
    write_jpeg(tmp_path / "in" / "astronaut.jpg", data.astronaut())  # bundled photograph with one face
    out = tmp_path / "faces.csv"
    assert main(["scan", str(tmp_path / "in"), "--out", str(out), "--workers", "0", *args]) == 0
    whole = decode_image(tmp_path / "in" / "astronaut.jpg")
    crop, found = apply_face_crop(whole, "haar", 1.3, "whole")
    assert found.status == "found" and crop.shape[0] < whole.shape[0]
    want, without = ens.score_prepared([crop, whole])
    assert float(_rows(out)[0]["score"]) == pytest.approx(want, abs=1e-6)
    assert abs(want - without) > 1e-4  # so the row really is the face's score
    capsys.readouterr()
    assert main(["predict", "--json", str(tmp_path / "in" / "astronaut.jpg"), *args]) == 0
    assert json.loads(capsys.readouterr().out)[0]["score"] == pytest.approx(want, abs=1e-6)
    with pytest.raises(SystemExit) as exc:  # nothing the experts were trained with is retyped on a command line
        main(["scan", str(tmp_path / "in"), "--out", str(out), "--face-crop", "haar", *args])
    assert exc.value.code == 2 and "--face-crop" in capsys.readouterr().err


def test_predict_prints_scores_and_json(card, ref, folder, capsys):
    a, b = folder / "a.jpg", folder / "sub" / "b.jpg"
    assert main(["predict", str(a), str(b), *card]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    want, _ = ref.score_files([a, b], workers=0)
    for line, w in zip(lines, want):
        path, score, verdict = line.split("\t")
        assert float(score) == pytest.approx(w, abs=1e-4) and verdict == expected_verdict(w)
    assert main(["predict", "--json", str(a), *card]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["path"] == str(a) and row["score"] == pytest.approx(want[0], abs=1e-6) and row["error"] is None


def test_predict_unreadable_image_is_one_line_and_nonzero(card, folder, capsys):
    assert main(["predict", str(folder / "a.jpg"), str(folder / "sub" / "broken.jpg"), *card]) == 1
    cap = capsys.readouterr()
    assert len(cap.out.strip().splitlines()) == 1  # the good image is still scored
    (err,) = cap.err.strip().splitlines()
    assert err.startswith("dfpipe: error: ") and "broken.jpg" in err


@pytest.mark.parametrize("case", ["no models", "no card", "bad card", "empty folder", "not a scan csv", "serve no card"])
def test_clear_one_line_errors(case, card, folder, tmp_path, capsys):
    args = {"no models": ["predict", str(folder / "a.jpg"), "--models", str(tmp_path / "nope"), "--card", card[3]],
            "no card": ["predict", str(folder / "a.jpg"), "--models", card[1], "--card", str(tmp_path / "x.json")],
            "bad card": ["predict", str(folder / "a.jpg"), "--models", card[1], "--card", str(folder / "notes.txt")],
            "empty folder": ["scan", str(tmp_path / "empty"), "--out", str(tmp_path / "r.csv"), *card],
            "not a scan csv": ["scan", str(folder), "--out", str(folder / "notes.txt"), *card],
            "serve no card": ["serve", "--port", "1", "--models", card[1], "--card", str(tmp_path / "x.json")]}[case]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main(args) == 2  # a user error: one line, exit 2 as for the stage scripts
    (err,) = capsys.readouterr().err.strip().splitlines()
    words = {"no models": "model folder not found", "no card": "ensemble card not found", "bad card": "not a JSON",
             "empty folder": "no images", "not a scan csv": "not a scan CSV",
             "serve no card": "ensemble card not found"}[case]
    assert err.startswith("dfpipe: error: ") and words in err


def test_console_script_is_registered_and_runs():
    (ep,) = entry_points(group="console_scripts", name="dfpipe")
    assert ep.value == "dfpipe.cli:main"
    r = subprocess.run([sys.executable, "-m", "dfpipe.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "scan" in r.stdout and "serve" in r.stdout


@pytest.mark.parametrize("case", ["scan out is a folder", "predict a missing file", "predict a folder"])
def test_bad_inputs_fail_before_the_models_load(case, card, folder, tmp_path, capsys, monkeypatch):
    """Issue 25: `scan --out DIR` was an IsADirectoryError traceback, and `predict` loaded the models (seconds)
    before finding that an input is missing or a folder ("Is a directory", no hint). Now one line, exit 2, and the
    models are never loaded."""
    from dfpipe.serve import service

    def no_loading(*a, **k):
        raise AssertionError("the models were loaded before the inputs were checked")

    monkeypatch.setattr(service, "load_ensemble", no_loading)
    (tmp_path / "outdir").mkdir()
    args, words = {
        "scan out is a folder": (["scan", str(folder), "--out", str(tmp_path / "outdir"), *card],
                                 ["is a folder", str(tmp_path / "outdir" / "scan.csv")]),
        "predict a missing file": (["predict", str(folder / "a.jpg"), str(tmp_path / "nope.jpg"), *card],
                                   ["not found", "nope.jpg"]),
        "predict a folder": (["predict", str(folder), *card], ["a folder", "dfpipe scan"]),
    }[case]
    assert main(args) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("dfpipe: error: ") and all(w in err for w in words), err
