"""Benchmark self-blended images from face landmarks (stage 2, ``augment_sd.landmarks``): seconds per image.

    python bench/bench_landmarks.py --out reports/bench/bench_landmarks.json [--n 300] [--images DIR]

For each real image (default: the first ``--n`` real images of ``../shared/data/yonsei_faces/trainset``
by its label file; without that folder, skimage's astronaut at a few sizes): the landmark detector's
seconds (``--detector``, default mediapipe), then ``self_blend`` from those landmarks (SBI's hull mask),
and for comparison ``self_blend`` with today's random face region (``augment_sd.landmarks: none``).
Decoding is not timed. Reports median / mean / p95 seconds, the share of images with a face, the mask
kinds used, and the process CPU seconds per image (catches a detector that runs threads of its own).
Single-threaded OpenCV (``--threads``), so numbers compare across machines.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dfpipe  # noqa: E402,F401  (its import sets the offline env vars: dfpipe.OFFLINE_ENV)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from dfpipe.augment_sd.editing import self_blend  # noqa: E402
from dfpipe.data import landmarks as lmk  # noqa: E402
from dfpipe.io import write_json  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "yonsei_faces" / "trainset"


def load_images(folder: Path | None, n: int) -> tuple[str, list[np.ndarray]]:
    """(description, RGB images): real images of ``folder`` (label 0 when a ``<folder>_label.txt`` exists)."""
    if folder is not None and folder.is_dir():
        labels = folder.parent / f"{folder.name}_label.txt"
        if labels.is_file():
            import pandas as pd

            lab = pd.read_csv(labels)
            names = sorted(lab.loc[lab.target == 0, "img_name"])
        else:
            names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        imgs = []
        for name in names[:n]:
            bgr = cv2.imread(str(folder / name))
            if bgr is not None:
                imgs.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        return f"{folder} (first {len(imgs)} real images)", imgs
    from skimage import data

    base = data.astronaut()
    sizes = [256, 512, 1024, 2048]
    imgs = [cv2.resize(base, (s, s), interpolation=cv2.INTER_AREA if s < 512 else cv2.INTER_CUBIC) for s in sizes]
    return f"skimage astronaut at {sizes} px (no {folder})", [imgs[i % len(imgs)] for i in range(min(n, 40))]


def stats(xs: list[float]) -> dict:
    a = np.asarray(xs)
    return {"median_ms": round(1e3 * float(np.median(a)), 2), "mean_ms": round(1e3 * float(a.mean()), 2),
            "p95_ms": round(1e3 * float(np.percentile(a, 95)), 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of real images")
    p.add_argument("--n", type=int, default=300, help="images to time")
    p.add_argument("--detector", default="mediapipe", choices=[d for d in lmk.LANDMARKERS if d != "none"])
    p.add_argument("--threads", type=int, default=1, help="cv2.setNumThreads")
    args = p.parse_args(argv)
    cv2.setNumThreads(args.threads)
    source, imgs = load_images(args.images, args.n)
    det = lmk.get_landmarker(args.detector)  # built once, as in a stage worker
    det.detect(imgs[0])  # warm-up
    t_det, t_sbi, t_rand, shapes, found = [], [], [], {}, 0
    cpu_det = cpu_sbi = 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i, img in enumerate(imgs):
        t, c = time.perf_counter(), time.process_time()
        pts = det.detect(img)
        t_det.append(time.perf_counter() - t)
        cpu_det += time.process_time() - c
        found += pts is not None
        t, c = time.perf_counter(), time.process_time()
        _, _, params = self_blend(img, np.random.default_rng(i), landmarks=pts)
        t_sbi.append(time.perf_counter() - t)
        cpu_sbi += time.process_time() - c
        shapes[params["mask"]["shape"]] = shapes.get(params["mask"]["shape"], 0) + 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    for i, img in enumerate(imgs):
        t = time.perf_counter()
        self_blend(img, np.random.default_rng(i))
        t_rand.append(time.perf_counter() - t)
    total = [a + b for a, b in zip(t_det, t_sbi)]
    sides = [max(im.shape[:2]) for im in imgs]
    result = {
        "images": source, "n": len(imgs), "detector": args.detector,
        "longer_side_px": {"median": int(statistics.median(sides)), "max": int(max(sides))},
        "face_found": round(found / len(imgs), 4),
        "mask_shapes": shapes,
        "landmarks": stats(t_det), "self_blend_from_landmarks": stats(t_sbi),
        "landmarks_plus_blend": stats(total), "self_blend_random_region": stats(t_rand),
        # process CPU time, mean per image (wall times above grow when other jobs share the cores)
        "cpu_ms": {"landmarks": round(1e3 * cpu_det / len(imgs), 2), "self_blend_from_landmarks":
                   round(1e3 * cpu_sbi / len(imgs), 2), "landmarks_plus_blend": round(1e3 * cpu / len(imgs), 2)},
        "cpu_seconds_per_wall_second": round(cpu / wall, 3),  # > 1: the detector runs threads of its own
        "cv2_threads": args.threads, "cpus": os.cpu_count(), "python": platform.python_version(),
        "numpy": np.__version__, "opencv": cv2.__version__, "machine": platform.machine(),
    }
    write_json(args.out, result)  # atomic: a killed bench never leaves half a report
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
