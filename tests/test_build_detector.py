"""bench/build_detector.py: packaging the shipped detector (checksums, size bound, atomic replacement) and its
model card's numbers, which are read from the grids, never typed."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from dfpipe.errors import ConfigError

BUILD = Path(__file__).resolve().parents[1] / "bench" / "build_detector.py"


def _build():
    spec = importlib.util.spec_from_file_location("build_detector", BUILD)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(tmp_path, payload=b"weights" * 100):
    models = tmp_path / "models"
    (models / "artifact").mkdir(parents=True)
    (models / "artifact" / "best.pt").write_bytes(payload)
    card = tmp_path / "ensemble.json"
    card.write_text(json.dumps({"experts": [{"name": "artifact", "checkpoint": "artifact/best.pt",
                                             "sha256": hashlib.sha256(payload).hexdigest()}]}))
    return card, models


def test_package_copies_the_checked_experts_and_replaces_the_folder_whole(tmp_path):
    build = _build()
    card, models = _cell(tmp_path)
    out = tmp_path / "assets" / "detector"
    out.mkdir(parents=True)
    (out / "stale.pt").write_bytes(b"old")  # a former build's file: gone after the new one
    size = build.package(card, models, out, "# card\n")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "MODEL_CARD.md", "artifact/best.pt", "ensemble.json"]
    assert (out / "ensemble.json").read_bytes() == card.read_bytes()
    assert size == pytest.approx(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20)
    assert not (tmp_path / "assets" / "detector.tmp").exists()


def test_package_refuses_a_checkpoint_that_is_not_the_cards_and_one_over_the_size_bound(tmp_path, monkeypatch):
    build = _build()
    card, models = _cell(tmp_path)
    (models / "artifact" / "best.pt").write_bytes(b"another model")
    out = tmp_path / "detector"
    with pytest.raises(ConfigError, match="best.pt: checkpoint does not match its card's sha256"):
        build.package(card, models, out, "")
    assert not out.exists() and not (tmp_path / "detector.tmp").exists()
    card, models = _cell(tmp_path / "big", payload=b"x" * 3 * 2**20)
    monkeypatch.setattr(build, "MAX_MB", 2.0)
    with pytest.raises(ConfigError, match=r"3\.0 MB, over the 2 MB"):
        build.package(card, models, out, "")
    assert not out.exists()


def _grid(path, cells):
    path.write_text(json.dumps({"spec": {"sources": ["a", "b", "c"]}, "cells": cells}))
    return path


def _loso_cell(recipe, seed, held, auc, tpr):
    train = "+".join(s for s in "abc" if s != held)
    return {"recipe": recipe, "seed": seed, "train_source": train,
            "eval": {held: {"clean": {"auc": auc, "tpr_at_fpr_1e-2": tpr}}}}


def test_loso_rows_average_each_held_out_column_over_the_seeds_of_each_recipe(tmp_path):
    build = _build()
    cells = [_loso_cell("artifact", 0, "a", 0.8, 0.1), _loso_cell("artifact", 1, "a", 0.6, 0.3),
             _loso_cell("baseline", 0, "a", 0.5, 0.0), _loso_cell("artifact", 0, "b", 0.9, 0.5)]
    rows = build.loso_rows(_grid(tmp_path / "grid.json", cells), "artifact", "baseline")
    assert [r["held_out"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["artifact"] == {"auc": pytest.approx(0.7), "seeds": 2, "tpr_at_fpr_1e-2": pytest.approx(0.2)}
    assert rows[0]["baseline"]["auc"] == 0.5 and rows[1]["baseline"] == {"auc": None, "seeds": 0,
                                                                         "tpr_at_fpr_1e-2": None}
    assert rows[2]["artifact"]["auc"] is None  # no cell held c out: a dash in the card, not a zero
    assert build.loso_rows(tmp_path / "missing.json", "artifact", "baseline") == []


def test_the_model_card_states_data_licences_numbers_and_failures_from_its_inputs(tmp_path):
    build = _build()
    result = {"seed": 0, "code": "abc123", "eval": {
        "mean": {"clean": {"auc": 0.0}},
        "a": {"clean": {"auc": 0.912, "auc_ci_low": 0.85, "auc_ci_high": 0.95, "tpr_at_fpr_1e-2": 0.4,
                        "n_real": 10, "n_fake": 12}}}}
    card = {"tta": ["crops4"], "combine": "mean_prob", "thresholds": {"max_fpr": 0.01, "t_fake": 0.71, "t_real": 0.2}}
    rows = build.loso_rows(_grid(tmp_path / "grid.json", [_loso_cell("artifact", 0, "a", 0.8, 0.1),
                                                          _loso_cell("baseline", 0, "a", 0.55, 0.0)]),
                           "artifact", "baseline")
    text = build.model_card("artifact", {"arch": "artifact", "img_size": 128}, result, card,
                            {"dfdc_faces": {"real": 500, "fake": 500}}, rows, "baseline", "g.yaml", "loso/")
    assert "| dfdc_faces | 500 | 500 | DFDC terms (non-commercial research) |" in text
    assert "| a | 22 | 0.912 [0.850, 0.950] | 0.400 |" in text
    assert "| a | 0.800 | 0.100 | 0.550 | 1 |" in text and "| c | - | - | - | 0 |" in text
    assert "likely fake at score >= 0.710" in text and "code abc123" in text
    assert "## Known failures" in text and "research" in text
    alone = build.model_card("baseline", {}, result, card, {}, rows, "baseline", "g.yaml", "loso/")
    assert "| a | 0.550 | 0.000 | 1 |" in alone  # the baseline shipped: its columns once
