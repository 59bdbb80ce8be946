import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import layout_in, photo_like, write_jpeg
from dfpipe.config import PrepareConfig
from dfpipe.data.labels import LabelError
from dfpipe.layout import Layout
from dfpipe.prepare_data import run
from dfpipe.data.samples import load_manifest
from dfpipe.data.store import StoreReader


def make_layout(root, rng, n=6, bad=True):
    """A tiny competition layout with a few bad inputs. Returns the expected skips {file: reason code}."""
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
        expected["trainset/empty.jpg"] = "empty_file"
        (root / "trainset" / "text.jpg").write_text("not an image")
        rows["train"].append(("text.jpg", 0))
        expected["trainset/text.jpg"] = "not_an_image"
        rows["train"].append(("missing.jpg", 0))
        expected["trainset/missing.jpg"] = "missing_file"
        good = (root / "testset" / "t0.jpg").read_bytes()
        (root / "testset" / "t_trunc.jpg").write_bytes(good[: len(good) // 3])
        expected["testset/t_trunc.jpg"] = "corrupt"
    for split, fname in (("train", "trainset_label.txt"), ("val", "valset_label.txt")):
        pd.DataFrame(rows[split], columns=["img_name", "target"]).to_csv(root / fname, index=False)
    return expected


def test_prepare_stores_images_and_reports_bad_ones(tmp_path, rng):
    raw = tmp_path / "raw"
    expected = make_layout(raw, rng)
    layout = layout_in(tmp_path, data_root=raw, prepared=tmp_path / "prep", prepare_report=tmp_path / "rep.json",
                       duplicates=tmp_path / "dup.csv")
    report = run(PrepareConfig(workers=2), layout)
    man = load_manifest(layout.prepared)
    assert (man.groupby("split").size().to_dict()) == {"train": 6, "val": 6, "test": 3}
    full = load_manifest(layout.prepared, ok_only=False)
    reader = StoreReader()
    for split in ("train", "val", "test"):
        # one shard position per manifest row of the split; a failed image's position holds nothing
        sub = full[full.split == split].reset_index(drop=True)
        assert set(sub.cache_file) == {f"{split}-000000.bin"}
        entries = np.load(tmp_path / "prep" / f"{split}-000000.idx.npy")
        assert len(entries) == len(sub)
        ok = (sub.cache_index >= 0).to_numpy()
        assert (sub.cache_index[ok] == sub.index[ok]).all() and ok.sum() == (man.split == split).sum()
        assert (entries[~ok, 1] == 0).all() and (entries[ok, 1] > 0).all()
        for r in sub[ok].itertuples():  # clean JPEGs are kept byte for byte, at native size
            assert reader.read(tmp_path / "prep" / r.cache_file, r.cache_index) == Path(r.path).read_bytes()
            assert (r.width, r.height) == (r.orig_w, r.orig_h)
    assert report["store"]["n_original"] == 15 and report["store"]["n_png"] == 0
    assert report["store"]["ratio"] == 1.0 and report["store"]["bytes"] == report["store"]["input_bytes"]
    # every bad input is reported once, with the expected reason, and nothing good is lost
    skipped = {s["file"].split("raw/")[1]: s["kind"] for s in report["skipped"]}
    assert skipped == expected
    assert report["n_skipped"] == 4 and report["skipped_by_reason"] == dict.fromkeys(sorted(expected.values()), 1)
    assert json.loads((tmp_path / "rep.json").read_text())["n_images"] == {"train": 6, "val": 6, "test": 3}
    # the failed test image keeps a row (for the submission) with its reason
    full = load_manifest(layout.prepared, ok_only=False)
    trunc = full[full.img_name == "t_trunc.jpg"].iloc[0]
    assert trunc.cache_index == -1 and "truncated" in trunc.error
    # the data card: the labelled images kept per split and class; no dataset card says demo, so not a demo
    from dfpipe.data.datacard import read_data_card

    card = read_data_card(layout.prepared)
    assert card == report["data"] and card["demo"] is False and card["root"] == "raw"
    assert card["by_split"] == {"train": {"real": 3, "fake": 3}, "val": {"real": 3, "fake": 3}}
    assert card["summary"] == "6 real + 6 fake images of raw"


def test_stored_pixels_match_decode_at_native_size(tmp_path, rng):
    raw = tmp_path / "raw"
    make_layout(raw, rng, bad=False)
    cfg, layout = PrepareConfig(workers=1), _layout(tmp_path, raw)
    run(cfg, layout)
    man = load_manifest(layout.prepared)
    from dfpipe.data.images import decode_image

    row = man[man.img_name == "val_3.jpg"].iloc[0]
    stored = StoreReader().image(tmp_path / "p" / row.cache_file, row.cache_index)
    assert stored.shape == (90, 80, 3)  # native (h, w): nothing squashed
    np.testing.assert_array_equal(stored, decode_image(row.path))
    # a rerun gives byte-identical outputs (deterministic stage)
    before = (tmp_path / "p" / "train-000000.bin").read_bytes()
    run(cfg, layout)
    assert (tmp_path / "p" / "train-000000.bin").read_bytes() == before


def test_max_side_downscales_and_stores_lossless(tmp_path, rng):
    from dfpipe.data.images import decode_image
    from dfpipe.data.preprocess import downscale

    raw = tmp_path / "raw"
    make_layout(raw, rng, bad=False)
    report = run(PrepareConfig(workers=1, max_side=64), _layout(tmp_path, raw))
    man = load_manifest(tmp_path / "p")
    big = man[man.img_name == "val_5.jpg"].iloc[0]  # 110 x 80 -> 64 x 47 (aspect kept)
    assert (big.height, big.width) == (64, 47)
    img = StoreReader().image(tmp_path / "p" / big.cache_file, big.cache_index)
    np.testing.assert_array_equal(img, downscale(decode_image(big.path), 64))
    wide = man[man.img_name == "train_0.jpg"].iloc[0]  # 60 x 80 -> 48 x 64
    assert (wide.height, wide.width) == (48, 64)
    assert report["store"]["n_png"] == 15  # every image was shrunk: each is a lossless PNG now
def test_bad_label_file_is_a_clear_error(tmp_path, rng):
    raw = tmp_path / "raw"
    make_layout(raw, rng, bad=False)
    (raw / "trainset_label.txt").write_text("img_name,target\ntrain_0.jpg,1\ntrain_0.jpg,0\n")
    with pytest.raises(LabelError, match="trainset_label.txt:3: duplicate"):
        run(PrepareConfig(), _layout(tmp_path, raw))
    assert not (tmp_path / "p").exists()  # nothing half-written


def test_one_class_only_is_refused(tmp_path, rng):
    raw = tmp_path / "raw"
    make_layout(raw, rng, bad=False)
    for f in ("trainset_label.txt", "valset_label.txt"):
        df = pd.read_csv(raw / f)
        df["target"] = 0
        df.to_csv(raw / f, index=False)
    with pytest.raises(ValueError, match="one class only"):
        run(PrepareConfig(), _layout(tmp_path, raw))


def test_missing_data_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_root .*nope does not exist.*paths.data_root"):
        run(PrepareConfig(), layout_in(tmp_path, data_root=tmp_path / "nope"))
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_layout_names_the_input_folders_and_labels(tmp_path, rng):
    """The competition layout's names are catalog entries (paths.train_dir, ...): a data root with other names
    is read through them, the old names mean nothing there."""
    raw = tmp_path / "raw"
    make_layout(raw, rng, n=4, bad=False)
    for old, new in (("trainset", "tr"), ("valset", "va"), ("testset", "te"), ("trainset_label.txt", "tr.csv"),
                     ("valset_label.txt", "va.csv")):
        (raw / old).rename(raw / new)
    with pytest.raises(LabelError, match="trainset_label.txt: label file not found"):
        run(PrepareConfig(workers=1), _layout(tmp_path, raw))
    layout = dataclasses.replace(_layout(tmp_path, raw), train_dir="tr", val_dir="va", test_dir="te",
                                 train_labels="tr.csv", val_labels="va.csv")
    report = run(PrepareConfig(workers=1), layout)
    man = load_manifest(layout.prepared)
    assert man.groupby("split").size().to_dict() == {"train": 4, "val": 4, "test": 3}
    assert man[man.split == "val"].path.str.startswith(str(raw / "va") + os.sep).all()
    assert report["n_images"] == {"train": 4, "val": 4, "test": 3}


def _layout(tmp_path, raw) -> Layout:
    """Stage 1 reading ``raw``, writing the store to ``p``, the report to ``r.json``, the pairs to ``dup.csv``."""
    return layout_in(tmp_path, data_root=raw, prepared=tmp_path / "p", prepare_report=tmp_path / "r.json",
                     duplicates=tmp_path / "dup.csv")


def test_duplicates_across_splits_are_reported_and_grouped(tmp_path, rng):
    raw = tmp_path / "raw"
    make_layout(raw, rng, bad=False)
    src = raw / "trainset" / "train_2.jpg"
    (raw / "testset" / "leak_exact.jpg").write_bytes(src.read_bytes())
    from dfpipe.data.images import decode_image

    write_jpeg(raw / "testset" / "leak_reenc.jpg", decode_image(src), quality=60)
    report = run(PrepareConfig(workers=2), _layout(tmp_path, raw))
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
    report = run(PrepareConfig(workers=1, face_crop="haar", face_policy=policy), _layout(tmp_path, raw))
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
    layout = _layout(tmp_path, raw)
    with pytest.raises(ValueError, match=r"prepare_data\.face_crop='retina'"):
        run(PrepareConfig(face_crop="retina"), layout)
    with pytest.raises(ValueError, match=r"prepare_data\.face_policy='biggest'"):
        run(PrepareConfig(face_crop="haar", face_policy="biggest"), layout)
    with pytest.raises(ValueError, match=r"prepare_data\.dup_max_distance=65"):
        run(PrepareConfig(dup_max_distance=65), layout)


@pytest.mark.parametrize("key, value, match", [
    ("face_margin", 0.5, r"prepare_data\.face_margin=0\.5: must be >= 1\.0"),
    ("chunk_size", 0, r"chunk_size \(0\) must be >= 1"),
    ("workers", -1, r"workers \(-1\) >= 0"),
    ("dup_max_distance", -1, r"prepare_data\.dup_max_distance=-1: must be in \[0, 64\]"),
])
def test_bad_settings_are_refused_when_params_load(tmp_path, key, value, match):
    """Before stage 1 lists or writes anything: the settings object cannot be made (params load, -S, code)."""
    from dfpipe.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=match):
        from_dict(PrepareConfig, {key: value}, "params.yaml:prepare_data")
    with pytest.raises(ConfigError, match=match):
        PrepareConfig(**{key: value})


def test_work_cuts_chunks_by_its_journal(tmp_path):
    """Decoding and publishing take the chunks from the work dir: the journal's chunk_size, per split in split
    order, items in their order."""
    from dfpipe.prepare_data import Item, Work

    items = [Item(s, f"{s}{i}.jpg", 0, f"/x/{s}{i}.jpg", "d") for s, n in (("test", 1), ("train", 5)) for i in range(n)]
    work = Work.open(tmp_path / "w", {"chunk_size": 2})
    got = [(s, k, [it.img_name for it in c]) for s, k, c in work.chunks(items)]
    assert got == [("train", 0, ["train0.jpg", "train1.jpg"]), ("train", 1, ["train2.jpg", "train3.jpg"]),
                   ("train", 2, ["train4.jpg"]), ("test", 0, ["test0.jpg"])]
    assert [k for _, k, _ in Work.open(tmp_path / "w", {"chunk_size": 5}).chunks(items)] == [0, 0]


# --------------------------------------------------------------------------- resume after a kill
_KILL_AFTER = """
import json, os, signal, sys
import dfpipe.prepare_data as P
from dfpipe.config import PrepareConfig
from dfpipe.layout import Layout
commit, n = P.Work.commit, [0]
def commit_then_die(self, *args):
    commit(self, *args)
    n[0] += 1
    if n[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as with a crash or OOM kill
P.Work.commit = commit_then_die
P.run(PrepareConfig(**json.loads(sys.argv[1])), Layout(**json.loads(sys.argv[2])))
"""


def _outputs(layout: Layout) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(Path(layout.prepared).iterdir())}
    files["report"] = open(layout.prepare_report, "rb").read()
    files["duplicates"] = open(layout.duplicates, "rb").read()
    return files


