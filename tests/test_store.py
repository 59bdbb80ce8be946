"""The native-resolution image store and the preprocessing contract (dfpipe.data.store / .preprocess)."""

import io
import pickle
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import layout_in, photo_like, write_jpeg
from dfpipe.config import PrepareConfig
from dfpipe.data.dataset import StoreDataset
from dfpipe.data.images import decode_image
from dfpipe.prepare_data import run
from dfpipe.data.preprocess import (InputPolicy, InputSpec, Preprocess, Stage1, downscale, fit, scoring_image,
                                    stage1_from_dict)
from dfpipe.data.samples import load_pool
from dfpipe.data.store import ShardWriter, StoreReader, read_store_record, stored_bytes, write_png_shard
from dfpipe.errors import DataError, InputError


def _prepare(tmp_path, raw, **kw):
    """Stage 1 on ``raw`` with settings ``kw``, the store in ``p``: (its layout, its report)."""
    layout = layout_in(tmp_path, data_root=raw, prepared=tmp_path / "p", prepare_report=tmp_path / "r.json",
                       duplicates=tmp_path / "d.csv")
    return layout, run(PrepareConfig(workers=1, **kw), layout)


def _layout(raw, imgs_by_split: dict) -> None:
    for split, folder in (("train", "trainset"), ("val", "valset")):
        rows = []
        for i, img in enumerate(imgs_by_split[split]):
            write_jpeg(raw / folder / f"{split}{i}.jpg", img, quality=90)
            rows.append((f"{split}{i}.jpg", i % 2))
        pd.DataFrame(rows, columns=["img_name", "target"]).to_csv(raw / f"{folder}_label.txt", index=False)
    (raw / "testset").mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- shards
def test_shard_round_trip_with_gaps_and_clear_errors(tmp_path, rng):
    imgs = [photo_like(rng, 30 + 7 * i, 41) for i in range(3)]
    idx = write_png_shard(tmp_path / "s-000000.bin", [imgs[0], None, imgs[1], imgs[2]])
    assert idx == [0, 1, 2, 3] and not list(tmp_path.glob("*.tmp"))
    reader = StoreReader()
    for k, im in zip((0, 2, 3), imgs):
        np.testing.assert_array_equal(reader.image(tmp_path / "s-000000.bin", k), im)  # lossless, own size
    with pytest.raises(DataError, match="holds no image"):
        reader.read(tmp_path / "s-000000.bin", 1)
    with pytest.raises(DataError, match="no image 9"):
        reader.read(tmp_path / "s-000000.bin", 9)
    with pytest.raises(DataError, match="shard index"):
        reader.read(tmp_path / "missing-000000.bin", 0)
    clone = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker gets: it opens its own files
    np.testing.assert_array_equal(clone.image(tmp_path / "s-000000.bin", 3), imgs[2])


def test_an_aborted_shard_leaves_nothing_under_its_name(tmp_path, rng):
    w = ShardWriter(tmp_path / "a-000000.bin")
    w.add(b"xyz")
    w.abort()
    assert not list(tmp_path.iterdir())


def test_what_is_stored_original_bytes_or_lossless_png(tmp_path, rng):
    from dfpipe.data.images import decode

    img = photo_like(rng, 40, 50)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    raw = buf.getvalue()
    dec = decode(raw)
    assert stored_bytes(raw, dec.format, dec.notes, dec.img, changed=False) == (raw, "original")
    # EXIF-rotated: decode applies the rotation, so the stored image is the upright one, losslessly
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    dec = decode(buf.getvalue())
    assert "exif_rotated" in dec.notes and dec.img.shape[:2] == (50, 40)
    data, how = stored_bytes(buf.getvalue(), dec.format, dec.notes, dec.img, changed=False)
    assert how == "png" and data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode_image(data), dec.img)
    # a face crop or a downscale changes the pixels: the stage-1 image is stored, not the file
    data, how = stored_bytes(raw, "JPEG", (), img[5:30, 5:30], changed=True)
    assert how == "png"
    np.testing.assert_array_equal(decode_image(data), img[5:30, 5:30])


def test_store_record_is_required_and_read_back(tmp_path, rng):
    raw = tmp_path / "raw"
    _layout(raw, {"train": [photo_like(rng, 50, 60) for _ in range(4)], "val": [photo_like(rng, 50, 60)] * 2})
    layout, _ = _prepare(tmp_path, raw, max_side=48, face_margin=1.5)
    assert read_store_record(layout.prepared) == Stage1(max_side=48, face_crop="none", face_margin=1.5)
    with pytest.raises(InputError, match="not a stage-1 image store"):
        read_store_record(tmp_path)


