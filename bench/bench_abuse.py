"""Benchmark: the HTTP API under abuse (issue 24), on loopback, with the server's own bounds.

Starts ``python -m dfpipe.cli serve`` on 127.0.0.1 (a free port; a random-weight expert made here, as
``bench/bench_serve.py`` does) and measures, each against the server's RSS when idle just before:

a. one ``/predict/batch`` of ``--a-images`` 49 MP JPEGs (7000 x 7000, ~0.9 MB each): peak RSS over idle;
b. ``--b-batches`` concurrent batches of ``--b-images`` such JPEGs: peak RSS over idle, statuses;
c. one ``/explain`` of a 49 MP JPEG with ``--c-predicts`` small ``/predict`` requests sent beside it: their p99;
d. the chunked bypass: ``Content-Length`` with ``Transfer-Encoding: chunked`` and a 1000 MB body (and a plain
   chunked JSON body, a chunked multipart body): MB the client got to send before the server answered;
e. ``--e-connections`` half-open connections (partial headers): peak RSS, /health during and after, how many the
   server closed by its header deadline;
f. ``--fuzz-cases`` hostile requests (nested / huge / odd JSON, odd multipart, odd headers; Hypothesis strategies,
   derandomised) over HTTP: the count of 5xx.

Only 127.0.0.1 is ever contacted; every loop is bounded. Counts are flags (the run records those it used).

    python bench/bench_abuse.py --out reports/bench/bench_abuse.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_serve import free_port, jpegs, machine_info, random_ensemble, wait_healthy  # noqa: E402

from dfpipe.data.preprocess import Stage1  # noqa: E402
from dfpipe.io import write_json  # noqa: E402

log = logging.getLogger("bench_abuse")
TARGETS = {"a_peak_rss_over_idle_mb": 1536, "b_peak_rss_over_idle_mb": 1536, "c_predict_p99_s": 2.0,
           "d_mb_sent_before_refusal": 20, "fuzz_5xx": 0, "fuzz_cases_min": 1000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON report to write")
    p.add_argument("--side", type=int, default=7000, help="side of the big JPEGs (7000: 49 MP)")
    p.add_argument("--a-images", type=int, default=64)
    p.add_argument("--b-batches", type=int, default=20)
    p.add_argument("--b-images", type=int, default=16)
    p.add_argument("--c-predicts", type=int, default=20)
    p.add_argument("--d-mb", type=int, default=1000, help="body the bypass client offers, in MB")
    p.add_argument("--e-connections", type=int, default=10000)
    p.add_argument("--fuzz-cases", type=int, default=1000)
    p.add_argument("--max-memory", type=float, default=1024, help="the server's --max-memory (MB)")
    p.add_argument("--request-timeout", type=float, default=60, help="the server's --request-timeout (s)")
    p.add_argument("--header-timeout", type=float, default=10, help="the server's --header-timeout (s)")
    p.add_argument("--update", action="store_true", help="keep the other scenarios of an existing --out")
    p.add_argument("--scenarios", default="a,b,c,d,e,f", help="which to run")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs
def big_jpegs(n: int, side: int, seed: int) -> list[bytes]:
    """``n`` distinct smooth side x side JPEGs (~0.9 MB at 7000 px): few bytes, many pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 70])
        assert ok
        out.append(buf.tobytes())
        del img
    return out


# ----------------------------------------------------------------------------- server and its memory
class Server:
    def __init__(self, models: Path, card: Path, port: int, args: argparse.Namespace, log_path: Path):
        cmd = [sys.executable, "-m", "dfpipe.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--models", str(models), "--card", str(card), "--device", "cpu",
               "--max-memory", str(args.max_memory), "--request-timeout", str(args.request_timeout),
               "--header-timeout", str(args.header_timeout)]
        self.log_path = log_path
        with log_path.open("w") as fh:  # a file, not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, cwd=HERE.parent,
                                         env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        self.url = f"http://127.0.0.1:{port}"
        self.port = port

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class PeakRSS:
    """Samples the server's RSS every 20 ms while in the ``with`` block: idle (before), peak, after."""

    def __init__(self, server: Server):
        self.server = server

    def __enter__(self) -> "PeakRSS":
        time.sleep(0.5)
        self.idle = self.server.rss_mb()
        self.peak = self.idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_mb())
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        time.sleep(1.0)
        self.after = self.server.rss_mb()

    def report(self) -> dict:
        return {"idle_rss_mb": round(self.idle, 1), "peak_rss_mb": round(self.peak, 1),
                "peak_rss_over_idle_mb": round(self.peak - self.idle, 1), "after_rss_mb": round(self.after, 1)}


