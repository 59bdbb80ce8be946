"""Benchmark stage 3 (cluster_split) on CPU: embedding, clustering and fine-tune time and peak memory.

    python bench/bench_split.py --out bench_split.json [--n 20000 --size 64 --k 12 --store-size 64]

Writes N cheap procedural images (--store-size px, default --size) as a stage-1 image store in a temp
dir (lossless PNG shards of --shard-images images with ``dfpipe.data.store.write_png_shard``, a manifest
and ``store.json``; ``make_cache`` times it and gives the store's bytes), reads the pool back with
``dfpipe.data.samples.load_pool`` as stage 3 does, and streams its features (tf_efficientnet_lite0,
bundled weights, each stored image decoded and resized to --size px as stage 3 does) batch by batch
into a float16 ``.npy`` with ``dfpipe.cluster_split.embed.embed_to_file`` (``--embed-in-memory`` also
times the in-memory ``embed_pool``). On the file (as a memmap) it then times every k-means path of
``dfpipe.cluster_split.kmeans``: in-memory ``KMeans`` (n_init 4, what stage 3 uses up to ``minibatch_above``
rows), the chunked ``MiniBatchKMeans.partial_fit`` path (what it uses above), and ``torch_kmeans`` on
CPU (and on CUDA when present), with their agreement (adjusted Rand index) with ``KMeans``; then
silhouette k selection (``choose_k``) and one fine-tune epoch of the ``finetune`` embedder on
--finetune-n images. Peak memory: ``ru_maxrss`` of the process and psutil RSS sampled every 50 ms per
phase. On a shared machine, run it under ``nice`` and read the times as upper bounds.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dfpipe  # noqa: E402,F401  (its import sets the offline env vars: dfpipe.OFFLINE_ENV)

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
        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def procedural(rng: np.random.Generator, m: int, size: int) -> np.ndarray:
    """(m, size, size, 3) uint8 procedural RGB images (gradients, stripes, a square, noise)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = rng.uniform(1, 8, (m, 1, 1, 3)).astype(np.float32)
    phase = rng.uniform(0, 6.3, (m, 1, 1, 3)).astype(np.float32)
    img = 127 + 100 * np.sin(freq * (xx[None, :, :, None] + yy[None, :, :, None] * rng.uniform(-1, 1)) * 6.3
                             + phase)
    for i in range(m):
        x0, y0 = rng.integers(0, size // 2, 2)
        img[i, y0:y0 + size // 3, x0:x0 + size // 3] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_store(folder: Path, n: int, size: int, shard_images: int = 1024, seed: int = 0) -> dict:
    """A stage-1 image store of N procedural images in ``folder`` (all split ``train``): PNG shards of
    ``shard_images`` images (generated one shard at a time), ``manifest.csv`` and ``store.json``."""
    from dfpipe.data.preprocess import Stage1
    from dfpipe.data.store import shard_name, store_bytes_on_disk, write_png_shard, write_store_record

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files, index = [], []
    for k, s in enumerate(range(0, n, shard_images)):
        shard = shard_name("train", k)
        index += write_png_shard(folder / shard, procedural(rng, min(shard_images, n - s), size))
        files += [shard] * (len(index) - len(files))
    pd.DataFrame({"uid": [f"train/{i}.png" for i in range(n)], "img_name": [f"{i}.png" for i in range(n)],
                  "split": "train", "label": np.arange(n) % 2, "path": "", "cache_file": files,
                  "cache_index": index, "orig_w": size, "orig_h": size, "error": ""}
                 ).to_csv(folder / "manifest.csv", index=False)
    write_store_record(folder, Stage1())
    return {"n_shards": len(set(files)), "store_bytes": store_bytes_on_disk(folder)}


def timed(fn, *args, **kwargs) -> tuple[object, dict]:
    """(result, {"seconds", "peak_rss_mb"}) of ``fn(*args, **kwargs)``."""
    with RssPeak() as m:
        out = fn(*args, **kwargs)
    return out, {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak / 2**20, 1),
                 "rss_at_start_mb": round(m.start / 2**20, 1)}


def bench_embedding(args, tmp: Path, result: dict) -> Path:
    """Store, streamed (and optionally in-memory) embedding; returns the features file."""
    from dfpipe.data.samples import load_pool
    from dfpipe.cluster_split.embed import embed_pool, embed_to_file, load_backbone

    store, feats_path = tmp / "prepared", tmp / "features.npy"
    info, result["make_cache"] = timed(make_store, store, args.n, args.store_size, args.shard_images)
    result["make_cache"] |= {"cache_mb": round(info["store_bytes"] / 2**20, 1), "store_bytes": info["store_bytes"],
                             "store_bytes_per_image": round(info["store_bytes"] / args.n, 1),
                             "raw_uint8_bytes": args.n * args.store_size ** 2 * 3, "n_shards": info["n_shards"],
                             "images_per_s": round(args.n / max(result["make_cache"]["seconds"], 1e-9), 1)}
    print(f"store: {result['make_cache']['seconds']:.1f}s, {result['make_cache']['cache_mb']} MB", flush=True)
    pool = load_pool(store)  # as stage 3: every train/val image of the manifest, with its shard path
    model = load_backbone(args.backbone, "bundled")
    (_, dim), r = timed(embed_to_file, pool, model, args.size, args.batch_size, feats_path, workers=0)
    result["embed_stream"] = r | {"images_per_s": round(args.n / r["seconds"], 1), "dim": dim,
                                  "features_mb": round(feats_path.stat().st_size / 2**20, 1)}
    print(f"embed (streamed to memmap): {r['seconds']:.1f}s", flush=True)
    if args.embed_in_memory:
        mem, r = timed(embed_pool, pool, args.backbone, "bundled", args.size, args.batch_size, workers=0,
                       model=model)
        result["embed_in_memory"] = r | {"images_per_s": round(args.n / r["seconds"], 1),
                                         "equal_to_streamed": bool((mem == np.load(feats_path)).all())}
        print(f"embed (in memory): {r['seconds']:.1f}s", flush=True)
    if args.finetune_n:
        bench_finetune(args, pool.iloc[:args.finetune_n], result)
    return feats_path


def bench_finetune(args, pool: pd.DataFrame, result: dict) -> None:
    from dfpipe.cluster_split.finetune import finetune_embedder

    (_, hist), r = timed(finetune_embedder, pool, args.backbone, "bundled", args.size, 32, 1, 3e-4, 0, workers=0)
    result["finetune_epoch"] = r | {"n": len(pool), "img_size": args.size, "batch_size": 32,
                                    "images_per_s": round(len(pool) / hist[0]["seconds"], 1),
                                    "epoch_seconds": hist[0]["seconds"]}
    print(f"fine-tune: {hist[0]['seconds']:.1f}s per epoch of {len(pool)} images", flush=True)


def bench_kmeans(args, feats: np.ndarray, result: dict) -> None:
    """Every k-means path on the memmap, with its agreement with in-memory KMeans."""
    import torch
    from sklearn.metrics import adjusted_rand_score

    from dfpipe.cluster_split import kmeans

    engines = {"kmeans_in_memory": kmeans.KMeansEngine(minibatch_above=args.n),
               "kmeans_chunked_partial_fit": kmeans.KMeansEngine(minibatch_above=0)}
    if not args.no_torch_kmeans:
        engines["kmeans_torch_cpu"] = kmeans.KMeansEngine("torch", "cpu")
    if torch.cuda.is_available():
        engines["kmeans_torch_cuda"] = kmeans.KMeansEngine("torch", "cuda")
    ref = None
    for name, engine in engines.items():
        labels, r = timed(kmeans.kmeans_labels, feats, args.k, 0, engine=engine)
        ref = labels if ref is None else ref
        again = kmeans.kmeans_labels(feats, args.k, 0, engine=engine) if engine.device == "cpu" else labels
        result[name] = r | {"path": engine.describe(args.n)["path"], "deterministic": bool((labels == again).all()),
                            "n_clusters_found": int(len(np.unique(labels))),
                            "ari_vs_kmeans_in_memory": round(float(adjusted_rand_score(ref, labels)), 4)}
        print(f"{name}: {r['seconds']:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--n", type=int, default=20000, help="images (default 20000)")
    ap.add_argument("--size", type=int, default=64, help="model input side, px (default 64)")
    ap.add_argument("--store-size", type=int, default=0,
                    help="side of the stored images, px (default: --size; larger = decode + resize cost of native-size "
                         "images)")
    ap.add_argument("--shard-images", type=int, default=1024, help="images per store shard (default 1024)")
    ap.add_argument("--k", type=int, default=12, help="clusters (default 12, as params.yaml)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--embed-in-memory", action="store_true", help="also time the in-memory embed_pool")
    ap.add_argument("--no-torch-kmeans", action="store_true", help="skip torch_kmeans on CPU")
    ap.add_argument("--finetune-n", type=int, default=512, help="images for one fine-tune epoch (0 = skip)")
    ap.add_argument("--k-candidates", default="4,6,8,12,16", help="for the silhouette timing; '' = skip")
    args = ap.parse_args(argv)
    args.store_size = args.store_size or args.size

    import sklearn
    import torch

    from dfpipe.cluster_split import cluster, kmeans

    result: dict = {
        "n": args.n, "size": args.size, "store_size": args.store_size, "k": args.k, "backbone": args.backbone,
        "batch_size": args.batch_size, "shard_images": args.shard_images,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
                    "torch_threads": torch.get_num_threads(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "torch": torch.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
                    "cuda": torch.cuda.is_available()},
        "minibatch_above": kmeans.MINIBATCH_ABOVE,
        "stage3_kmeans_path": kmeans.make_engine("auto").describe(args.n)["path"],
    }
    with tempfile.TemporaryDirectory(prefix="bench_split_") as tmp:
        feats = np.load(bench_embedding(args, Path(tmp), result), mmap_mode="r")
        bench_kmeans(args, feats, result)
        if args.k_candidates:
            cands = [int(k) for k in args.k_candidates.split(",")]
            (best, scores), r = timed(cluster.choose_k, feats, cands, 0)
            result["choose_k"] = r | {"best_k": best, "scores": scores}
            print(f"choose_k: {r['seconds']:.1f}s", flush=True)
        del feats
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
