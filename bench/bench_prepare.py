"""Benchmark stage 1 (prepare) on CPU: images/s, the image store's size and peak memory at several dataset sizes.

    python bench/bench_prepare.py --out bench_prepare.json [--n 20000 --at 5000,20000 --workers 0]

Writes N generated JPEGs of mixed sizes (--min-px..--max-px a side, smooth gradients + shapes + noise,
seeded) once to a temp dir in the competition layout (all in ``trainset/``, labels alternating), then
runs :func:`dfpipe.prepare_data.run` in a fresh process for each size in --at (``limit`` = that
size) with the default settings (native resolution unless --max-side, dedup on, no face crop). Storage: the
image store's bytes against the input files' (``store_ratio``; about 1 when clean JPEGs are kept as they
came, ``n_original`` / ``n_png`` say how each image was stored). Memory: the peak of the summed
RSS of the process tree (the stage and its decode workers), sampled every 50 ms from outside, plus
``ru_maxrss`` of the stage process and of its largest worker. Bounded memory means the peak at the
largest size is within 20% of the peak at the smallest one (``bounded`` in the JSON).

Checksums (``checksum`` in the JSON): every stored image carries a crc32 that stage 1 computes once when it
writes it and every reader checks (:mod:`dfpipe.data.store`). On the largest store this times zlib.crc32 over
every stored image (the work the checksums add, written or read) against stage 1's wall time and against
reading + decoding every image through :class:`~dfpipe.data.store.StoreReader` (the checked path; scoring does
this and then runs the experts, so the share of scoring is lower still). Goal: < 5% of each. Also the
manifest's sha256 check (``manifest_check_seconds``, part of ``load_manifest_seconds``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dfpipe  # noqa: E402,F401  (its import sets the offline env vars: dfpipe.OFFLINE_ENV)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

# The stage, run in a child process so each size gets its own peak (ru_maxrss only ever grows).
CHILD = """
import json, resource, sys, time
from dfpipe.config import PrepareConfig
from dfpipe.layout import Layout
from dfpipe.prepare_data import run
cfg, paths = json.loads(sys.argv[1])
t0 = time.perf_counter()
report = run(PrepareConfig(**cfg), Layout(**paths))
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "n_images": report["n_images"]["train"], "n_skipped": report["n_skipped"],
                  "store": report["store"],
                  "maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "maxrss_largest_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def make_images(root: Path, n: int, min_px: int, max_px: int, seed: int = 0) -> None:
    """``n`` JPEGs in ``root/trainset`` and ``root/trainset_label.txt``."""
    rng = np.random.default_rng(seed)
    folder = root / "trainset"
    folder.mkdir(parents=True)
    names = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(min_px, max_px + 1, 2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=2) * rng.uniform(60, 220, 3)
        img = img.astype(np.uint8)
        for _ in range(2):
            cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(4, max(5, h // 3))),
                       tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
        img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(80, 96))])
        name = f"{i:06d}.jpg"
        (folder / name).write_bytes(buf.tobytes())
        names.append(f"{name},{i % 2}")
    (root / "trainset_label.txt").write_text("img_name,target\n" + "\n".join(names) + "\n")


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a worker that just exited
            pass
    return total


def run_stage(cfg: list[dict]) -> dict:
    """Run the stage in a child process on [settings, layout entries]; return its own numbers plus the sampled peak
    tree RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc, peak, stop = psutil.Process(child.pid), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], tree_rss(proc))
            except psutil.Error:
                pass
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = child.communicate()
    stop.set()
    thread.join()
    if child.returncode != 0:
        raise RuntimeError(f"prepare failed with exit code {child.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    res["images_per_s"] = res["n_images"] / res["seconds"]
    res["store_ratio"] = res["store"]["ratio"]
    res["peak_tree_rss_mb"] = peak[0] / 2**20
    return res


def checksum_cost(store: Path, stage_seconds: float, repeats: int = 3) -> dict:
    """Time of crc32 over every image of ``store`` against stage 1 (``stage_seconds``) and against reading and
    decoding every image (best of ``repeats``, warm page cache: the checksum's share is largest then)."""
    import zlib

    from dfpipe.data.images import decode_image
    from dfpipe.data.store import SHARD_SUFFIX, StoreReader, index_path

    items = [(str(shard), k) for shard in sorted(store.glob(f"*{SHARD_SUFFIX}"))
             for k, (_, n, *_) in enumerate(np.load(index_path(shard))) if n]
    datas = [StoreReader().read(s, k) for s, k in items]
    crc, read = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d in datas:
            zlib.crc32(d)
        crc.append(time.perf_counter() - t0)
        reader = StoreReader()
        t0 = time.perf_counter()
        for s, k in items:
            decode_image(reader.read(s, k))
        read.append(time.perf_counter() - t0)
    from dfpipe.data.samples import load_manifest
    from dfpipe.data.store import check_manifest

    sha, man = [], []
    for _ in range(repeats):  # the manifest's sha256, checked before each parse, against the whole load
        t0 = time.perf_counter()
        check_manifest(store, "stage 1")
        sha.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        load_manifest(store)
        man.append(time.perf_counter() - t0)
    return {"manifest_check_seconds": min(sha), "load_manifest_seconds": min(man),
            "n_images": len(items), "bytes": sum(map(len, datas)), "crc32_seconds": min(crc),
            "crc32_mb_per_s": sum(map(len, datas)) / min(crc) / 1e6, "read_decode_seconds": min(read),
            "share_of_stage1": min(crc) / stage_seconds, "share_of_read_decode": min(crc) / min(read)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--n", type=int, default=20000, help="images generated")
    ap.add_argument("--at", default="5000,20000", help="comma-separated sizes to prepare (each <= --n)")
    ap.add_argument("--min-px", type=int, default=64)
    ap.add_argument("--max-px", type=int, default=256)
    ap.add_argument("--max-side", type=int, default=0, help="prepare_data.max_side (0 = native resolution)")
    ap.add_argument("--workers", type=int, default=0, help="prepare_data.workers (0 = all cores)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.at.split(",")]
    if max(sizes) > args.n:
        ap.error(f"--at {args.at}: sizes must be <= --n {args.n}")
    result: dict = {"n_generated": args.n, "px_range": [args.min_px, args.max_px], "max_side": args.max_side,
                    "workers": args.workers or os.cpu_count(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_images(tmp / "raw", args.n, args.min_px, args.max_px)
        result["generate_seconds"] = time.perf_counter() - t0
        for n in sizes:
            cfg = {"max_side": args.max_side, "workers": args.workers, "limit": n}
            paths = {"data_root": str(tmp / "raw"), "prepared": str(tmp / f"p{n}"),
                     "prepare_report": str(tmp / f"r{n}.json"), "duplicates": str(tmp / f"d{n}.csv")}
            result["runs"][str(n)] = run_stage([cfg, paths])
            print(f"{n} images: {result['runs'][str(n)]}", file=sys.stderr)
        hi_n = str(max(sizes))
        result["checksum"] = checksum_cost(tmp / f"p{hi_n}", result["runs"][hi_n]["seconds"])
    lo, hi = result["runs"][str(min(sizes))], result["runs"][str(max(sizes))]
    result["peak_rss_ratio_largest_vs_smallest"] = hi["peak_tree_rss_mb"] / lo["peak_tree_rss_mb"]
    result["bounded"] = abs(result["peak_rss_ratio_largest_vs_smallest"] - 1) < 0.2
    result["images_per_s"] = hi["images_per_s"]  # stage 1 at the largest size
    result["store_ratio"] = hi["store_ratio"]  # store bytes / input file bytes, at the largest size
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