# ----------------------------------------------------------------------------- scenarios
def _files(images: list[bytes], n: int) -> list:
    return [("file", (f"{i}.jpg", images[i % len(images)], "image/jpeg")) for i in range(n)]


async def _post_batches(url: str, images: list[bytes], batches: int, per_batch: int) -> list[dict]:
    import httpx

    async def one(c: httpx.AsyncClient) -> dict:
        t0 = time.perf_counter()
        r = await c.post("/predict/batch", files=_files(images, per_batch))
        body = r.json()
        scored = sum(x.get("result") is not None for x in body.get("results", []))
        return {"status": r.status_code, "s": time.perf_counter() - t0, "scored": scored,
                "detail": body.get("detail")}

    limits = httpx.Limits(max_connections=batches)
    async with httpx.AsyncClient(base_url=url, timeout=900, trust_env=False, limits=limits) as c:
        return list(await asyncio.gather(*(one(c) for _ in range(batches))))


def scenario_a(server: Server, images: list[bytes], n: int) -> dict:
    with PeakRSS(server) as m:
        res = asyncio.run(_post_batches(server.url, images, 1, n))[0]
    return {"images": n, **res, **m.report()}


def scenario_b(server: Server, images: list[bytes], batches: int, per_batch: int) -> dict:
    t0 = time.perf_counter()
    with PeakRSS(server) as m:
        res = asyncio.run(_post_batches(server.url, images, batches, per_batch))
    statuses: dict[str, int] = {}
    for r in res:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"batches": batches, "images_per_batch": per_batch, "statuses": statuses,
            "images_scored": sum(r["scored"] for r in res), "wall_s": round(time.perf_counter() - t0, 1),
            "refusals": sorted({r["detail"] for r in res if r["detail"]})[:3], **m.report()}


def scenario_c(server: Server, big: bytes, small: list[bytes], n: int) -> dict:
    import httpx

    async def go() -> dict:
        async with httpx.AsyncClient(base_url=server.url, timeout=600, trust_env=False) as c:
            t0 = time.perf_counter()
            explain = asyncio.create_task(c.post("/explain", files={"file": ("big.jpg", big, "image/jpeg")}))
            await asyncio.sleep(2.0)  # upload and decode under way; the map follows

            async def predict(k: int) -> tuple[float, int]:
                await asyncio.sleep(0.25 * k)
                t = time.perf_counter()
                r = await c.post("/predict", files={"file": ("s.jpg", small[k % len(small)], "image/jpeg")})
                return time.perf_counter() - t, r.status_code

            preds = await asyncio.gather(*(predict(k) for k in range(n)))
            r = await explain
            t_explain = time.perf_counter() - t0
            preds_during = sum(1 for k in range(n) if 2.0 + 0.25 * k < t_explain)
        lat = np.array([p[0] for p in preds])
        return {"predicts": n, "predict_statuses": sorted({p[1] for p in preds}),
                "predict_p50_s": round(float(np.percentile(lat, 50)), 3),
                "predict_p99_s": round(float(np.percentile(lat, 99)), 3), "predict_max_s": round(float(lat.max()), 3),
                "predicts_sent_while_explaining": preds_during, "explain_status": r.status_code,
                "explain_s": round(t_explain, 2), "explain_method": r.json().get("method", r.text[:200])}

    return asyncio.run(go())


