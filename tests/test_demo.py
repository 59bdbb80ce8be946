"""The demo dataset generator: layout, labels, names, kinds per split, determinism, image sanity."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dfpipe import demo
from dfpipe.layout import Layout

# the demo writes the catalog's default input layout (paths.train_dir, ...): what the stages read from data_root
SPLITS = {"train": Layout().train_dir, "val": Layout().val_dir, "test": Layout().test_dir}
LABELS = {"train": Layout().train_labels, "val": Layout().val_labels, "test": Layout().test_labels}
SMALL = dict(n_train=24, n_val=8, n_test=8, size_range=(128, 192))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "raw"
    summary = demo.make_demo_dataset(root, seed=0, **SMALL)
    return root, summary


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_label_files(small):
    root, summary = small
    assert not (root / "testset_label.txt").exists()  # the public layout has no test labels
    assert (root / "testset_label_private.txt").is_file()
    assert (root / "demo_manifest.csv").is_file()
    card = json.loads((root / "dataset_card.json").read_text())  # the mark stage 1 carries to the ensemble card
    assert card["demo"] is True and "nothing about real deepfakes" in card["description"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp leftovers
    for split, folder in SPLITS.items():
        label_path = root / LABELS[split]
        assert label_path.read_text(encoding="utf-8").splitlines()[0] == "img_name,target"
        df = pd.read_csv(label_path)
        assert list(df.columns) == ["img_name", "target"]
        assert set(df["target"]) == {0, 1}  # both classes in every split
        assert df["img_name"].is_unique and list(df["img_name"]) == sorted(df["img_name"])
        on_disk = sorted(p.name for p in (root / folder).iterdir())
        assert sorted(df["img_name"]) == on_disk  # every row has a file, every file has a row
        n = SMALL[f"n_{split}"]
        assert len(df) == n == summary["splits"][split]["n"]
        assert df["target"].sum() == n // 2


def test_demo_layout_is_the_catalogs_input_layout():
    assert SPLITS == {"train": "trainset", "val": "valset", "test": "testset"}  # the competition's names
    assert LABELS == {"train": "trainset_label.txt", "val": "valset_label.txt", "test": "testset_label_private.txt"}
    assert demo.SPLIT_DIRS == SPLITS and demo.LABEL_FILES == LABELS


def test_stage1_reads_the_demo_with_the_default_layout(small, tmp_path):
    """Only ``paths.data_root`` points stage 1 at the demo: every other input entry is the default."""
    from conftest import layout_in
    from dfpipe.config import PrepareConfig
    from dfpipe.data.samples import load_manifest
    from dfpipe.prepare_data import run

    root, _ = small
    layout = layout_in(tmp_path, data_root=root)
    report = run(PrepareConfig(workers=1), layout)
    assert report["n_images"] == {s: SMALL[f"n_{s}"] for s in SPLITS} and report["n_skipped"] == 0
    man = load_manifest(layout.prepared)
    for split in ("train", "val"):
        want = pd.read_csv(root / LABELS[split]).set_index("img_name").target
        got = man[man.split == split].set_index("img_name").label
        assert got.sort_index().to_dict() == want.sort_index().to_dict()
    assert (man[man.split == "test"].label == -1).all()  # the private test labels are never read by stage 1
    # issue 25: the demo marks its data, stage 1 records it, stage 5 puts it in the ensemble card
    from dfpipe.data.datacard import read_data_card
    from dfpipe.ensemble_predict.provenance import provenance

    n = {s: (SMALL[f"n_{s}"] - SMALL[f"n_{s}"] // 2, SMALL[f"n_{s}"] // 2) for s in ("train", "val")}
    card = read_data_card(layout.prepared)
    assert card == report["data"] and card["demo"] is True and card["root"] == "raw"
    assert card["by_split"] == {s: {"real": r, "fake": f} for s, (r, f) in n.items()}
    assert card["summary"] == "16 real + 16 fake images of the synthetic demo data (raw)"
    prov = provenance(layout.prepared)
    assert prov["demo"] is True and prov["training_data"] == card
    assert prov["commit"] == "unknown" or len(prov["commit"].removesuffix("-dirty")) == 12


def test_labels_are_readable_by_the_pipeline(small):
    from dfpipe.data.labels import read_labels

    root, _ = small
    for split in SPLITS:
        assert read_labels(root / LABELS[split])["label"].isin([0, 1]).all()


def test_names_are_md5_of_bytes(small):
    root, _ = small
    for folder in SPLITS.values():
        for p in (root / folder).iterdir():
            assert p.suffix == ".jpg"
            assert p.stem == hashlib.md5(p.read_bytes()).hexdigest()


def test_manifest_matches_labels_and_kinds_per_split(small):
    root, _ = small
    man = pd.read_csv(root / "demo_manifest.csv")
    assert {"img_name", "split", "target", "kind", "source"} <= set(man.columns)
    for split in SPLITS:
        part = man[man["split"] == split]
        labels = pd.read_csv(root / LABELS[split])
        merged = labels.merge(part, on="img_name", suffixes=("", "_m"))
        assert len(merged) == len(labels) == len(part)
        assert (merged["target"] == merged["target_m"]).all()
        assert ((merged["kind"] == "real") == (merged["target"] == 0)).all()
        fake_kinds = set(part.loc[part["target"] == 1, "kind"])
        assert fake_kinds == set(demo.FAKE_KINDS[split])  # every kind of the split is present
        assert (part.loc[part["target"] == 1, "region_frac"].between(0.08, 0.5)).all()
    assert set(man.loc[man["kind"] == "upsample", "split"]) == {"test"}
    assert set(man.loc[man["kind"] == "warp", "split"]) == {"val", "test"}


def test_images_decode_rgb_within_size_range(small):
    root, _ = small
    lo, hi = SMALL["size_range"]
    sizes = set()
    for folder in SPLITS.values():
        for p in (root / folder).iterdir():
            with Image.open(p) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                w, h = im.size
                assert lo <= w <= hi and lo <= h <= hi
                sizes.add((w, h))
    assert any(w != h for w, h in sizes)  # not all square


def test_same_seed_identical_bytes_other_seed_differs(small, tmp_path):
    root, _ = small
    again = tmp_path / "again"
    demo.make_demo_dataset(again, seed=0, **SMALL)
    assert _files(again) == _files(root)
    other = tmp_path / "other"
    demo.make_demo_dataset(other, seed=1, **SMALL)
    names0 = {n for n in _files(root) if n.endswith(".jpg")}
    names1 = {n for n in _files(other) if n.endswith(".jpg")}
    assert not names0 & names1


def test_rerun_replaces_previous_demo_but_refuses_foreign_data(tmp_path):
    root = tmp_path / "raw"
    kw = dict(n_train=4, n_val=2, n_test=2, size_range=(64, 80))
    demo.make_demo_dataset(root, seed=3, **kw)
    demo.make_demo_dataset(root, seed=4, **kw)  # own output: replaced, no stale files left behind
    for split, folder in SPLITS.items():
        assert sorted(p.name for p in (root / folder).iterdir()) == sorted(
            pd.read_csv(root / LABELS[split])["img_name"]
        )
    foreign = tmp_path / "competition"
    (foreign / "trainset").mkdir(parents=True)
    (foreign / "trainset" / "x.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        demo.make_demo_dataset(foreign, **kw)
    assert (foreign / "trainset" / "x.jpg").read_bytes() == b"not ours"


def test_fake_differs_from_its_real_counterpart_only_locally():
    """The draws before the manipulation do not depend on the kind, so real and fake share a base image."""
    photos, scenes = demo.build_sources(0)
    for kind in demo.MANIPULATIONS:
        fracs = []
        for index in range(6):
            real, meta_r = demo.make_image(0, "test", index, "real", photos, scenes, (160, 200))
            fake, meta_f = demo.make_image(0, "test", index, kind, photos, scenes, (160, 200))
            same = ("width", "height", "jpeg_quality")
            assert [meta_r[k] for k in same] == [meta_f[k] for k in same]
            a = np.asarray(Image.open(io.BytesIO(real)), dtype=np.float32)
            b = np.asarray(Image.open(io.BytesIO(fake)), dtype=np.float32)
            fracs.append(float((np.abs(a - b).max(axis=2) > 6).mean()))
            assert fracs[-1] < 0.5, (kind, index, fracs[-1])  # a local change, never a global one
            assert abs(a.mean() - b.mean()) < 10, (kind, index)  # no global brightness shift
        assert np.median(fracs) > 0.02, (kind, fracs)  # visible in most images


def test_cli(tmp_path):
    root = tmp_path / "cli"
    rc = demo.main([str(root), "--seed", "2", "--n-train", "4", "--n-val", "2", "--n-test", "2",
                    "--size-min", "64", "--size-max", "72"])
    assert rc == 0
    assert len(list((root / "trainset").glob("*.jpg"))) == 4
    assert demo.main([str(tmp_path / "bad"), "--n-train", "1"]) == 2


def test_auc_by_kind_scores_each_fake_kind_against_the_reals(tmp_path):
    from dfpipe.demo import auc_by_kind

    root = tmp_path / "d"
    demo.make_demo_dataset(root, seed=3, n_train=8, n_val=8, n_test=24, size_range=(64, 80))
    man = pd.read_csv(root / "demo_manifest.csv")
    test = man[man.split == "test"]
    # a scorer that catches only upsampled fakes perfectly and ranks other fakes below all reals
    score = np.where(test.kind == "upsample", 0.9, np.where(test.target == 0, 0.5, 0.1))
    sub = tmp_path / "pred.csv"
    pd.DataFrame({"img_name": test.img_name, "y_pred": score}).to_csv(sub, index=False)
    out = auc_by_kind(root, sub)
    assert out["upsample"] == 1.0
    assert out["blend"] == 0.0 and out["splice"] == 0.0
    assert 0.0 < out["all"] < 1.0
    pd.DataFrame({"img_name": test.img_name[:3], "y_pred": 0.5}).to_csv(sub, index=False)
    with pytest.raises(ValueError, match="have no score"):
        auc_by_kind(root, sub)