def _counting_decode(monkeypatch) -> list[str]:
    import dfpipe.prepare_data.pool as P  # the decoding workers' module (in-process with workers=1)

    seen: list[str] = []
    real = P.decode_file

    def decode(path, **kw):
        seen.append(Path(path).name)
        return real(path, **kw)

    monkeypatch.setattr(P, "decode_file", decode)
    return seen


def test_killed_run_resumes_without_redoing_chunks_and_gives_the_same_bytes(tmp_path, rng, monkeypatch):
    raw = tmp_path / "raw"
    make_layout(raw, rng)  # train 8 items (2 fail), val 6, test 4 (1 fails); chunks of 4: 2 + 2 + 1
    ref = PrepareConfig(chunk_size=4, workers=2)
    ref_layout = layout_in(tmp_path / "ref", data_root=raw, prepared=tmp_path / "ref" / "p",
                           prepare_report=tmp_path / "ref/r.json", duplicates=tmp_path / "ref/d.csv")
    run(ref, ref_layout)
    cfg = dataclasses.replace(ref, workers=1)
    layout = layout_in(tmp_path, data_root=raw, prepared=tmp_path / "p", prepare_report=tmp_path / "r.json",
                       duplicates=tmp_path / "d.csv")
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", _KILL_AFTER, json.dumps(dataclasses.asdict(cfg)),
                          json.dumps(dataclasses.asdict(layout)), "3"],
                         cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()[-2000:]
    work = tmp_path / "p.work"
    assert sorted(p.name for p in (work / "chunks").glob("*.csv")) == ["train-000000.csv", "train-000001.csv",
                                                                      "val-000000.csv"]
    assert not (tmp_path / "p").exists() and not (tmp_path / "r.json").exists()
    seen = _counting_decode(monkeypatch)
    run(cfg, layout)
    # only the chunks not committed were decoded again: val_4, val_5 and the test images
    assert sorted(seen) == ["t0.jpg", "t1.jpg", "t2.jpg", "t_trunc.jpg", "val_4.jpg", "val_5.jpg"]
    assert _outputs(layout) == _outputs(ref_layout)  # byte for byte, and whatever the number of workers
    assert not work.exists()