def _offer_body(port: int, head: bytes, chunk: bytes, total: int, chunked: bool) -> dict:
    """Send ``head`` then up to ``total`` bytes of body in ``chunk``s (chunked framing when asked) while reading
    the response on the same socket; how many body bytes went out before the response (or close) came."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
    answered = threading.Event()
    response = bytearray()

    def reader() -> None:
        try:
            while data := sock.recv(65536):
                response.extend(data)
                answered.set()
        except OSError:
            pass
        answered.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    sent, t0 = 0, time.perf_counter()
    frame = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") if chunked else chunk
    try:
        sock.sendall(head)
        sock.settimeout(10)
        while sent < total and not answered.is_set():
            sock.sendall(frame)
            sent += len(chunk)
    except OSError:
        pass
    answered.wait(10)
    sock.close()
    th.join(5)
    status = response[:12].decode(errors="replace")
    return {"mb_sent_before_answer": round(sent / 2**20, 2), "answer": status,
            "detail": bytes(response).split(b"\r\n\r\n", 1)[-1][:160].decode(errors="replace"),
            "seconds": round(time.perf_counter() - t0, 2)}


def scenario_d(server: Server, mb: int) -> dict:
    chunk = b"\xff" * (1024 * 1024)
    total = mb * 2**20
    host = b"Host: 127.0.0.1\r\n"
    multi = b"Content-Type: multipart/form-data; boundary=x\r\n"
    cases = {
        "content-length + chunked, multipart batch": b"POST /predict/batch HTTP/1.1\r\n" + host + multi +
        b"Content-Length: 1000\r\nTransfer-Encoding: chunked\r\n\r\n",
        "chunked multipart, no content-length": b"POST /predict/batch HTTP/1.1\r\n" + host + multi +
        b"Transfer-Encoding: chunked\r\n\r\n",
        "chunked JSON /predict": b"POST /predict HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        "declared 1000 MB multipart": b"POST /predict/batch HTTP/1.1\r\n" + host + multi +
        f"Content-Length: {total}\r\n\r\n".encode(),
    }
    out = {name: _offer_body(server.port, head, chunk, total, b"chunked" in head) for name, head in cases.items()}
    bypass = out["content-length + chunked, multipart batch"]
    return {"offered_mb": mb, "cases": out, "max_mb_sent_before_refusal_bypass": bypass["mb_sent_before_answer"]}


def scenario_e(server: Server, n: int, header_timeout: float, max_wait_s: float = 180) -> dict:
    """``n`` connections that send part of a request's headers and then nothing. The server accepts them as fast as
    its accept loop goes (the kernel holds the rest in its backlog), and closes each ``header_timeout`` after it
    accepted it; polled once a second until all are closed and /health answers 200 again (at most ``max_wait_s``)."""
    import httpx

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1024)), hard))
    socks, failed = [], 0

    def health() -> int | str:
        try:
            return httpx.get(server.url + "/health", timeout=10, trust_env=False).status_code
        except httpx.HTTPError as exc:
            return f"error: {type(exc).__name__}"

    with PeakRSS(server) as m:
        t0 = time.perf_counter()
        for _ in range(n):
            try:
                s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
                s.setblocking(False)
                socks.append(s)
            except OSError:
                failed += 1
        opened_s = time.perf_counter() - t0
        during = health()
        open_socks, closed_at, healthy_at = list(socks), None, None
        while time.perf_counter() - t0 < max_wait_s and (open_socks or healthy_at is None):
            time.sleep(1.0)
            still = []
            for s in open_socks:
                try:
                    if s.recv(1) != b"":
                        still.append(s)
                except BlockingIOError:
                    still.append(s)
                except OSError:
                    pass
            open_socks = still
            if not open_socks and closed_at is None:
                closed_at = time.perf_counter() - t0
            if healthy_at is None and health() == 200:
                healthy_at = time.perf_counter() - t0
    for s in socks:
        s.close()
    return {"connections": n, "connect_failures": failed, "open_s": round(opened_s, 1), "health_during": during,
            "header_deadline_s": header_timeout, "closed_by_server": len(socks) - len(open_socks),
            "s_until_all_closed": closed_at and round(closed_at, 1),
            "s_until_health_200_again": healthy_at and round(healthy_at, 1), **m.report()}


def scenario_f(server: Server, cases: int, seed: int) -> dict:
    """``cases`` hostile requests from Hypothesis strategies (derandomised), each over HTTP; the 5xx among them."""
    import httpx
    from hypothesis import HealthCheck, given, settings

    statuses: dict[str, int] = {}
    five: list[str] = []
    client = httpx.Client(base_url=server.url, timeout=120, trust_env=False)

    @given(hostile_request())
    @settings(max_examples=cases, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(req: tuple[str, dict, bytes]) -> None:
        path, headers, body = req
        try:
            r = client.post(path, content=body, headers=headers)
            code = str(r.status_code)
        except httpx.HTTPError as exc:
            code = f"transport: {type(exc).__name__}"
        statuses[code] = statuses.get(code, 0) + 1
        if code.startswith("5"):
            five.append(f"{path} {headers} {body[:80]!r} -> {code} {r.text[:120]}")

    t0 = time.perf_counter()
    run()
    client.close()
    return {"cases": sum(statuses.values()), "statuses": dict(sorted(statuses.items())), "n_5xx": len(five),
            "examples_5xx": five[:5], "wall_s": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- hostile requests (test_api_fuzz.py too)
def hostile_request():
    """A Hypothesis strategy of (path, headers, body): JSON nested deep, huge numbers, odd types and escapes;
    multipart with odd boundaries, path-like and non-ASCII file names, stray parts, truncated forms; odd bytes
    under each content type."""
    from hypothesis import strategies as st

    paths = st.sampled_from(["/predict", "/predict/batch", "/explain"])
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=40), st.sampled_from(["", "data:image/png;base64,", "AAAA", "iVBORw0KGgo="]))
    json_values = st.recursive(
        scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4)), max_leaves=12)

    def nested(depth: int, kind: str) -> bytes:
        return (b"[" * depth + (b"]" * depth if kind == "closed" else b"")) if kind != "object" else b'{"a":' * depth

    raw_json = st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        st.builds(lambda key, v: json.dumps({key: v}).encode(), st.sampled_from(["image", "images"]), json_values),
        st.builds(nested, st.integers(1, 200_000), st.sampled_from(["open", "closed", "object"])),
        st.builds(lambda key, n: b'{"' + key.encode() + b'": ' + b"9" * n + b"}", st.sampled_from(["image", "images"]),
                  st.integers(1, 20_000)),
        st.builds(lambda e: b'{"image": 1e' + str(e).encode() + b"}", st.integers(-10**6, 10**6)),
        st.binary(max_size=200),
        st.sampled_from([b'{"image": "\\ud800"}', b'{"image": NaN}', b'{"image": Infinity}', b"\xef\xbb\xbf{}",
                         b'{"images": [' + b"[]," * 5000 + b"[]]}", b"{" * 3 + b"}" * 3, b'"' + b"\\" * 99 + b'"']),
    )
    names = st.one_of(st.text(max_size=30), st.sampled_from(["../../etc/passwd", "..\\..\\win.ini", "/abs/x.jpg",
                                                              "a\x00b.jpg", "CON", "ü" * 50, "x" * 5000, ""]))
    fields = st.sampled_from(["file", "file", "image", "", "files[]", "file\r\nX: y"])

    def form(boundary: str, parts: list, tail: bytes) -> tuple[bytes, str]:
        b = boundary.encode()
        out = b""
        for field, name, data in parts:
            fn = f'; filename="{name}"' if name is not None else ""
            out += (b"--" + b + b"\r\nContent-Disposition: form-data; name=\"" + field.encode("utf-8", "replace") +
                    b'"' + fn.encode("utf-8", "replace") + b"\r\n\r\n" + data + b"\r\n")
        return out + tail.replace(b"B", b), boundary

    # RFC 2046's boundary characters; no space at either end (no HTTP client sends such a header value)
    boundary = st.text(alphabet=string.ascii_letters + string.digits + "'()+_,-./:=? ", min_size=1,
                       max_size=70).map(str.strip).filter(bool)
    parts = st.lists(st.tuples(fields, st.one_of(st.none(), names), st.binary(max_size=300)), max_size=6)
    tails = st.sampled_from([b"--B--\r\n", b"--B--", b"", b"--B", b"--B--\r\n--B--\r\n", b"garbage"])
    multipart = st.builds(form, boundary, parts, tails)

    def as_json(body: bytes, ctype: str) -> tuple[dict, bytes]:
        return {"content-type": ctype}, body

    def as_form(f: tuple[bytes, str], declared: str) -> tuple[dict, bytes]:
        body, b = f
        return {"content-type": declared.replace("B", b)}, body

    json_req = st.builds(as_json, raw_json, st.sampled_from(["application/json", "application/json; charset=latin-1",
                                                            "APPLICATION/JSON", "application/json;;"]))
    form_req = st.builds(as_form, multipart, st.sampled_from(["multipart/form-data; boundary=B",
                                                              'multipart/form-data; boundary="B"',
                                                              "multipart/form-data", "multipart/form-data; boundary=",
                                                              "multipart/mixed; boundary=B"]))
    other = st.builds(lambda ctype, body: ({"content-type": ctype}, body),
                      st.sampled_from(["text/plain", "", "image/jpeg", "application/x-www-form-urlencoded", "*/*"]),
                      st.binary(max_size=200))
    return st.builds(lambda p, hb: (p, hb[0], hb[1]), paths, st.one_of(json_req, form_req, other))


# ----------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict:
    todo = set(args.scenarios.split(","))
    t_setup = time.perf_counter()
    n_big = min(8, max(args.a_images, args.b_images))
    big = big_jpegs(n_big, args.side, args.seed)
    small = jpegs(8, 256, args.seed)
    log.info("%d JPEGs of %dx%d, %.2f MB each on average (%.0f s)", len(big), args.side, args.side,
             np.mean([len(b) for b in big]) / 2**20, time.perf_counter() - t_setup)
    report: dict = {"counts": {k: getattr(args, k) for k in ("side", "a_images", "b_batches", "b_images", "c_predicts",
                                                               "d_mb", "e_connections", "fuzz_cases")},
                    "server": {"max_memory_mb": args.max_memory, "request_timeout_s": args.request_timeout,
                               "header_timeout_s": args.header_timeout},
                    "jpeg_mb": round(float(np.mean([len(b) for b in big])) / 2**20, 3), "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="bench_abuse_") as tmp:
        models, card = random_ensemble(Path(tmp), 128, Stage1(), "resize", ["identity"], args.seed)
        server = Server(models, card, free_port(), args, Path(tmp) / "server.log")
        try:
            wait_healthy(server.url, server.proc, server.log_path)
            asyncio.run(_post_batches(server.url, small, 2, 4))  # warm-up: allocator, oneDNN kernels
            steps = [("a", lambda: scenario_a(server, big, args.a_images)),
                     ("b", lambda: scenario_b(server, big, args.b_batches, args.b_images)),
                     ("c", lambda: scenario_c(server, big[0], small, args.c_predicts)),
                     ("d", lambda: scenario_d(server, args.d_mb)),
                     ("f", lambda: scenario_f(server, args.fuzz_cases, args.seed)),
                     ("e", lambda: scenario_e(server, args.e_connections, args.header_timeout))]
            for name, fn in steps:
                if name in todo:
                    t0 = time.perf_counter()
                    report[name] = fn()
                    log.info("%s (%.0f s): %s", name, time.perf_counter() - t0, json.dumps(report[name])[:400])
            report["server_alive_at_end"] = server.proc.poll() is None
            report["server_log_tail"] = server.log_path.read_text().splitlines()[-5:]
        finally:
            server.stop()
    report["machine"] = machine_info()
    report["met"] = met(report)
    return report


def met(report: dict) -> dict:
    """Each target of the issue: met or not (False when its scenario did not run)."""
    return {
        "a": "a" in report and report["a"]["peak_rss_over_idle_mb"] <= TARGETS["a_peak_rss_over_idle_mb"],
        "b": "b" in report and report["b"]["peak_rss_over_idle_mb"] <= TARGETS["b_peak_rss_over_idle_mb"],
        "c": "c" in report and report["c"]["predict_p99_s"] <= TARGETS["c_predict_p99_s"],
        "d": "d" in report and report["d"]["max_mb_sent_before_refusal_bypass"] <= TARGETS["d_mb_sent_before_refusal"],
        "fuzz": "f" in report and report["f"]["n_5xx"] == 0 and report["f"]["cases"] >= TARGETS["fuzz_cases_min"],
    }


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    report = run(args)
    if args.update and Path(args.out).is_file():  # a rerun of some scenarios: keep the others, note which ran when
        old = json.loads(Path(args.out).read_text())
        report = {**old, **{k: v for k, v in report.items() if k in args.scenarios.split(",")},
                  "rerun": {**old.get("rerun", {}), args.scenarios: {"counts": report["counts"],
                                                                      "server": report["server"],
                                                                      "machine": report["machine"]}}}
        report["met"] = met(report)
    write_json(args.out, report)
    log.info("targets met: %s", report["met"])
    return Path(args.out)


if __name__ == "__main__":
    print(main())
