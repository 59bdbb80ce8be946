import io

import numpy as np
import pytest
from PIL import Image

from dfpipe.data.images import ImageError, decode_image, resize_square
from dfpipe.data.labels import LabelError, read_labels


def _write(tmp_path, text, name="labels.txt", encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


def test_read_labels_tolerates_bom_crlf_blank_lines(tmp_path):
    p = _write(tmp_path, "\ufeffimg_name,target\r\na.jpg,1\r\n\r\nb.jpg, 0\r\n")
    df = read_labels(p)
    assert df.img_name.tolist() == ["a.jpg", "b.jpg"]
    assert df.label.tolist() == [1, 0]


@pytest.mark.parametrize(
    "text, match",
    [
        ("a.jpg,1\n", r":1: header"),
        ("name,label\na.jpg,1\n", r":1: header"),
        ("img_name,target\na.jpg,2\n", r":2: label '2'"),
        ("img_name,target\na.jpg,1\nb.jpg,0\na.jpg,0\n", r":4: duplicate img_name 'a.jpg' \(first on line 2\)"),
        ("img_name,target\n../x.jpg,1\n", r":2: img_name '../x.jpg' escapes"),
        ("img_name,target\n/etc/x.jpg,1\n", r"escapes"),
        ("img_name,target\na.jpg\n", r":2: expected 2 fields"),
        ("", r"empty label file"),
        ("img_name,target\na.jpg,1\na.jpg,1\n",
         r":3: duplicate img_name 'a.jpg' \(first on line 2, same label 1\); delete"),
        ("img_name,target\na.jpg,1\n\nb.jpg,0\r\na.jpg,0\n", r":5: duplicate .* conflicting labels 1 and 0; keep only"),
        ("img_name;target\na.jpg;1\n", r":1: header is 'img_name;target'; expected 'img_name,target'"),
        ("img_name,target,source\na.jpg,1,x\n", r":1: header"),
        ("img_name,target\na.jpg,1.0\n", r":2: label '1.0' for 'a.jpg' is not 0 \(real\) or 1 \(fake\); write 0 or 1"),
        ("img_name,target\na.jpg,-1\n", r":2: label '-1'"),
        ("img_name,target\nC:\\x.jpg,1\n", r":2: img_name 'C:\\\\x.jpg' escapes"),
        ("img_name,target\nsub/../../x.jpg,1\n", r":2: .* escapes"),
        ("img_name,target\n,1\n", r":2: empty img_name"),
        ('img_name,target\n"a.jpg,1\n', r"malformed CSV|expected 2 fields"),
    ],
)
def test_read_labels_errors_name_file_and_line(tmp_path, text, match):
    p = _write(tmp_path, text)
    with pytest.raises(LabelError, match=match) as info:
        read_labels(p)
    assert str(p) in str(info.value)


def test_missing_label_file(tmp_path):
    with pytest.raises(LabelError, match="not found"):
        read_labels(tmp_path / "nope.txt")


def _png_bytes(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_modes_to_rgb():
    grey = Image.fromarray(np.full((20, 30), 100, np.uint8), "L")
    assert decode_image(_png_bytes(grey)).shape == (20, 30, 3)
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red -> white background
    assert (decode_image(_png_bytes(rgba)) == 255).all()
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(_png_bytes(cmyk, "JPEG"))
    assert out.shape == (8, 8, 3) and out[..., 0].mean() > 200 and out[..., 1].mean() < 60
    pal = Image.new("P", (6, 6))
    assert decode_image(_png_bytes(pal)).shape == (6, 6, 3)


def test_decode_applies_exif_rotation():
    img = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).shape == (20, 10, 3)


def test_decode_errors_are_clear(tmp_path):
    with pytest.raises(ImageError, match="0 bytes"):
        decode_image(b"")
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"hello, I am text")
    good = _png_bytes(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(ImageError, match="too large: 64x64 = 4,096 pixels, the limit is 4,032 pixels"):
        decode_image(good, max_pixels=64 * 63)
    with pytest.raises(ImageError, match="too small: 64x64, the shorter side must be at least 65 px"):
        decode_image(good, min_side=65)
    with pytest.raises(ImageError, match="cannot read file"):
        decode_image(tmp_path / "missing.jpg")


def test_resize_square():
    img = np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8)
    out = resize_square(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert resize_square(out, 32) is out


def test_label_file_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_bytes("img_name,target\na.jpg,1\ncaf\u00e9.jpg,0\n".encode("latin-1"))
    with pytest.raises(LabelError, match=r"labels.txt:3: not UTF-8 text .*save the file as UTF-8"):
        read_labels(p)


def test_line_numbers_count_blank_lines_and_subfolders_are_kept(tmp_path):
    df = read_labels(_write(tmp_path, "img_name,target\n\nsub/a.jpg,1\n\n\nb.jpg,0\n"))
    assert df.to_dict("list") == {"img_name": ["sub/a.jpg", "b.jpg"], "label": [1, 0], "line": [3, 6]}


def test_read_names_lists(tmp_path):
    from dfpipe.data.labels import read_names

    df = read_names(_write(tmp_path, "\ufeffimg_name\r\nb.jpg\r\n\r\na.jpg\r\n"))
    assert df.to_dict("list") == {"img_name": ["b.jpg", "a.jpg"], "line": [2, 4]}
    assert read_names(_write(tmp_path, "x.jpg\ny.jpg\n", "n2.txt")).img_name.tolist() == ["x.jpg", "y.jpg"]
    with pytest.raises(LabelError, match=r":2: expected one image name per line"):
        read_names(_write(tmp_path, "img_name\na.jpg,1\n", "n3.txt"))
    with pytest.raises(LabelError, match=r":3: duplicate img_name 'a.jpg' \(first on line 2\)"):
        read_names(_write(tmp_path, "img_name\na.jpg\na.jpg\n", "n4.txt"))
    with pytest.raises(LabelError, match=r":1: img_name '../a.jpg' escapes"):
        read_names(_write(tmp_path, "../a.jpg\n", "n5.txt"))


def test_decode_names_conversions_and_error_kinds():
    from dfpipe.data.images import decode

    grey16 = np.array([[0, 257, 65535, 1000]], np.uint16).repeat(4, 0)
    d = decode(_png_bytes(Image.fromarray(grey16)))
    assert d.notes == ("16bit", "greyscale") and d.format == "PNG"
    assert d.img[0, :, 0].tolist() == [0, 1, 255, 4] and (d.img[..., 0] == d.img[..., 2]).all()
    assert decode(_png_bytes(Image.new("RGB", (4, 4)))).notes == ()
    with pytest.raises(ImageError) as info:
        decode(b"")
    assert info.value.kind == "empty_file"
    with pytest.raises(ImageError) as info:
        decode(_png_bytes(Image.new("RGB", (64, 64)), "JPEG"), max_pixels=100)
    assert info.value.kind == "decompression_bomb"


@pytest.mark.parametrize("text", ["img_name,target\n", "\ufeffimg_name,target\r\n\r\n  \r\n"])
def test_label_file_with_a_header_and_no_rows_is_refused(tmp_path, text):
    """Not an empty training set: the file is named, so a truncated export is noticed at once."""
    from dfpipe.errors import UserError

    p = _write(tmp_path, text)
    with pytest.raises(LabelError, match=r"labels\.txt: header but no rows; add one line 'img_name,target'") as exc:
        read_labels(p)
    assert isinstance(exc.value, UserError) and isinstance(exc.value, ValueError)
