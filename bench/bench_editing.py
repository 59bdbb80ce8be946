"""Benchmark the editing forgeries (stage 2) at native resolutions: seconds per fake, per method and size.

    python bench/bench_editing.py --out reports/bench/bench_editing.json [--sizes 1024x768,2048x1536,4000x3000]

Stage 1 keeps images at their native size (700-1200 px, some 3-4k), so the cost of one fake must
grow about linearly with the pixels. For each size (WxH) a synthetic image and donor are made and
each method of :data:`dfpipe.augment_sd.editing.METHODS` makes ``--reps`` fakes (seeds 0..reps-1, after
one warm-up); the median seconds are reported, with the part spent in ``region_mask`` and the
seconds per megapixel. ``region_mask`` alone is timed on its grid (the default) and, with
``--direct``, drawn directly at the full size (``grid=None``: the blur kernels grow with the side,
as before the grid existed), with the mean absolute difference between the two masks.
Single-threaded OpenCV (``--threads``) so that the numbers compare across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dfpipe  # noqa: E402,F401  (its import sets the offline env vars: dfpipe.OFFLINE_ENV)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from dfpipe.augment_sd import editing  # noqa: E402
from dfpipe.augment_sd.editing import MASK_GRID, METHODS, NEEDS_DONOR, region_mask  # noqa: E402
from dfpipe.io import write_json  # noqa: E402


def synthetic(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth, textured uint8 RGB image of (h, w)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = (np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=2) * rng.uniform(80, 200, 3)).astype(np.uint8)
    side = min(h, w)
    for _ in range(4):
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                   int(rng.integers(side // 10, side // 3)), colour, -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1024x768,2048x1536' -> [(1024, 768), (2048, 1536)] as (width, height)."""
    sizes = []
    for part in text.split(","):
        w, h = (int(v) for v in part.lower().split("x"))
        sizes.append((w, h))
    return sizes


def bench_size(w: int, h: int, reps: int, direct: bool) -> dict:
    rng = np.random.default_rng(0)
    img, donor = synthetic(rng, h, w), synthetic(rng, h, w)
    mp = h * w / 1e6
    in_mask = {"s": 0.0}
    plain = editing.region_mask

    def timed_mask(*a, **k):
        t = time.perf_counter()
        try:
            return plain(*a, **k)
        finally:
            in_mask["s"] += time.perf_counter() - t

    out: dict = {"width": w, "height": h, "megapixels": round(mp, 3), "methods": {}}
    editing.region_mask = timed_mask  # the methods look it up in the module at call time
    try:
        for name, fn in METHODS.items():
            d = donor if name in NEEDS_DONOR else None
            fn(img, np.random.default_rng(10_000), d)  # warm-up
            secs, mask_secs = [], []
            for seed in range(reps):
                in_mask["s"] = 0.0
                t = time.perf_counter()
                fake, mask, _ = fn(img, np.random.default_rng(seed), d)
                secs.append(time.perf_counter() - t)
                mask_secs.append(in_mask["s"])
                if fake.shape != img.shape or mask.shape != img.shape[:2] or not np.array_equal(
                        fake[mask == 0], img[mask == 0]):
                    raise AssertionError(f"{name} at {w}x{h}: contract broken")
            med = statistics.median(secs)
            out["methods"][name] = {"seconds": round(med, 4),
                                    "region_mask_seconds": round(statistics.median(mask_secs), 4),
                                    "seconds_per_mp": round(med / mp, 4)}
    finally:
        editing.region_mask = plain
    total = sum(v["seconds"] for v in out["methods"].values())
    out["all_methods_seconds"] = round(total, 4)
    out["mean_seconds_per_fake"] = round(total / len(METHODS), 4)

    masks = {}
    for kind, kw in (("face", {"face": True}), ("blob", {})):
        secs = []
        for seed in range(reps):
            t = time.perf_counter()
            m, _ = region_mask(h, w, np.random.default_rng(seed), **kw)
            secs.append(time.perf_counter() - t)
        masks[kind] = {"grid_seconds": round(statistics.median(secs), 4)}
        if direct:
            t = time.perf_counter()
            full, _ = region_mask(h, w, np.random.default_rng(reps - 1), grid=None, **kw)
            masks[kind]["direct_seconds"] = round(time.perf_counter() - t, 4)
            masks[kind]["mean_abs_diff_vs_direct"] = round(float(np.abs(full - m).mean()), 5)
    out["region_mask"] = masks
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--sizes", default="1024x768,2048x1536", help="comma-separated WxH (e.g. add 4000x3000)")
    p.add_argument("--reps", type=int, default=3, help="fakes per method and size (median reported)")
    p.add_argument("--direct", action="store_true", help="also time region_mask drawn at full size (slow)")
    p.add_argument("--threads", type=int, default=1, help="cv2.setNumThreads")
    args = p.parse_args(argv)
    cv2.setNumThreads(args.threads)
    result = {
        "mask_grid": MASK_GRID, "reps": args.reps, "cv2_threads": args.threads, "cpus": os.cpu_count(),
        "python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
        "machine": platform.machine(),
        "sizes": [bench_size(w, h, args.reps, args.direct) for w, h in parse_sizes(args.sizes)],
    }
    write_json(args.out, result)  # atomic: a killed bench never leaves half a report
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
