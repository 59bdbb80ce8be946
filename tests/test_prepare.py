import json

import numpy as np
import pandas as pd
import pytest

from conftest import photo_like, write_jpeg
from dfpipe.config import PrepareConfig
from dfpipe.data.labels import LabelError
from dfpipe.data.prepare import prepare
from dfpipe.data.samples import load_manifest


def make_layout(root, rng, n=6, bad=True):
    """A tiny competition layout with a few bad inputs. Returns the expected skips {file: reason}."""
    rows = {"train": [], "val": []}
    for split, folder in (("train", "trainset"), ("val", "valset")):
        for i in range(n):
            name = f"{split}_{i}.jpg"
            write_jpeg(root / folder / name, photo_like(rng, 60 + 10 * i, 80))
            rows[split].append((name, i % 2))
    for i in range(3):
        write_jpeg(root / "testset" / f"t{i}.jpg", photo_like(rng))
    expected = {}
    if bad:
        (root / "trainset" / "empty.jpg").write_bytes(b"")
        rows["train"].append(("empty.jpg", 1))
        expected["trainset/empty.jpg"] = "empty file"
        (root / "trainset" / "text.jpg").write_text("not an image")
        rows["train"].append(("text.jpg", 0))
        expected["trainset/text.jpg"] = "not an image"
        rows["train"].append(("missing.jpg", 0))
        expected["trainset/missing.jpg"] = "listed in labels but file missing"
        good = (root / "testset" / "t0.jpg").read_bytes()
        (root / "testset" / "t_trunc.jpg").write_bytes(good[: len(good) // 3])
        expected["testset/t_trunc.jpg"] = "corrupt or truncated image"
    for split, fname in (("train", "trainset_label.txt"), ("val", "valset_label.txt")):
        pd.DataFrame(rows[split], columns=["img_name", "target"]).to_csv(root / fname, index=False)
    return expected


def test_prepare_caches_images_and_reports_bad_ones(tmp_path, rng):
    raw = tmp_path / "raw"
    expected = make_layout(raw, rng)
    cfg = PrepareConfig(data_root=str(raw), out_dir=str(tmp_path / "prep"), report=str(tmp_path / "rep.json"),
                        duplicates=str(tmp_path / "dup.csv"), cache_size=32, workers=2)
    report = prepare(cfg)
    man = load_manifest(cfg.out_dir)
    assert (man.groupby("split").size().to_dict()) == {"train": 6, "val": 6, "test": 3}
    for split in ("train", "val", "test"):
        arr = np.load(tmp_path / "prep" / f"{split}.npy", mmap_mode="r")
        sub = man[man.split == split]
        assert arr.shape == (len(sub), 32, 32, 3) and arr.dtype == np.uint8
        assert sorted(sub.cache_index) == list(range(len(sub)))
    # every bad input is reported once, with the expected reason, and nothing good is lost
    skipped = {s["file"].split("raw/")[1]: s["reason"] for s in report["skipped"]}
    assert skipped.keys() == expected.keys()
    for f, reason in expected.items():
        assert skipped[f].startswith(reason), (f, skipped[f])
    assert report["n_skipped"] == 4 and sum(report["skipped_by_reason"].values()) == 4
    assert json.loads((tmp_path / "rep.json").read_text())["n_images"] == {"train": 6, "val": 6, "test": 3}
    # the failed test image keeps a row (for the submission) with its reason
    full = load_manifest(cfg.out_dir, ok_only=False)
    trunc = full[full.img_name == "t_trunc.jpg"].iloc[0]
    assert trunc.cache_index == -1 and "truncated" in trunc.error


def test_prepare_cache_pixels_match_decode(tmp_path, rng):
    raw = tmp_path / "raw"
    make_layout(raw, rng, bad=False)
    cfg = PrepareConfig(data_root=str(raw), out_dir=str(tmp_path / "p"), report=str(tmp_path / "r.json"),
                        duplicates=str(tmp_path / "dup.csv"), cache_size=48, workers=1)
    prepare(cfg)
    man = load_manifest(cfg.out_dir)
    from dfpipe.data.images import decode_image, resize_square

    row = man[man.img_name == "val_3.jpg"].iloc[0]
    cached = np.load(tmp_path / "p" / "val.npy")[row.cache_index]
    np.testing.assert_array_equal(cached, resize_square(decode_image(row.path), 48))
    # a rerun gives byte-identical outputs (deterministic stage)
    before = (tmp_path / "p" / "train.npy").read_bytes()
    prepare(cfg)
    assert (tmp_path / "p" / "train.npy").read_bytes() == before


def test_bad_label_file_is_a_clear_error(tmp_path, rng):
    raw = tmp_path / "raw"
    make_layout(raw, rng, bad=False)
    (raw / "trainset_label.txt").write_text("img_name,target\ntrain_0.jpg,1\ntrain_0.jpg,0\n")
    cfg = PrepareConfig(data_root=str(raw), out_dir=str(tmp_path / "p"), report=str(tmp_path / "r.json"),
                        duplicates=str(tmp_path / "dup.csv"))
    with pytest.raises(LabelError, match="trainset_label.txt:3: duplicate"):
        prepare(cfg)
    assert not (tmp_path / "p").exists()  # nothing half-written


def test_one_class_only_is_refused(tmp_path, rng):
    raw = tmp_path / "raw"
    make_layout(raw, rng, bad=False)
    for f in ("trainset_label.txt", "valset_label.txt"):
        df = pd.read_csv(raw / f)
        df["target"] = 0
        df.to_csv(raw / f, index=False)
    cfg = PrepareConfig(data_root=str(raw), out_dir=str(tmp_path / "p"), report=str(tmp_path / "r.json"),
                        duplicates=str(tmp_path / "dup.csv"))
    with pytest.raises(ValueError, match="one class only"):
        prepare(cfg)


def test_missing_data_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_root"):
        prepare(PrepareConfig(data_root=str(tmp_path / "nope")))


def _cfg(tmp_path, raw, **kw) -> PrepareConfig:
    return PrepareConfig(data_root=str(raw), out_dir=str(tmp_path / "p"), report=str(tmp_path / "r.json"),
                         duplicates=str(tmp_path / "dup.csv"), cache_size=48, **kw)


def test_duplicates_across_splits_are_reported_and_grouped(tmp_path, rng):
    raw = tmp_path / "raw"
    make_layout(raw, rng, bad=False)
    src = raw / "trainset" / "train_2.jpg"
    (raw / "testset" / "leak_exact.jpg").write_bytes(src.read_bytes())
    from dfpipe.data.images import decode_image

    write_jpeg(raw / "testset" / "leak_reenc.jpg", decode_image(src), quality=60)
    report = prepare(_cfg(tmp_path, raw, workers=2))
    dup = pd.read_csv(tmp_path / "dup.csv")
    assert list(dup.columns[:5]) == ["a", "b", "split_a", "split_b", "distance"]
    pairs = {frozenset(p): k for p, k in zip(zip(dup.a, dup.b), dup.kind)}
    assert pairs[frozenset(("train/train_2.jpg", "test/leak_exact.jpg"))] == "exact"
    assert frozenset(("train/train_2.jpg", "test/leak_reenc.jpg")) in pairs
    counts = report["duplicates"]["pairs"]
    assert counts["train_test"] == 2 and counts["within_test"] == 1 and counts["train_val"] == 0
    assert json.loads((tmp_path / "r.json").read_text())["duplicates"]["n_exact_pairs"] == 1
    man = load_manifest(tmp_path / "p")
    g = man.set_index("uid").dup_group
    assert g["train/train_2.jpg"] == g["test/leak_exact.jpg"] == g["test/leak_reenc.jpg"]
    others = man[~man.uid.isin(["train/train_2.jpg", "test/leak_exact.jpg", "test/leak_reenc.jpg"])]
    assert others.dup_group.is_unique and not set(others.dup_group) & {g["train/train_2.jpg"]}
    assert man.phash.str.len().eq(16).all() and (man.face == "off").all()


def _face_layout(raw, rng) -> None:
    import skimage.data
    from matplotlib import cbook
    from PIL import Image

    hopper = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    write_jpeg(raw / "trainset" / "astronaut.jpg", skimage.data.astronaut())
    write_jpeg(raw / "trainset" / "noface.jpg", photo_like(rng, 120, 160))
    write_jpeg(raw / "valset" / "hopper.jpg", hopper)
    write_jpeg(raw / "valset" / "noface2.jpg", photo_like(rng, 100, 100))
    for split, fname, rows in (("train", "trainset_label.txt", [("astronaut.jpg", 0), ("noface.jpg", 1)]),
                               ("val", "valset_label.txt", [("hopper.jpg", 1), ("noface2.jpg", 0)])):
        pd.DataFrame(rows, columns=["img_name", "target"]).to_csv(raw / fname, index=False)


@pytest.mark.parametrize("policy", ["whole", "skip"])
def test_face_crop_in_prepare(tmp_path, rng, policy):
    raw = tmp_path / "raw"
    _face_layout(raw, rng)
    report = prepare(_cfg(tmp_path, raw, workers=1, face_crop="haar", face_policy=policy))
    man = load_manifest(tmp_path / "p", ok_only=False).set_index("img_name")
    for name in ("astronaut.jpg", "hopper.jpg"):
        row = man.loc[name]
        assert row.face == "found" and row.face_w > 40 and row.cache_index >= 0, (name, row.face)
    astro = man.loc["astronaut.jpg"]
    assert 150 < astro.face_x + astro.face_w / 2 < 300 and 60 < astro.face_y + astro.face_h / 2 < 170
    noface = man.loc["noface.jpg"]
    if policy == "skip":
        assert noface.face == "skipped" and noface.cache_index == -1 and "no face" in noface.error
        assert report["faces"]["skipped"] == 2 and report["n_skipped"] == 2
    else:
        assert noface.face == "none" and noface.cache_index >= 0 and noface.face_x == -1
        assert report["faces"]["none"] == 2 and report["n_skipped"] == 0
    assert report["faces"]["found"] == 2


def test_bad_face_settings_are_clear_errors(tmp_path, rng):
    raw = tmp_path / "raw"
    make_layout(raw, rng, bad=False)
    with pytest.raises(ValueError, match="face_crop"):
        prepare(_cfg(tmp_path, raw, face_crop="retina"))
    with pytest.raises(ValueError, match="face_policy"):
        prepare(_cfg(tmp_path, raw, face_crop="haar", face_policy="biggest"))
    with pytest.raises(ValueError, match="dup_max_distance"):
        prepare(_cfg(tmp_path, raw, dup_max_distance=65))
