"""Issue 25, item 6: one input rule for stage 1, the CLI and the API. The same image is refused by all three, in the
same words, read from its header before any pixel is decoded (Pillow's decompression-bomb text never reaches a
user); the CLI's exit codes are the ones docs/serving.md states."""

import base64
import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve_api import make_card

from dfpipe.cli import main

TOO_LARGE = "too large: 20000x20000 = 400 MP, the limit is 100 MP"
TOO_SMALL = "too small: 4x4, the shorter side must be at least 16 px"


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buf, "PNG")
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A 20x20 PNG whose header claims w x h (CRC fixed): a few hundred bytes that only the header check can stop."""
    png = _png((20, 20))
    ihdr = bytearray(png[8:33])
    ihdr[8:16] = struct.pack(">II", w, h)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF)
    return png[:8] + bytes(ihdr) + png[33:]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The CLI's arguments and an API client for the same card, both at their default limits."""
    from fastapi.testclient import TestClient

    from dfpipe.serve.api import ServeSettings, create_app

    models, card = make_card(tmp_path_factory.mktemp("rules"))
    settings = ServeSettings(models_dir=str(models), card=str(card), device="cpu")  # the default limits
    with TestClient(create_app(settings)) as client:
        yield ["--models", str(models), "--card", str(card), "--device", "cpu"], client


def _cli_error(args: list[str], path: Path, capsys) -> str:
    assert main(["predict", str(path), *args]) == 1  # scored nothing: one line per refused image, exit 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    prefix = f"dfpipe: error: {path}: "
    assert line.startswith(prefix), line
    return line[len(prefix):]


def _api_errors(client, data: bytes) -> list[str]:
    """The message of /predict (a 422) and of a /predict/batch item, with their fixed prefixes taken off."""
    r = client.post("/predict", files={"file": ("x.png", data, "image/png")})
    assert r.status_code == 422, r.text
    b = client.post("/predict/batch", json={"images": [base64.b64encode(data).decode()]})
    assert b.status_code == 200, b.text
    return [r.json()["detail"].removeprefix("not a usable image: "),
            b.json()["results"][0]["error"].removeprefix("not a usable image: ")]


@pytest.mark.parametrize("case", ["20000x20000 PNG", "4x4 PNG", "64 MP PNG cut short"])
def test_the_cli_and_the_api_refuse_the_same_image_in_the_same_words(case, served, tmp_path, capsys):
    """Before: Pillow's 'decompression bomb DOS attack' text in the CLI and 'too many pixels (...)' from the
    server; a 4x4 image scored by both though stage 1 drops it; a 64 MP image scored by the CLI and refused by the
    server (50 MP there, 100 MP elsewhere). Now one rule, the model's (stage 1's) limits, one message."""
    data, want = {"20000x20000 PNG": (png_claiming(20000, 20000), TOO_LARGE),
                  "4x4 PNG": (_png((4, 4)), TOO_SMALL),
                  # within the limits: both go on to decode it, and both find it cut short
                  "64 MP PNG cut short": (png_claiming(8000, 8000), None)}[case]
    path = tmp_path / "x.png"
    path.write_bytes(data)
    args, client = served
    cli = _cli_error(args, path, capsys)
    assert _api_errors(client, data) == [cli, cli]
    if want:
        assert cli == want
    else:
        assert cli.startswith("corrupt or truncated image")
    assert "DOS" not in cli and "decompression bomb" not in cli


def test_stage1_reports_a_refused_image_in_the_same_words(tmp_path, rng):
    from conftest import layout_in, photo_like, write_jpeg

    from dfpipe.config import PrepareConfig
    from dfpipe.prepare_data import run

    raw = tmp_path / "raw"
    for i in range(4):
        write_jpeg(raw / "trainset" / f"{i}.jpg", photo_like(rng, 40, 48))
    (raw / "trainset" / "big.png").write_bytes(png_claiming(20000, 20000))
    (raw / "trainset" / "tiny.png").write_bytes(_png((4, 4)))
    (raw / "trainset_label.txt").write_text("img_name,target\n0.jpg,0\n1.jpg,1\n2.jpg,0\n3.jpg,1\nbig.png,1\n"
                                            "tiny.png,0\n")
    report = run(PrepareConfig(workers=1), layout_in(tmp_path, data_root=raw))
    reasons = {Path(s["file"]).name: s["reason"] for s in report["skipped"]}
    assert reasons == {"big.png": TOO_LARGE, "tiny.png": TOO_SMALL}


def test_a_server_may_be_stricter_and_says_so_in_the_same_words(tmp_path):
    """A lower --max-pixels (memory) is the one allowed difference; a higher one is the model's limit."""
    from fastapi.testclient import TestClient

    from dfpipe.serve.api import ServeSettings, create_app

    models, card = make_card(tmp_path)
    for asked, limit in ((1_000_000, 1_000_000), (10**9, 100_000_000)):
        settings = ServeSettings(models_dir=str(models), card=str(card), device="cpu", max_pixels=asked)
        with TestClient(create_app(settings)) as client:
            assert client.get("/health").json()["max_pixels"] == limit
            r = client.post("/predict", files={"file": ("x.png", png_claiming(2000, 1000), "image/png")})
            if limit == 1_000_000:
                assert r.json()["detail"] == "not a usable image: too large: 2000x1000 = 2 MP, the limit is 1 MP"
            else:
                assert r.json()["detail"].startswith("not a usable image: corrupt or truncated image")


def _documented_exit_codes() -> dict[int, str]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(code): what for code, what in re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.M)}


def test_the_exit_codes_are_the_documented_ones(served, tmp_path, rng, capsys):
    from conftest import photo_like, write_jpeg

    args, _ = served
    good, bad = tmp_path / "good.jpg", tmp_path / "tiny.png"
    write_jpeg(good, photo_like(rng, 40, 40))
    bad.write_bytes(_png((4, 4)))
    docs = _documented_exit_codes()
    assert set(docs) == {0, 1, 2, 130}, docs
    assert main(["predict", str(good), *args]) == 0
    assert main(["predict", str(good), str(bad), *args]) == 1  # scored some, not all
    assert main(["predict", str(tmp_path / "missing.jpg"), *args]) == 2  # a user error, before any model loads
    with pytest.raises(SystemExit) as bad_option:
        main(["predict", str(good), "--no-such-option"])
    assert bad_option.value.code == 2  # argparse's: a bad command line is a user error too
    capsys.readouterr()


def test_scan_refuses_a_small_jpeg_in_the_same_words_whichever_decoder(served, tmp_path, rng):
    """--decode device takes plain JPEGs past the CPU decoder: the size rule must hold there too."""
    import csv

    from conftest import photo_like, write_jpeg

    args, _ = served
    write_jpeg(tmp_path / "in" / "tiny.jpg", rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    write_jpeg(tmp_path / "in" / "ok.jpg", photo_like(rng, 40, 40))
    for mode in ("workers", "device"):
        out = tmp_path / f"{mode}.csv"
        assert main(["scan", str(tmp_path / "in"), "--out", str(out), "--workers", "0", "--decode", mode, *args]) == 0
        with open(out, newline="") as fh:
            rows = {r["path"]: r for r in csv.DictReader(fh)}
        assert rows["tiny.jpg"]["error"] == "too small: 12x8, the shorter side must be at least 16 px", mode
        assert rows["ok.jpg"]["verdict"] != "error", mode
