"""Benchmark stage 3 (cluster_split) on CPU: embedding and clustering time and peak memory for N images.

    python bench/bench_split.py --out bench_split.json [--n 20000 --size 64 --k 12]

Builds a uint8 cache of N cheap procedural images (``np.lib.format.open_memmap``, in a temp dir),
embeds it with ``dfpipe.split.embed.embed_pool`` (tf_efficientnet_lite0, bundled weights, at --size
px), then times ``kmeans_labels`` (MiniBatchKMeans above ``MINIBATCH_ABOVE`` samples, else KMeans),
MiniBatchKMeans (batch 2048, n_init 3) and, unless --no-full-kmeans, full KMeans (n_init 4) on the
same features for comparison, and
silhouette k selection (``choose_k``). Peak memory: ``ru_maxrss`` of the process and psutil RSS
sampled every 50 ms per phase. Defaults (N 20000, 64 px) finish in well under 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_ALBUMENTATIONS_UPDATE", "DVC_NO_ANALYTICS"):
    os.environ.setdefault(_k, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402


class RssPeak:
    """Peak RSS (bytes) of this process, sampled in a thread while the block runs."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak = every, 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self) -> RssPeak:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def make_cache(path: Path, n: int, size: int, seed: int = 0) -> None:
    """N procedural RGB images (gradients, stripes, a square, noise) into a .npy memmap, in chunks."""
    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    chunk = 1024
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        freq = rng.uniform(1, 8, (m, 1, 1, 3)).astype(np.float32)
        phase = rng.uniform(0, 6.3, (m, 1, 1, 3)).astype(np.float32)
        img = 127 + 100 * np.sin(freq * (xx[None, :, :, None] + yy[None, :, :, None] * rng.uniform(-1, 1)) * 6.3
                                 + phase)
        for i in range(m):
            x0, y0 = rng.integers(0, size // 2, 2)
            img[i, y0:y0 + size // 3, x0:x0 + size // 3] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape).astype(np.float32)
        arr[s:s + m] = np.clip(img, 0, 255).astype(np.uint8)
    arr.flush()
    del arr


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--n", type=int, default=20000, help="images (default 20000)")
    ap.add_argument("--size", type=int, default=64, help="cache and model input side, px (default 64)")
    ap.add_argument("--k", type=int, default=12, help="clusters (default 12, as params.yaml)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--no-full-kmeans", action="store_true", help="skip the full-KMeans comparison")
    ap.add_argument("--k-candidates", default="4,6,8,12,16", help="for the silhouette timing; '' = skip")
    args = ap.parse_args(argv)

    import sklearn
    import torch
    from sklearn.cluster import KMeans, MiniBatchKMeans

    from dfpipe.split import cluster
    from dfpipe.split.embed import embed_pool

    result: dict = {
        "n": args.n, "size": args.size, "k": args.k, "backbone": args.backbone, "batch_size": args.batch_size,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "torch": torch.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
                    "cuda": torch.cuda.is_available()},
        "kmeans_labels_uses": "MiniBatchKMeans(batch_size=2048, n_init=3)" if args.n > cluster.MINIBATCH_ABOVE
        else "KMeans(n_init=4)",
        "minibatch_above": cluster.MINIBATCH_ABOVE,
    }
    with tempfile.TemporaryDirectory(prefix="bench_split_") as tmp:
        cache = Path(tmp) / "train.npy"
        with RssPeak() as m:
            make_cache(cache, args.n, args.size)
        result["make_cache"] = {"seconds": round(m.seconds, 2), "cache_mb": round(cache.stat().st_size / 2**20, 1)}
        pool = pd.DataFrame({"uid": [f"train/{i}.png" for i in range(args.n)], "label": np.arange(args.n) % 2,
                             "cache_path": str(cache), "cache_index": np.arange(args.n)})
        with RssPeak() as m:
            feats = embed_pool(pool, args.backbone, "bundled", args.size, args.batch_size, workers=0)
        result["embed"] = {"seconds": round(m.seconds, 2), "images_per_s": round(args.n / m.seconds, 1),
                           "peak_rss_mb": round(m.peak / 2**20, 1), "dim": int(feats.shape[1])}
        print(f"embed: {m.seconds:.1f}s", flush=True)

    x = feats.astype(np.float32)
    with RssPeak() as m:
        a = cluster.kmeans_labels(x, args.k, seed=0)
    b = cluster.kmeans_labels(x, args.k, seed=0)
    result["kmeans_labels"] = {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak / 2**20, 1),
                               "deterministic": bool((a == b).all()), "n_clusters_found": int(len(np.unique(a)))}
    print(f"kmeans_labels: {m.seconds:.1f}s", flush=True)
    with RssPeak() as m:
        MiniBatchKMeans(n_clusters=args.k, batch_size=2048, n_init=3, random_state=0).fit_predict(x)
    result["minibatch_kmeans_n_init3"] = {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak / 2**20, 1)}
    print(f"MiniBatchKMeans: {m.seconds:.1f}s", flush=True)
    if not args.no_full_kmeans:
        with RssPeak() as m:
            KMeans(n_clusters=args.k, n_init=4, random_state=0).fit_predict(x)
        result["full_kmeans_n_init4"] = {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak / 2**20, 1)}
        print(f"full KMeans: {m.seconds:.1f}s", flush=True)
    if args.k_candidates:
        cands = [int(k) for k in args.k_candidates.split(",")]
        with RssPeak() as m:
            best, scores = cluster.choose_k(x, cands, seed=0)
        result["choose_k"] = {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak / 2**20, 1),
                              "best_k": best, "scores": scores}
        print(f"choose_k: {m.seconds:.1f}s", flush=True)
    result["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
