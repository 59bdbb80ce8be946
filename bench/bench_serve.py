"""Benchmark: loopback load test of the HTTP API (``dfpipe serve``, uvicorn, micro-batching).

Starts ``python -m dfpipe.cli serve`` on 127.0.0.1 (a free port) in a subprocess, then ``--clients``
concurrent clients (asyncio + httpx, keep-alive) send ``--n`` ``POST /predict`` requests in the
original clients' format (JSON, base64 JPEG), bounded by ``--max-seconds``. The experts are
random-weight checkpoints (``pretrained="none"``, fixed seed) unless ``--models``/``--card`` name a
real stage-5 ensemble. Only 127.0.0.1 is ever contacted. Fails (exit 1) on any error or on a score
that differs from ``Ensemble.score_images`` in this process. Writes a JSON report; prints its path.

    python bench/bench_serve.py --out reports/bench/bench_serve.json [--n 2000 --clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfpipe.config import ExpertConfig  # noqa: E402
from dfpipe.data.images import decode_image  # noqa: E402
from dfpipe.data.preprocess import INPUT_MODES, Stage1  # noqa: E402
from dfpipe.io import write_json  # noqa: E402
from dfpipe.layout import Layout  # noqa: E402
from dfpipe.models import build_expert  # noqa: E402
from dfpipe.ensemble_predict import Ensemble  # noqa: E402
from dfpipe.train_experts.checkpoint import save_checkpoint  # noqa: E402

log = logging.getLogger("bench_serve")
THRESHOLDS = {"t_real": 0.3, "t_fake": 0.7, "t_decision": 0.5, "max_fpr": 0.01, "max_fnr": 0.01}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON report to write")
    p.add_argument("--n", type=int, default=2000, help="requests to send (after --warmup)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--max-seconds", type=float, default=180, help="stop sending after this long")
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--images", type=int, default=16, help="distinct JPEGs the clients cycle through")
    p.add_argument("--side", type=int, default=256, help="side of the JPEGs sent")
    p.add_argument("--size", type=int, default=128, help="input size of the random expert")
    p.add_argument("--stage1-max-side", type=int, default=0,
                   help="stage 1's max_side in the random expert's preprocessing record (0 = native resolution)")
    p.add_argument("--input-mode", default="resize", choices=INPUT_MODES, help="the random expert's input policy")
    p.add_argument("--tta", default="identity", help="comma-separated TTA views of the random expert")
    p.add_argument("--models", help="a real models/ folder (with --card) instead of a random expert")
    p.add_argument("--card", help="the stage-5 ensemble card for --models")
    p.add_argument("--max-batch", type=int, default=16, help="server micro-batch size")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs
def random_ensemble(root: Path, size: int, stage1: Stage1, mode: str, tta: list[str], seed: int) -> tuple[Path, Path]:
    """One random-weight tf_efficientnet_lite0 expert (with the preprocessing record training writes) and its
    stage-5 card under ``root``."""
    torch.manual_seed(seed)
    cfg = ExpertConfig(pretrained="none", img_size=size, input_mode=mode)
    model = build_expert(cfg).eval()
    save_checkpoint(root / "models" / "e0" / "best.pt", model, stage1, cfg, "e0", {})
    ens = Ensemble.load(root / "models", ["e0"], tta, "mean_prob", torch.device("cpu"))
    write_json(root / "ensemble.json", ens.card(THRESHOLDS))
    return root / "models", root / "ensemble.json"


def jpegs(n: int, side: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
        img = (np.stack([xx / side, yy / side, (xx + yy) / (2 * side)], 2) * rng.uniform(80, 220, 3)).astype(np.uint8)
        cv2.circle(img, tuple(int(v) for v in rng.integers(0, side, 2)), int(rng.integers(10, side // 3)),
                   tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        out.append(buf.tobytes())
    return out


# ----------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: Path, card: Path, port: int, max_batch: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dfpipe.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--models",
           str(models), "--card", str(card), "--device", "cpu", "--max-batch", str(max_batch)]
    with log_path.open("w") as fh:  # a file, not a pipe: a full pipe would stall the server
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh)


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
        try:
            return httpx.get(url + "/health", timeout=2, trust_env=False).json()  # no proxy for loopback
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout} s")


# ----------------------------------------------------------------------------- load
async def load(url: str, bodies: list[bytes], n: int, clients: int, max_seconds: float) -> dict:
    """``n`` requests from ``clients`` keep-alive clients; latencies (s), errors, wall time, results."""
    import httpx

    latencies, errors, results = [], [], {}
    next_i = 0
    deadline = time.monotonic() + max_seconds

    async def client() -> None:
        nonlocal next_i
        async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as c:
            while next_i < n and time.monotonic() < deadline:
                i, next_i = next_i, next_i + 1
                k = i % len(bodies)
                t0 = time.perf_counter()
                try:
                    r = await c.post("/predict", content=bodies[k], headers={"content-type": "application/json"})
                    ok = r.status_code == 200
                except httpx.HTTPError as exc:
                    ok, r = False, exc
                latencies.append(time.perf_counter() - t0)
                if ok:
                    results.setdefault(k, r.json()["result"])
                else:
                    errors.append(str(getattr(r, "text", r))[:200])

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"latencies": np.array(latencies), "errors": errors, "wall": time.perf_counter() - t0, "results": results}


def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def run(args: argparse.Namespace) -> dict:
    tta = [v.strip() for v in args.tta.split(",") if v.strip()]
    images = jpegs(args.images, args.side, args.seed)
    bodies = [json.dumps({"image": base64.b64encode(b).decode()}).encode() for b in images]
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        if args.models:
            models, card = Path(args.models), Path(args.card or Layout().card)
        else:
            models, card = random_ensemble(Path(tmp), args.size, Stage1(max_side=args.stage1_max_side),
                                           args.input_mode, tta, args.seed)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "server.log"
        proc = start_server(models, card, port, args.max_batch, log_path)
        try:
            health = wait_healthy(url, proc, log_path)
            asyncio.run(load(url, bodies, args.warmup, args.clients, 60))  # allocator, oneDNN kernels
            res = asyncio.run(load(url, bodies, args.n, args.clients, args.max_seconds))
            health = wait_healthy(url, proc, log_path)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        ens = Ensemble.from_card(card, models, torch.device("cpu"))
        want = ens.score_images([decode_image(images[k]) for k in sorted(res["results"])])
    got = np.array([res["results"][k] for k in sorted(res["results"])])
    diff = float(np.abs(got - want).max()) if len(got) else float("nan")
    lat = res["latencies"] * 1000
    report = {
        "n_requests": int(len(lat)), "n_requested": args.n, "clients": args.clients, "n_errors": len(res["errors"]),
        "errors": res["errors"][:5], "wall_seconds": res["wall"], "requests_per_s": len(lat) / res["wall"],
        "latency_ms": {f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)} | {"max": float(lat.max()),
                                                                                       "mean": float(lat.mean())},
        "server_mean_batch": health.get("mean_batch"), "max_batch": args.max_batch,
        "model": health["model"], "experts": health["experts"], "tta": health["tta"],
        "stage1": health["stage1"], "inputs": health["inputs"],
        "image_side": args.side, "request_bytes": int(np.mean([len(b) for b in bodies])),
        "max_abs_diff_vs_in_process": diff, "machine": machine_info(),
    }
    if report["n_errors"] or not diff < 1e-5:
        raise AssertionError(f"{report['n_errors']} errors (e.g. {report['errors'][:1]}), max |diff| {diff:.2e}")
    return report


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    report = run(args)
    write_json(args.out, report)
    log.info("%d requests from %d clients: %.1f req/s, p50 %.1f ms, p99 %.1f ms, mean server batch %.2f, 0 errors",
             report["n_requests"], args.clients, report["requests_per_s"], report["latency_ms"]["p50"],
             report["latency_ms"]["p99"], report["server_mean_batch"] or 0)
    return Path(args.out)


if __name__ == "__main__":
    print(main())