# --------------------------------------------------------------------------- storage at real sizes
def test_storage_of_large_jpegs_is_about_their_size(tmp_path, rng):
    """Issue: on JPEGs of 700-1200 px with the default params, the store is 0.8-1.2x the input bytes (a raw
    uint8 cache at 512 px would be about 6x)."""
    sizes = rng.integers(700, 1201, size=(12, 2))
    imgs = [photo_like(rng, int(h), int(w)) for h, w in sizes]
    raw = tmp_path / "raw"
    _layout(raw, {"train": imgs[:8], "val": imgs[8:]})
    layout, report = _prepare(tmp_path, raw)
    in_bytes = sum(p.stat().st_size for p in raw.rglob("*.jpg"))
    on_disk = sum(p.stat().st_size for p in (tmp_path / "p").glob("*-*.*"))  # shards + their indexes
    assert report["store"]["input_bytes"] == in_bytes
    assert 0.8 <= on_disk / in_bytes <= 1.2, on_disk / in_bytes
    pool = load_pool(layout.prepared)
    first = StoreDataset(pool, [InputPolicy("resize", 32)]).image(0)
    assert first.shape == (int(sizes[0][0]), int(sizes[0][1]), 3)  # every pixel kept


# --------------------------------------------------------------------------- input policies
def test_a_native_image_reaches_a_crop_expert_pixel_for_pixel(tmp_path, rng):
    """Issue: a native 256 px image reaches a 256 px ``crop`` expert pixel for pixel, in training (random
    crop: there is one position) and at test time, through stage 1's store."""
    from dfpipe.train_experts.sampling import SeededAugmentDataset

    imgs = [photo_like(rng, 256, 256) for _ in range(4)]
    raw = tmp_path / "raw"
    _layout(raw, {"train": imgs, "val": imgs[:2]})
    layout, _ = _prepare(tmp_path, raw)
    pool = load_pool(layout.prepared)
    policy = InputPolicy("crop", 256)
    want = decode_image(raw / "trainset" / "train1.jpg")  # the decoded file, nothing else
    k = int(np.flatnonzero(pool.uid == "train/train1.jpg")[0])
    test_time = StoreDataset(pool, [policy])[k][0][policy.key].numpy()
    np.testing.assert_array_equal(test_time, want)
    train_time = SeededAugmentDataset(StoreDataset(pool, [policy]), policy, None)[(k, 12345)][0][policy.key].numpy()
    np.testing.assert_array_equal(train_time, want)
    # a squash to the same size is not the identity on a non-square image, a crop is a window of it
    tall = photo_like(rng, 300, 256)
    np.testing.assert_array_equal(fit(tall, policy), tall[22:278])


def test_crop_policies_random_in_training_central_at_test_time(rng):
    img = photo_like(rng, 200, 300)
    crop = InputPolicy("crop", 64)
    a = fit(img, crop, np.random.default_rng(1))
    b = fit(img, crop, np.random.default_rng(1))
    c = fit(img, crop, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)  # seeded: the same crop again
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(fit(img, crop), img[68:132, 118:182])  # centre
    # resize_short_crop keeps the aspect: the short side becomes the size, then a central square
    rs = fit(img, InputPolicy("resize_short_crop", 100))
    assert rs.shape == (100, 100, 3)
    import cv2
    np.testing.assert_array_equal(rs, cv2.resize(img, (150, 100), interpolation=cv2.INTER_AREA)[:, 25:125])
    # smaller than the size: enlarged (short side = size), never padded
    small = photo_like(rng, 40, 60)
    out = fit(small, crop)
    assert out.shape == (64, 64, 3) and out.std() > 5
    assert fit(img, InputPolicy("resize", 48)).shape == (48, 48, 3)
    with pytest.raises(Exception, match="input mode"):
        InputPolicy("squash", 64)


def test_downscale_only_ever_shrinks(rng):
    img = photo_like(rng, 100, 50)
    assert downscale(img, 0) is img and downscale(img, 100) is img and downscale(img, 400) is img
    assert downscale(img, 40).shape == (40, 20, 3)


def test_scoring_image_applies_stage1_as_prepare_does(tmp_path, rng):
    """The stage-1 image computed for scoring (CLI/API) equals what stage 1 stored, downscale included."""
    imgs = [photo_like(rng, 90, 130) for _ in range(4)]
    raw = tmp_path / "raw"
    _layout(raw, {"train": imgs, "val": imgs[:2]})
    layout, _ = _prepare(tmp_path, raw, max_side=70)
    pool = load_pool(layout.prepared)
    stored = StoreDataset(pool, [InputPolicy("resize", 32)]).image(0)
    path = raw / "trainset" / pool.img_name[0]
    np.testing.assert_array_equal(scoring_image(decode_image(path), read_store_record(layout.prepared)), stored)