def test_changed_settings_start_afresh(tmp_path, rng, monkeypatch):
    import dfpipe.prepare_data as P

    raw = tmp_path / "raw"
    make_layout(raw, rng, bad=False)
    cfg, layout = PrepareConfig(workers=1, chunk_size=4), _layout(tmp_path, raw)
    commit, calls = P.Work.commit, []

    def commit_then_fail(self, *args):
        commit(self, *args)
        calls.append(args[:2])
        if len(calls) == 2:
            raise KeyboardInterrupt  # an interrupted run: leaves its work dir behind

    monkeypatch.setattr(P.Work, "commit", commit_then_fail)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, layout)
    monkeypatch.setattr(P.Work, "commit", commit)
    assert len(list((tmp_path / "p.work" / "chunks").glob("*.csv"))) == 2
    seen = _counting_decode(monkeypatch)
    (raw / "trainset" / "train_0.jpg").write_bytes((raw / "trainset" / "train_1.jpg").read_bytes())  # input changed
    run(cfg, layout)
    assert len(seen) == 15  # every image again: the old work does not match the inputs any more
    seen.clear()
    monkeypatch.setattr(P.Work, "commit", commit_then_fail)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run(cfg, layout)
    monkeypatch.setattr(P.Work, "commit", commit)
    seen.clear()
    run(dataclasses.replace(cfg, max_side=40), layout)  # a setting that changes the stored images
    man = load_manifest(tmp_path / "p")
    assert len(seen) == 15 and (np.maximum(man.width, man.height) == 40).all()


