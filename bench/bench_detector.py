"""Benchmark: the shipped detector (dfpipe/assets/detector) scoring image files end to end on this machine's CPUs,
as ``dfpipe scan`` does (decode in worker processes, stage 1, each expert's input policy, the card's TTA views).

Issue 23's bar: at least 20 images/s on 2 CPU cores. The images are JPEGs written here (``--size`` px squares of
smooth random content, quality 90, the dev sources' format and size range), so the run needs no data; the model
load is timed apart. The best of ``--repeats`` passes is reported.

    python bench/bench_detector.py --out reports/bench/bench_detector.json [--n 256 --size 256]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfpipe.io import write_json  # noqa: E402
from dfpipe.serve.scan import score_paths  # noqa: E402
from dfpipe.serve.service import SHIPPED_DIR, load_ensemble  # noqa: E402

log = logging.getLogger("bench_detector")
TARGET_IMG_S = 20.0


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` smooth random colour JPEGs (noise blurred at two scales: content with edges and flat areas)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = cv2.resize(rng.uniform(0, 255, (8, 8, 3)).astype(np.float32), (size, size),
                            interpolation=cv2.INTER_CUBIC)
        img = np.clip(coarse + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        p = folder / f"{i:05d}.jpg"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/bench/bench_detector.json")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=-1, help="decode processes (-1 = auto, as scan)")
    ap.add_argument("--card", default=str(SHIPPED_DIR / "ensemble.json"))
    ap.add_argument("--models", default=str(SHIPPED_DIR))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    ens = load_ensemble(args.card, args.models, "cpu")
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.n, args.size)
        score_paths(ens, paths[: min(32, len(paths))], workers=args.workers)  # warm-up: worker start, allocator
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            scores, errors = score_paths(ens, paths, workers=args.workers)
            times.append(time.perf_counter() - t)
    if errors or not np.isfinite(scores).all():
        raise SystemExit(f"bench_detector: {len(errors)} image(s) not scored: {next(iter(errors.values()), '')}")
    best = min(times)
    card = json.loads(Path(args.card).read_text())
    report = {"n_images": args.n, "size": args.size, "images_per_s": round(args.n / best, 2),
              "seconds": [round(t, 3) for t in times], "model_load_s": round(load_s, 2),
              "target_images_per_s": TARGET_IMG_S, "meets_target": args.n / best >= TARGET_IMG_S,
              "experts": [e["name"] for e in card["experts"]], "tta": card["tta"], "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
              "python": platform.python_version(), "load_avg_1min_at_end": round(os.getloadavg()[0], 2)}
    write_json(args.out, report)
    log.info("%d images of %d px: %.1f images/s (target %.0f), model load %.1f s", args.n, args.size,
             report["images_per_s"], TARGET_IMG_S, load_s)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