def test_preprocess_records_round_trip_and_reject_unknown_keys():
    s1, spec = Stage1(max_side=512, face_crop="haar"), InputSpec(224, "crop", (0.1, 0.2, 0.3), (1, 1, 1))
    assert stage1_from_dict(pickle.loads(pickle.dumps(asdict(s1)))) == s1
    assert InputSpec.from_dict(pickle.loads(pickle.dumps(spec.to_dict()))) == spec
    assert Preprocess(s1, spec).input.policy == InputPolicy("crop", 224)  # the policy is a view of the spec
    with pytest.raises(DataError, match=r"best\.pt: InputSpec record with unknown keys \['jitter'\]"):
        InputSpec.from_dict({**spec.to_dict(), "jitter": 1}, "best.pt")
    with pytest.raises(DataError, match=r"best\.pt: Stage1 record with unknown keys \['face'\]"):
        stage1_from_dict({"face": "haar"}, "best.pt")


# --------------------------------------------------------------------------- the pool of stages 3-5
def test_load_pool_reads_only_the_manifest_columns_it_uses(tmp_path):
    from dfpipe.data.samples import POOL_COLUMNS, load_manifest

    prep, aug = tmp_path / "p", tmp_path / "a"
    prep.mkdir()
    aug.mkdir()
    # stage 1's manifest without dup_group (from before dedup), with columns the pool never uses
    pd.DataFrame({"uid": ["train/a.jpg", "val/b.jpg", "test/c.jpg", "train/d.jpg", "train/e.jpg"],
                  "img_name": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"],
                  "split": ["train", "val", "test", "train", "train"], "label": [0, 1, -1, 1, 1],
                  "path": ["/x/a.jpg", "/x/b.jpg", "/x/c.jpg", "/x/d.jpg", "/x/e.jpg"],
                  "cache_file": ["train-000000.bin", "val-000000.bin", "test-000000.bin", "train-000000.bin",
                                 "train-000001.bin"],
                  "cache_index": [0, 0, 0, -1, 0], "error": ["", "", "", "corrupt", ""],
                  "phash": ["ab", "cd", "ef", "", "01"]}).to_csv(prep / "manifest.csv", index=False)
    pd.DataFrame({"uid": ["aug/x.png"], "img_name": ["x.png"], "label": [1], "source_uid": ["train/a.jpg"],
                  "donor_uid": ["val/b.jpg"], "method": ["splice"], "params": ['{"k": 1}'], "seed": [7],
                  "mask_path": ["masks/x.png"], "cache_file": ["aug-000000.bin"], "cache_index": [0]}
                 ).to_csv(aug / "manifest.csv", index=False)
    pool = load_pool(prep, aug)
    assert list(pool.columns) == POOL_COLUMNS
    assert pool.uid.tolist() == ["train/a.jpg", "val/b.jpg", "train/e.jpg", "aug/x.png"]  # no test, no failed image
    assert pool.cache_path.tolist() == [str(prep / "train-000000.bin"), str(prep / "val-000000.bin"),
                                        str(prep / "train-000001.bin"), str(aug / "aug-000000.bin")]
    assert pool.origin.tolist() == ["train", "val", "train", "aug"] and pool.dup_group.tolist() == [-1] * 4
    assert pool.donor_uid.tolist() == ["", "", "", "val/b.jpg"] and pool.method.tolist()[-2:] == ["original", "splice"]
    assert pool.source_uid.tolist() == ["train/a.jpg", "val/b.jpg", "train/e.jpg", "train/a.jpg"]
    man = load_manifest(prep, columns=("uid", "cache_index", "dup_group"))  # a column the file lacks: left out
    assert list(man.columns) == ["uid", "cache_index"] and len(man) == 4


