"""Stage 1 on a corpus of bad inputs: every skipped file is reported with its reason, every unusual but
usable file is kept with the right pixels and its conversion named, and nothing good is lost."""

import io
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import layout_in, photo_like, write_jpeg
from dfpipe.config import PrepareConfig
from dfpipe.data.images import decode_image
from dfpipe.prepare_data import run
from dfpipe.data.samples import load_manifest
from dfpipe.data.store import StoreReader
from dfpipe.errors import DataError


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_with_size(png: bytes, w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (CRC fixed): a decompression bomb as far as the header says."""
    ihdr = bytearray(png[8:33])
    ihdr[8:16] = struct.pack(">II", w, h)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF)
    return png[:8] + bytes(ihdr) + png[33:]


def _rgb(rng, h=40, w=48) -> Image.Image:
    return Image.fromarray(photo_like(rng, h, w))


def _bad_files(rng) -> dict[str, bytes]:
    """Files that must be skipped: name -> bytes (reason codes in SKIPPED)."""
    jpg, png = _enc(_rgb(rng), "JPEG"), _enc(_rgb(rng), "PNG")
    return {
        "zero.jpg": b"",
        "trunc.jpg": jpg[: len(jpg) // 2],
        "trunc_header.jpg": jpg[:200],
        "header_only.jpg": jpg[:20],
        "trunc.png": png[: len(png) // 2],
        "trunc.webp": (lambda b: b[: len(b) // 2])(_enc(_rgb(rng), "WEBP")),
        "trunc.gif": (lambda b: b[: len(b) // 2])(_enc(_rgb(rng), "GIF")),
        "text.jpg": b"this is not an image\n",
        "page.png": b"<html><body>404 not found</body></html>",
        "vector.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        "script.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n",  # EPS: never handed to PIL
        "noise.bmp": rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "bomb.png": _png_with_size(png, 3000, 3000),  # > prepare_data.max_pixels (header check, nothing decoded)
        "bomb_pil.png": _png_with_size(png, 20000, 20000),  # > PIL's own hard limit
        "one_px.png": _enc(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "tiny.jpg": _enc(Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)), "JPEG"),
        "thin.png": _enc(Image.new("RGB", (400, 8), (9, 9, 9)), "PNG"),
    }


SKIPPED = {
    "zero.jpg": "empty_file", "trunc.jpg": "corrupt", "trunc_header.jpg": "corrupt",
    "header_only.jpg": "not_an_image", "trunc.png": "corrupt", "trunc.webp": "corrupt", "trunc.gif": "corrupt",
    "text.jpg": "not_an_image", "page.png": "not_an_image", "vector.png": "not_an_image",
    "script.jpg": "not_an_image", "noise.bmp": "not_an_image", "bomb.png": "decompression_bomb",
    "bomb_pil.png": "decompression_bomb", "one_px.png": "too_small", "tiny.jpg": "too_small",
    "thin.png": "too_small",
}


def _kept_files(rng) -> dict[str, tuple[bytes, np.ndarray, str]]:
    """Unusual but usable files: name -> (bytes, expected decoded RGB pixels, expected conversion notes)."""
    out = {}
    # EXIF orientation 6 (rotate 90 degrees clockwise for display) on an asymmetric image
    base = photo_like(rng, 40, 56)
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = _enc(Image.fromarray(base), "JPEG", exif=exif.tobytes(), quality=95)
    stored = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    out["exif_rot.jpg"] = (raw, np.rot90(stored, k=-1), "exif_rotated")
    # 16-bit greyscale: 0..65535 -> 0..255
    grey16 = (np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) * 34).astype(np.uint16)
    expect = np.repeat(((grey16.astype(np.uint32) + 128) // 257).astype(np.uint8)[..., None], 3, axis=2)
    out["grey16.png"] = (_enc(Image.fromarray(grey16), "PNG"), expect, "16bit;greyscale")
    # palette with a transparent index -> flattened on white
    pal = np.zeros((40, 48), np.uint8)
    pal[:, 24:] = 1
    p_img = Image.fromarray(pal, "P")
    p_img.putpalette([200, 10, 10, 0, 0, 255] + [0] * 762)
    expect = np.zeros((40, 48, 3), np.uint8)
    expect[:, :24] = (200, 10, 10)
    expect[:, 24:] = 255
    out["palette_alpha.png"] = (_enc(p_img, "PNG", transparency=1), expect, "palette;alpha_flattened")
    # RGBA: transparent half -> white background, opaque half keeps its colour
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., :3] = (10, 120, 30)
    rgba[:20, :, 3] = 255
    expect = np.full((40, 48, 3), 255, np.uint8)
    expect[:20] = (10, 120, 30)
    out["rgba.png"] = (_enc(Image.fromarray(rgba, "RGBA"), "PNG"), expect, "alpha_flattened")
    # greyscale JPEG, 1-bit PNG, grey + alpha
    grey = photo_like(rng, 40, 48)[..., 1]
    raw = _enc(Image.fromarray(grey, "L"), "JPEG")
    dec = np.asarray(Image.open(io.BytesIO(raw)))
    out["grey.jpg"] = (raw, np.repeat(dec[..., None], 3, axis=2), "greyscale")
    bits = (np.indices((40, 48)).sum(0) % 2 * 255).astype(np.uint8)
    out["bits.png"] = (_enc(Image.fromarray(bits).convert("1"), "PNG"), np.repeat(bits[..., None], 3, 2), "greyscale")
    la = np.stack([grey, np.where(np.arange(48) < 24, 255, 0).astype(np.uint8)[None].repeat(40, 0)], 2)
    expect = np.repeat(np.where(la[..., 1:] == 255, la[..., :1], 255), 3, axis=2).astype(np.uint8)
    out["grey_alpha.png"] = (_enc(Image.fromarray(la, "LA"), "PNG"), expect, "alpha_flattened;greyscale")
    # CMYK JPEG: pure red ink -> red
    cmyk = _enc(Image.new("CMYK", (40, 48), (0, 255, 255, 0)), "JPEG", quality=95)
    out["cmyk.jpg"] = (cmyk, np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB")), "cmyk")
    # animated GIF: the first frame
    frames = [Image.new("RGB", (48, 40), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    gif = _enc(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    first = np.asarray(Image.open(io.BytesIO(gif)).convert("RGB"))
    assert first[..., 0].min() > 200 and first[..., 1:].max() < 50  # red: the first frame, not the others
    out["anim.gif"] = (gif, first, "animated_first_frame;palette")
    # PNG content with a .jpg name: decoded by content, lossless
    img = photo_like(rng, 40, 48)
    out["png_named.jpg"] = (_enc(Image.fromarray(img), "PNG"), img, "extension_mismatch")
    # a JPEG listed with a non-image extension
    raw = _enc(Image.fromarray(img), "JPEG", quality=90)
    out["photo.dat"] = (raw, np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")), "extension_mismatch")
    return out


def _corpus(root, rng):
    """A competition layout: good images, every bad case, converted ones. Returns what the report must say."""
    good = {"train": [], "val": [], "test": []}
    rows = {"train": [], "val": []}
    folders = {"train": "trainset", "val": "valset", "test": "testset"}
    for split in ("train", "val", "test"):
        for i in range(4):
            name = f"{split}_good_{i}.jpg"
            write_jpeg(root / folders[split] / name, photo_like(rng, 40 + 4 * i, 48))
            good[split].append(name)
            if split != "test":
                rows[split].append((name, i % 2))
    for name, data in _bad_files(rng).items():
        (root / "trainset" / name).write_bytes(data)
        rows["train"].append((name, 1))
    kept = _kept_files(rng)
    for name, (data, _, _) in kept.items():
        (root / "trainset" / name).write_bytes(data)
        rows["train"].append((name, 0))
    skipped = {f"trainset/{n}": k for n, k in SKIPPED.items()}
    # listed but missing: a file that is not there, and a folder with an image's name
    (root / "trainset" / "folder.jpg").mkdir()
    rows["train"] += [("gone.jpg", 1), ("folder.jpg", 0)]
    skipped.update({"trainset/gone.jpg": "missing_file", "trainset/folder.jpg": "missing_file"})
    # val and test have their own failures; a failed test image keeps its manifest row
    (root / "valset" / "val_zero.jpg").write_bytes(b"")
    rows["val"].append(("val_zero.jpg", 0))
    skipped["valset/val_zero.jpg"] = "empty_file"
    (root / "testset" / "test_trunc.jpg").write_bytes((root / "testset" / "test_good_0.jpg").read_bytes()[:300])
    skipped["testset/test_trunc.jpg"] = "corrupt"
    # not listed anywhere: an unlabelled train image and non-image files (ignored, but reported)
    write_jpeg(root / "trainset" / "unlabelled.jpg", photo_like(rng, 40, 40))
    (root / "testset" / "notes.txt").write_text("hello")
    (root / "testset" / "photo.jpg.bak").write_bytes(b"x")
    write_jpeg(root / "testset" / "UPPER.JPG", photo_like(rng, 40, 40))  # extensions are case-insensitive
    good["test"].append("UPPER.JPG")
    for split, fname in (("train", "trainset_label.txt"), ("val", "valset_label.txt")):
        pd.DataFrame(rows[split], columns=["img_name", "target"]).to_csv(root / fname, index=False)
    return good, skipped, kept


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(3)
    good, skipped, kept = _corpus(tmp / "raw", rng)
    layout = layout_in(tmp, data_root=tmp / "raw", prepared=tmp / "p", prepare_report=tmp / "r.json",
                       duplicates=tmp / "d.csv")
    report = run(PrepareConfig(max_pixels=1_000_000, workers=1, chunk_size=8), layout)
    return tmp, layout, report, good, skipped, kept


def test_corpus_is_big_enough(prepared):
    _, _, _, _, skipped, kept = prepared
    assert len(skipped) + len(kept) >= 20


def test_report_lists_exactly_the_skipped_files(prepared):
    tmp, _, report, _, skipped, _ = prepared
    got = [(str(Path(s["file"]).relative_to(tmp / "raw")), s["kind"]) for s in report["skipped"]]
    assert dict(got) == skipped and len(got) == len(skipped)  # each once, with its reason code
    assert report["n_skipped"] == len(skipped)
    assert report["skipped_by_reason"] == dict(sorted(Counter(skipped.values()).items()))
    by_file = {s["file"].rsplit("/", 1)[1]: s["reason"] for s in report["skipped"]}
    assert "trainset_label.txt:" in by_file["gone.jpg"] and "0 bytes" in by_file["zero.jpg"]
    # the words of every input path (dfpipe.data.images.check_dimensions), never Pillow's own bomb text
    assert by_file["bomb.png"] == "too large: 3000x3000 = 9 MP, the limit is 1 MP"
    assert by_file["bomb_pil.png"] == "too large: 20000x20000 = 400 MP, the limit is 1 MP"
    assert by_file["one_px.png"] == "too small: 1x1, the shorter side must be at least 16 px"


def test_nothing_good_is_lost_and_pixels_are_right(prepared):
    tmp, layout, report, good, _, kept = prepared
    man = load_manifest(layout.prepared)
    names = {s: set(man.img_name[man.split == s]) for s in ("train", "val", "test")}
    assert names["train"] == set(good["train"]) | set(kept)
    assert names["val"] == set(good["val"]) and names["test"] == set(good["test"])
    assert report["n_images"] == {s: len(names[s]) for s in names}
    reader = StoreReader()
    for row in man.itertuples():
        stored = reader.image(tmp / "p" / row.cache_file, row.cache_index)  # the stage-1 image: native, every pixel
        assert (row.width, row.height) == (stored.shape[1], stored.shape[0]), row.img_name
        if row.img_name in kept:
            data, pixels, notes = kept[row.img_name]
            assert row.converted == notes, row.img_name
            assert (row.orig_w, row.orig_h) == (pixels.shape[1], pixels.shape[0]), row.img_name
            np.testing.assert_array_equal(stored, pixels, err_msg=row.img_name)
        else:
            assert row.converted == "", row.img_name
            np.testing.assert_array_equal(stored, decode_image(row.path), err_msg=row.img_name)
    want = Counter(k for _, _, notes in kept.values() for k in notes.split(";"))
    assert report["converted_by_kind"] == dict(sorted(want.items())) and report["n_converted"] == len(kept)
    # converted pixels are stored as lossless PNG; a clean file (a misleading name included) as it came
    n_png = sum(1 for _, _, notes in kept.values() if notes != "extension_mismatch")
    assert (report["store"]["n_png"], report["store"]["n_original"]) == (n_png, len(man) - n_png)


def test_failed_test_image_keeps_its_row_and_unlisted_files_are_reported(prepared):
    tmp, layout, report, _, _, _ = prepared
    full = load_manifest(layout.prepared, ok_only=False)
    row = full[full.img_name == "test_trunc.jpg"].iloc[0]
    assert row.cache_index == -1 and row.error.startswith("corrupt or truncated")
    with pytest.raises(DataError, match="holds no image"):  # its place in the test split's one shard is empty
        StoreReader().read(tmp / "p" / row.cache_file, full[full.split == "test"].index.get_loc(row.name))
    assert report["unlabelled"] == [str(tmp / "raw" / "trainset" / "unlabelled.jpg")] and report["n_unlabelled"] == 1
    assert report["ignored_files"] == [str(tmp / "raw" / "testset" / n) for n in ("notes.txt", "photo.jpg.bak")]
    assert report["datasets"]["trainset"]["n_missing"] == 2