# --------------------------------------------------------------------------- several datasets
def test_several_datasets_feed_the_splits(tmp_path, rng):
    from dfpipe.config import load_section

    raw = tmp_path / "raw"
    for ds, n in (("ffhq", 3), ("sd", 3)):
        for i in range(n):
            write_jpeg(raw / ds / "img" / f"x{i}.jpg", photo_like(rng, 50, 60))  # same names in both
        pd.DataFrame({"img_name": [f"x{i}.jpg" for i in range(n)], "target": [int(ds == "sd")] * n}).to_csv(
            raw / ds / "labels.csv", index=False)
    for i in range(4):
        write_jpeg(raw / "dev" / f"d{i}.jpg", photo_like(rng, 50, 60))
        write_jpeg(raw / "challenge" / "test" / f"c{i}.jpg", photo_like(rng, 50, 60))
    (raw / "dev" / "labels.txt").write_text("img_name,target\nd0.jpg,0\nd1.jpg,1\nd2.jpg,0\nd3.jpg,1\n")
    (raw / "challenge" / "test_nolabel.txt").write_text("img_name\nc2.jpg\nc0.jpg\nc1.jpg\n")  # c3 not listed
    params = tmp_path / "params.yaml"
    params.write_text(f"""paths:
  data_root: {raw}
  prepared: {tmp_path / 'p'}
  prepare_report: {tmp_path / 'r.json'}
  duplicates: {tmp_path / 'd.csv'}
prepare_data:
  workers: 1
  datasets:
    - {{name: ffhq, split: train, images: ffhq/img, labels: ffhq/labels.csv}}
    - {{name: sd, split: train, images: sd/img, labels: sd/labels.csv}}
    - {{name: dev, split: val, images: dev, labels: dev/labels.txt}}
    - {{name: challenge, split: test, images: challenge/test, labels: challenge/test_nolabel.txt}}
""")
    cfg = load_section(PrepareConfig, "prepare_data", params)
    report = run(cfg, Layout.load(params))
    man = load_manifest(tmp_path / "p")
    train = man[man.split == "train"]
    # two datasets feed train: names are prefixed so they stay unique; one dataset per split keeps its names
    assert list(train.img_name) == ["ffhq/x0.jpg", "ffhq/x1.jpg", "ffhq/x2.jpg", "sd/x0.jpg", "sd/x1.jpg", "sd/x2.jpg"]
    assert list(train.label) == [0, 0, 0, 1, 1, 1] and list(train.dataset) == ["ffhq"] * 3 + ["sd"] * 3
    assert train.path.iloc[3] == str(raw / "sd" / "img" / "x0.jpg") and man.uid.is_unique
    assert list(man.img_name[man.split == "val"]) == ["d0.jpg", "d1.jpg", "d2.jpg", "d3.jpg"]
    assert list(man.img_name[man.split == "test"]) == ["c2.jpg", "c0.jpg", "c1.jpg"]  # the list's order
    assert (man.label[man.split == "test"] == -1).all()
    assert report["unlabelled"] == [str(raw / "challenge" / "test" / "c3.jpg")]
    assert report["datasets"]["sd"] == {"n_listed": 3, "n_images": 3, "n_failed": 0, "n_missing": 0}


@pytest.mark.parametrize("entry, match", [
    ("{name: a, split: train, images: a}", r"datasets\[0\]\.labels is empty"),
    ("{name: a, split: dev, images: a, labels: a.csv}", r"datasets\[0\]\.split='dev'"),
    ("{name: 'a/b', split: test, images: a}", r"datasets\[0\]\.name='a/b'"),
    ("{name: a, split: test, images: nowhere}", r"nowhere: image folder of dataset 'a' not found"),
    ("{name: a, split: test, images: a, labels: gone.txt}", r"gone.txt: label file not found"),
])
def test_bad_dataset_entries_are_clear_errors(tmp_path, rng, entry, match):
    import yaml

    from dfpipe.config import DatasetConfig, from_dict

    (tmp_path / "a").mkdir()
    ds = from_dict(DatasetConfig, yaml.safe_load(entry), "prepare_data.datasets[0]")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run(PrepareConfig(datasets=[ds]), _layout(tmp_path, tmp_path))
