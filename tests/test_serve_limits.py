"""The server's bounds (issue 24): memory budgets, bounded queue, body counting and deadlines, API token,
access log, JSON that breaks the parser, explanations on a copy; and that none of it changes a score."""

import asyncio
import base64
import io
import logging
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from test_serve_api import jpeg_bytes, make_card, save_expert

from dfpipe.data.images import decode, decode_image, image_pixels
from dfpipe.data.preprocess import Stage1
from dfpipe.ensemble_predict import Ensemble


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    return make_card(tmp_path_factory.mktemp("limits"), tta=("identity",))


@contextmanager
def client_for(card, **kw):
    from fastapi.testclient import TestClient

    from dfpipe.serve.api import ServeSettings, create_app

    models, path = card
    settings = ServeSettings(models_dir=str(models), card=str(path), device="cpu", max_bytes=256 * 1024,
                             max_batch_images=8, explain_grid=3, **kw)
    with TestClient(create_app(settings)) as client:
        yield client


# ----------------------------------------------------------------------------- decoding: same pixels, less memory
def test_decoding_in_stripes_gives_pil_s_own_pixels(rng):
    rgb = rng.integers(0, 256, (700, 300, 3), dtype=np.uint8)  # taller than a stripe, not a multiple of one
    for arr, mode in [(rgb, None), (rgb[..., 0], None), (np.dstack([rgb, rgb[..., :1]]), None)]:
        data = _png(arr, mode)
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) if arr.ndim == 2 or arr.shape[2] == 3 else None
        got = decode_image(data)
        assert got.shape == (700, 300, 3) and got.flags.writeable
        if want is not None:
            np.testing.assert_array_equal(got, want)
    jpeg = jpeg_bytes(rng, 600, 333)
    np.testing.assert_array_equal(decode_image(jpeg), np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    assert image_pixels(jpeg) == 600 * 333 and image_pixels(b"not an image") == 0


def test_16_bit_greyscale_maps_by_the_same_rounding(rng):
    grey = rng.integers(0, 65536, (300, 40), dtype=np.uint16)
    grey[0, :4] = [0, 65535, 128, 129]
    d = decode(_png(grey))
    assert "16bit" in d.notes
    want = ((grey.astype(np.uint32) + 128) // 257).astype(np.uint8)
    np.testing.assert_array_equal(d.img, np.repeat(want[..., None], 3, axis=2))


@pytest.mark.parametrize("stage1,mode", [(Stage1(), "resize"), (Stage1(max_side=50), "resize"),
                                         (Stage1(), "crop"), (Stage1(max_side=70), "resize_short_crop")])
def test_prepared_inputs_score_exactly_as_score_images(tmp_path, rng, stage1, mode):
    """The server keeps each upload as the experts' inputs (model_inputs) and scores those (score_inputs): the
    scores are Ensemble.score_images' own, bit for bit, for small, large, wide and tall images."""
    from dfpipe.serve.service import model_inputs, score_inputs

    save_expert(tmp_path, "m", stage1, mode=mode, img_size=32)
    ens = Ensemble.load(tmp_path, ["m"], ["identity", "hflip"], "mean_prob", torch.device("cpu"))
    images = [decode_image(jpeg_bytes(rng, h, w)) for h, w in [(20, 20), (60, 80), (300, 90), (45, 400)]]
    want = ens.score_images(images)
    got = score_inputs(ens, [model_inputs(ens, im) for im in images])
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- budget and queue
def test_budget_is_first_come_first_served_and_refuses_past_its_bounds():
    from dfpipe.serve.service import Budget, Busy

    async def go():
        b = Budget("test", 100, max_waiting=2, timeout_s=0.3)
        order = []

        async def user(name, n, hold_s):
            async with b.hold(n):
                order.append(name)
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(user("a", 80, 0.1))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(user("b", 50, 0)), asyncio.create_task(user("c", 10, 0))]
        await asyncio.sleep(0)
        with pytest.raises(Busy, match="already wait"):  # a third waiter is one too many
            await user("d", 30, 0)
        await asyncio.gather(first, *waiting)
        assert order == ["a", "b", "c"]  # c fitted beside a, but waits its turn behind b
        assert b.free == 100 and b.peak_used == 80
        async with b.hold(10**9) as n:  # above capacity: takes the whole bucket, alone
            assert n == 100 and b.free == 0
            with pytest.raises(Busy, match="within 0.3 s") as err:
                await user("e", 1, 0)
            assert err.value.status == 503 and err.value.retry_after >= 1
        assert b.free == 100 and not b._waiters

    asyncio.run(go())


def test_micro_batch_queue_is_bounded():
    from dfpipe.serve.service import Busy, MicroBatcher

    gate = threading.Event()

    def blocked(items):
        gate.wait(5)
        return np.zeros(len(items))

    async def go():
        b = MicroBatcher(blocked, max_batch=2, max_queue=3)
        await b.start()
        running = asyncio.create_task(b.score([1, 2]))  # taken by the model thread, which blocks
        await asyncio.sleep(0.05)
        assert not b.idle
        queued = asyncio.create_task(b.score([3, 4, 5]))  # fills the queue
        await asyncio.sleep(0.01)
        with pytest.raises(Busy, match="queue holds 3"):
            await b.score([6])
        gate.set()
        assert await running == [0.0, 0.0] and await queued == [0.0] * 3
        await asyncio.sleep(0.01)
        assert b.idle and await b.score(list(range(9))) == [0.0] * 9  # an empty queue takes a request of any size
        await b.stop()

    asyncio.run(go())


def test_a_batch_is_decoded_one_image_at_a_time(card, rng):
    from dfpipe.serve.api import DECODE_BYTES_PER_PIXEL

    images = [jpeg_bytes(rng, 200, 150) for _ in range(6)]
    with client_for(card) as client:
        files = [("file", (f"{i}.jpg", im, "image/jpeg")) for i, im in enumerate(images)]
        r = client.post("/predict/batch", files=files)
        assert r.status_code == 200 and all(x["result"] is not None for x in r.json()["results"])
        decodes = client.app.state.dfpipe.decodes
        one = 200 * 150 * DECODE_BYTES_PER_PIXEL + max(map(len, images))
        assert 0 < decodes.peak_used <= one and decodes.free == decodes.capacity
        assert client.app.state.dfpipe.bodies.free == client.app.state.dfpipe.bodies.capacity


def test_a_request_past_the_memory_budget_waits_then_gets_503_with_retry_after(card, rng):
    """A decode budget smaller than one image: the image takes the whole budget (it still gets scored); while it
    is held, the next request waits busy_timeout_s and is refused with Retry-After."""
    data = jpeg_bytes(rng, 100, 100)
    with client_for(card, max_memory=8 * 1024, busy_timeout_s=0.2) as client:
        assert client.post("/predict", json={"image": _b64(data)}).status_code == 200
        decodes = client.app.state.dfpipe.decodes

        async def hold():
            async with decodes.hold(decodes.capacity):
                await asyncio.sleep(1.0)

        holder = client.portal.start_task_soon(hold)
        time.sleep(0.05)
        r = client.post("/predict", json={"image": _b64(data)})
        assert r.status_code == 503 and "retry later" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
        holder.result(5)
        assert client.post("/predict", json={"image": _b64(data)}).status_code == 200


# ----------------------------------------------------------------------------- JSON and bodies
HOSTILE_JSON = {
    "deeply nested list": b"[" * 100_000,
    "deeply nested object": b'{"a":' * 50_000,
    "closed deep nesting": b"[" * 20_000 + b"]" * 20_000,
    "5000-digit number": b'{"image": ' + b"7" * 5000 + b"}",
    "5000-digit number in a list": b'{"images": [' + b"1" * 5000 + b"]}",
    "not UTF-8": b'{"image": "\xff\xfe"}',
    "lone surrogate": b'{"image": "\\ud800"}',
    "NaN": b'{"image": NaN}',
    "huge float": b'{"image": 1e999999}',
    "empty body": b"",
    "nested image value": b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_json_that_breaks_the_parser_is_a_4xx_with_a_message(card, case):
    with client_for(card) as client:
        for path in ("/predict", "/predict/batch", "/explain"):
            r = client.post(path, content=HOSTILE_JSON[case], headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
            assert r.json()["detail"], path
    if case in ("deeply nested list", "5000-digit number"):  # the two 500s
        assert r.status_code == 400 and ("nested too deeply" in r.json()["detail"] or "digits" in r.json()["detail"])


def test_transfer_encoding_with_content_length_is_refused(card):
    with client_for(card) as client:
        r = client.post("/predict", content=(c for c in [b"--x\r\n", b"\xff" * 100]),
                        headers={"content-type": "multipart/form-data; boundary=x", "content-length": "10",
                                 "transfer-encoding": "chunked"})
        assert r.status_code == 400 and "Transfer-Encoding and Content-Length" in r.json()["detail"]


def test_a_multipart_body_is_counted_as_it_arrives(card):
    """A declared length under the limit does not let a longer body through: its bytes are counted."""
    from dfpipe.serve.api import ServeSettings

    limit = ServeSettings(max_bytes=256 * 1024).max_body_bytes
    sent = 0

    def body():
        nonlocal sent
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(100):
            sent += 64 * 1024
            yield b"\xff" * (64 * 1024)

    with client_for(card) as client:
        app = client.app

        async def call():
            msgs, chunks = [], body()

            async def receive():
                try:
                    return {"type": "http.request", "body": next(chunks), "more_body": True}
                except StopIteration:
                    return {"type": "http.request", "body": b"", "more_body": False}

            async def send(m):
                msgs.append(m)

            scope = {"type": "http", "method": "POST", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
                     "headers": [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"1000")],
                     "client": ("127.0.0.1", 1), "server": ("t", 80), "scheme": "http", "http_version": "1.1",
                     "root_path": "", "state": {}, "app": app}
            await app(scope, receive, send)
            return msgs

        msgs = client.portal.call(call)
    assert msgs[0]["status"] == 413 and (b"connection", b"close") in msgs[0]["headers"]
    assert limit < sent <= limit + 128 * 1024  # stopped within a chunk or two of the limit


# ----------------------------------------------------------------------------- token and access log
def test_the_token_guards_every_route_but_health(card, rng, caplog):
    data = jpeg_bytes(rng)
    with client_for(card, token="s3cret") as client:
        assert client.get("/health").status_code == 200
        for method, path in [("post", "/predict"), ("get", "/"), ("get", "/openapi.json"), ("get", "/docs"),
                             ("get", "/static/app.js"), ("post", "/explain")]:
            r = getattr(client, method)(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        auth = {"Authorization": "Bearer s3cret"}
        assert client.post("/predict", json={"image": _b64(data)}, headers={"Authorization": "Bearer nope"}
                           ).status_code == 401
        with caplog.at_level(logging.INFO, logger="dfpipe.serve.access"):
            assert client.post("/predict", json={"image": _b64(data)}, headers=auth).status_code == 200
        line = [r.getMessage() for r in caplog.records if r.name == "dfpipe.serve.access"][-1]
        assert line.startswith("testclient:") and " POST /predict 200 " in line and line.endswith("pixels=4800")
        page = client.get("/?token=s3cret")  # the page's own fetches then carry the token as a cookie
        assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
        assert client.post("/predict", json={"image": _b64(data)}).status_code == 200  # by the cookie alone
        client.cookies.clear()
        assert client.get("/?token=wrong").status_code == 401


def test_serve_refuses_a_public_address_without_a_token(card, capsys, monkeypatch):
    from dfpipe.cli import is_loopback, main

    monkeypatch.delenv("DFPIPE_TOKEN", raising=False)
    models, path = card
    assert main(["serve", "--host", "0.0.0.0", "--port", "1", "--models", str(models), "--card", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--token" in err[0] and "--insecure" in err[0]
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


# ----------------------------------------------------------------------------- a real server: deadlines
@contextmanager
def real_server(card, header_timeout: float, **kw):
    import uvicorn

    from dfpipe.serve.api import ServeSettings, create_app
    from dfpipe.serve.server import uvicorn_config

    models, path = card
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(models_dir=str(models), card=str(path), device="cpu", **kw)
    srv = uvicorn.Server(uvicorn_config(create_app(settings), "127.0.0.1", port, limit_concurrency=50,
                                        header_timeout=header_timeout, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(10)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
        return True, got
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got


def test_half_sent_requests_are_closed_at_their_deadlines(card):
    with real_server(card, header_timeout=0.5, request_timeout_s=0.5) as port:
        t0 = time.monotonic()
        silent, partial, slow_body = (socket.create_connection(("127.0.0.1", port)) for _ in range(3))
        partial.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        slow_body.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"image\": ")
        for sock in (silent, partial):
            closed, _ = _closed_within(sock, 5)
            assert closed
        closed, got = _closed_within(slow_body, 5)
        assert closed and got.startswith(b"HTTP/1.1 408") and b"not received within 0.5 s" in got
        assert time.monotonic() - t0 < 4
        for sock in (silent, partial, slow_body):
            sock.close()
        both = socket.create_connection(("127.0.0.1", port))  # through uvicorn's parser too
        both.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n" + b"\xff" * 4096)
        closed, got = _closed_within(both, 5)
        assert closed and got.startswith(b"HTTP/1.1 400") and b"Transfer-Encoding and Content-Length" in got
        both.close()
        ok = socket.create_connection(("127.0.0.1", port))  # the server still answers
        ok.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        closed, got = _closed_within(ok, 5)
        assert got.startswith(b"HTTP/1.1 200")
        ok.close()


# ----------------------------------------------------------------------------- explanations
def test_explain_works_on_a_copy_within_its_pixel_budget_and_keeps_the_full_score(card, rng):
    models, path = card
    ens = Ensemble.from_card(path, models, torch.device("cpu"))
    data = jpeg_bytes(rng, 300, 400)
    with client_for(card, explain_max_pixels=30_000) as client:
        body = client.post("/explain", files={"file": ("a.jpg", data, "image/jpeg")}).json()
    assert body["result"] == pytest.approx(float(ens.score_images([decode_image(data)])[0]), abs=1e-6)
    w, h = body["heatmap_size"]
    assert w * h <= 30_000 and abs(w / h - 4 / 3) < 0.02 and f"copy of {w}x{h} px" in body["method"]


def test_paced_scoring_gives_way_to_the_model_thread_and_keeps_a_deadline():
    from dfpipe.serve.explain import paced

    calls, busy_until = [], time.monotonic() + 0.2

    def score(images):
        calls.append((len(images), time.monotonic()))
        return np.arange(len(images), dtype=float)

    t0 = time.monotonic()
    out = paced(score, lambda: time.monotonic() > busy_until, chunk=3, deadline=t0 + 10)(list(range(7)))
    assert list(out) == [0, 1, 2, 0, 1, 2, 0] and [n for n, _ in calls] == [3, 3, 1]
    assert calls[0][1] >= busy_until  # waited for the model thread to go idle
    calls.clear()
    never_idle = paced(score, lambda: False, chunk=2, deadline=time.monotonic() + 10, pause_s=0.05)
    assert len(never_idle(list(range(4)))) == 4  # a busy model delays it, but cannot stop it
    with pytest.raises(TimeoutError):
        paced(score, lambda: True, chunk=1, deadline=time.monotonic() - 1)([1])