# --------------------------------------------------------------------------- manifest integrity
def _damage(path, how: str) -> None:
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    if how == "cut_at_row":  # the header and half the rows: parses cleanly, rows silently missing
        path.write_bytes(b"".join(lines[: 1 + (len(lines) - 1) // 2]))
    elif how == "cut_mid_row":
        path.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    else:  # edited in place, same size: one image's label flipped
        row = lines[2].split(b",")
        label = row.index(b"0") if b"0" in row else row.index(b"1")
        row[label] = b"1" if row[label] == b"0" else b"0"
        path.write_bytes(b"".join(lines[:2] + [b",".join(row)] + lines[3:]))
    assert path.read_bytes() != data


@pytest.mark.parametrize("how", ["cut_at_row", "cut_mid_row", "edited"])
def test_a_cut_or_edited_manifest_is_refused_naming_the_file(tmp_path, rng, how):
    from dfpipe.data.samples import load_manifest

    raw = tmp_path / "raw"
    _layout(raw, {"train": [photo_like(rng, 40, 50) for _ in range(6)], "val": [photo_like(rng, 40, 50) for _ in range(4)]})
    layout, _ = _prepare(tmp_path, raw)
    assert len(load_manifest(layout.prepared)) == 10 and len(load_pool(layout.prepared)) == 10
    man = tmp_path / "p" / "manifest.csv"
    _damage(man, how)
    for read in (lambda: load_manifest(layout.prepared, ok_only=False), lambda: load_pool(layout.prepared)):
        with pytest.raises(DataError) as err:
            read()
        msg = str(err.value)
        assert msg.startswith(f"{man}: ") and "\n" not in msg and "rerun stage 1" in msg
        assert {"cut_at_row": "cut short: 5 of 10 rows", "cut_mid_row": "cut mid-row after 2 of 10 rows",
                "edited": "edited"}[how] in msg


def test_a_stage_2_manifest_is_verified_too(tmp_path, rng):
    """Stage 2's store records its manifest the same way; load_pool checks it."""
    from dfpipe.data.store import write_store_record

    raw = tmp_path / "raw"
    _layout(raw, {"train": [photo_like(rng, 40, 50) for _ in range(4)], "val": [photo_like(rng, 40, 50) for _ in range(2)]})
    layout, _ = _prepare(tmp_path, raw)
    aug = tmp_path / "aug"
    aug.mkdir()
    write_png_shard(aug / "images-000000.bin", [photo_like(rng, 40, 50) for _ in range(2)])
    pd.DataFrame({"uid": ["aug/a.png", "aug/b.png"], "img_name": ["a.png", "b.png"], "label": [1, 1],
                  "source_uid": ["train/train0.jpg"] * 2, "donor_uid": ["", ""], "method": ["m", "m"],
                  "cache_file": ["images-000000.bin"] * 2, "cache_index": [0, 1]}).to_csv(aug / "manifest.csv", index=False)
    write_store_record(aug, Stage1(), manifest_rows=2)
    assert len(load_pool(layout.prepared, aug)) == 8
    _damage(aug / "manifest.csv", "cut_at_row")
    with pytest.raises(DataError, match=r"aug/manifest.csv: cut short: 1 of 2 rows .* rerun stage 2"):
        load_pool(layout.prepared, aug)


# --------------------------------------------------------------------------- per-image checksums
def test_bytes_overwritten_inside_a_shard_are_refused_naming_shard_and_image(tmp_path, rng):
    """Same-size damage inside a stage-1 shard: reading that image (the path of stages 2-5) is a one-line
    DataError naming the shard and the image, never other pixels; the other images still read."""
    raw = tmp_path / "raw"
    _layout(raw, {"train": [photo_like(rng, 40, 50) for _ in range(4)], "val": [photo_like(rng, 40, 50) for _ in range(2)]})
    layout, _ = _prepare(tmp_path, raw)
    pool = load_pool(layout.prepared)
    row = pool.iloc[2]
    shard = row.cache_path
    before = [StoreReader().image(p, i) for p, i in zip(pool.cache_path, pool.cache_index)]
    entries = np.load(str(shard)[: -len(".bin")] + ".idx.npy")  # (offset, length, crc32) rows
    offset, n = int(entries[row.cache_index, 0]), int(entries[row.cache_index, 1])
    with open(shard, "r+b") as fh:  # a few bytes mid-image, same size (JPEG data still decodes: wrong pixels)
        fh.seek(offset + n // 2)
        old = fh.read(8)
        fh.seek(offset + n // 2)
        fh.write(bytes(b ^ 0x5A for b in old))
    reader = StoreReader()
    with pytest.raises(DataError) as err:
        reader.image(shard, int(row.cache_index))
    msg = str(err.value)
    assert msg.startswith(f"{shard}: image {row.cache_index} does not match its crc32") and "\n" not in msg
    for k, (p, i) in enumerate(zip(pool.cache_path, pool.cache_index)):
        if (p, i) != (shard, row.cache_index):
            np.testing.assert_array_equal(reader.image(p, i), before[k])
    with pytest.raises(DataError, match="does not match its crc32"):  # a DataLoader's dataset reads the same way
        StoreDataset(pool.iloc[[2]], [InputPolicy("resize", 32)])[0]


def test_an_index_without_checksums_is_still_read(tmp_path, rng):
    """A store from before the checksums ((n, 2) indexes) reads as before, unchecked."""
    img = photo_like(rng, 30, 40)
    write_png_shard(tmp_path / "s-000000.bin", [img])
    idx = tmp_path / "s-000000.idx.npy"
    np.save(idx, np.load(idx)[:, :2])
    np.testing.assert_array_equal(StoreReader().image(tmp_path / "s-000000.bin", 0), img)
    np.save(idx, np.zeros((1, 5), np.int64))
    with pytest.raises(DataError, match=r"shard index of shape \(1, 5\)"):
        StoreReader().read(tmp_path / "s-000000.bin", 0)
