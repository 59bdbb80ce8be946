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
    with pytest.raises(ImageError, match="too many pixels"):
        decode_image(good, max_pixels=64 * 63)
    with pytest.raises(ImageError, match="too small"):
        decode_image(good, min_side=65)
    with pytest.raises(ImageError, match="cannot read file"):
        decode_image(tmp_path / "missing.jpg")


def test_resize_square():
    img = np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8)
    out = resize_square(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert resize_square(out, 32) is out
