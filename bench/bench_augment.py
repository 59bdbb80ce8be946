"""Benchmark stage 2 on CPU: editing forgeries per method, real widening, the whole stage, tiny SD.

    python bench/bench_augment.py --out reports/bench/bench_augment.json [--n 200 --size 160]

Images are synthetic (gradients, discs, noise) at ``size`` x ``size``. Throughputs are images per
second of one process unless named otherwise. The whole-stage timing reads a stage-1 image store (one
lossless PNG shard written with ``dfpipe.data.store.write_png_shard``, a manifest and ``store.json``),
checks that the process pool writes the same stage-2 store as one process (its ``aug-*.bin`` shards
and ``aug-*.idx.npy`` indices, byte for byte) and gives both stores' sizes. The diffusion numbers use
the tiny RANDOM-weight pipeline (64 px native, a few hundred kB): they time the diffusers code path,
not Stable Diffusion 1.5 at 512 px, which is orders of magnitude slower and belongs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dfpipe  # noqa: E402,F401  (its import sets the offline env vars: dfpipe.OFFLINE_ENV)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dfpipe.augment_sd import pipeline as stage  # noqa: E402
from dfpipe.augment_sd.editing import METHODS, NEEDS_DONOR  # noqa: E402
from dfpipe.augment_sd.pipeline import WIDEN, edit_one, n_workers, run as run_stage  # noqa: E402
from dfpipe.layout import Layout  # noqa: E402
from dfpipe.config import AugmentConfig, DiffusionConfig  # noqa: E402
from dfpipe.io import write_json  # noqa: E402


def synthetic(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth, textured uint8 RGB image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = (np.stack([xx, yy, (xx + yy) / 2], axis=2) * rng.uniform(80, 200, 3)).astype(np.uint8)
    for _ in range(4):
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.circle(img, tuple(int(v) for v in rng.integers(0, size, 2)), int(rng.integers(size // 10, size // 3)),
                   colour, -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def timed(fn: Callable[[], object], n: int) -> dict:
    """Run ``fn`` (which makes ``n`` images); images per second and seconds."""
    start = time.perf_counter()
    fn()
    sec = time.perf_counter() - start
    return {"images": n, "seconds": round(sec, 3), "images_per_s": round(n / sec, 2)}


def bench_editing(images: list[np.ndarray], n: int) -> dict:
    out = {}
    for method in [*sorted(METHODS), WIDEN]:
        def run(m: str = method) -> None:
            for i in range(n):
                donor = images[(i + 1) % len(images)] if m in NEEDS_DONOR else None
                edit_one(m, images[i % len(images)], 1000 + i, donor)

        edit_one(method, images[0], 0, images[1] if method in NEEDS_DONOR else None)  # warm-up
        out[method] = timed(run, n)
    edits = [v for k, v in out.items() if k != WIDEN]
    total_s = sum(v["seconds"] for v in edits)
    out["all_editing_methods"] = {"images": n * len(edits), "seconds": round(total_s, 3),
                                  "images_per_s": round(n * len(edits) / total_s, 2)}
    return out


def prepared_dir(root: Path, images: list[np.ndarray]) -> Path:
    """A stage-1 image store whose train split is ``images``, all real: one PNG shard, manifest, store.json."""
    from dfpipe.data.preprocess import Stage1
    from dfpipe.data.store import shard_name, write_png_shard, write_store_record

    root.mkdir(parents=True)
    shard = shard_name("train", 0)
    index = write_png_shard(root / shard, images)
    pd.DataFrame({"uid": [f"train/{i:05d}.jpg" for i in range(len(images))],
                  "img_name": [f"{i:05d}.jpg" for i in range(len(images))], "split": "train", "label": 0,
                  "path": "", "cache_file": shard, "cache_index": index,
                  "orig_w": [im.shape[1] for im in images], "orig_h": [im.shape[0] for im in images],
                  "error": ""}).to_csv(root / "manifest.csv", index=False)
    write_store_record(root, Stage1())
    return root


def shard_files(folder: Path) -> list[Path]:
    """The store's shards and their indices, by name."""
    from dfpipe.data.store import INDEX_SUFFIX, SHARD_SUFFIX

    return sorted([*folder.glob(f"*{SHARD_SUFFIX}"), *folder.glob(f"*{INDEX_SUFFIX}")])


def same_store(a: Path, b: Path) -> bool:
    """The two stage-2 outputs hold the same shard files with the same bytes."""
    fa, fb = shard_files(a), shard_files(b)
    return bool(fa) and [f.name for f in fa] == [f.name for f in fb] and \
        all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))


def bench_stage(images: list[np.ndarray], tmp: Path) -> dict:
    """The whole stage (plan, generate, work files, merge into the stage-2 store, manifest, contact sheet):
    1 fake per real, all six methods, 0.5 widened reals per real; in-process and with the process pool
    (workers = 0). Also the bytes of the prepared store and of the stage-2 store it writes."""
    from dfpipe.data.store import SHARD_SUFFIX, store_bytes_on_disk

    prep = prepared_dir(tmp / "prepared", images)
    n_images = len(images) + int(round(0.5 * len(images)))
    out = {}
    cores = max(2, n_workers(0, 10**9))  # 2 processes at least, so the identity check means something
    for workers in (1, cores):
        cfg = AugmentConfig(seed=0, fakes_per_real=1.0, methods={m: 1.0 for m in METHODS}, real_widening=0.5,
                            workers=workers)
        layout = Layout(prepared=str(prep), augmented=str(tmp / f"aug_{workers}"))
        key = "in_process" if workers == 1 else f"pool_{workers}_processes_forced"
        saved, stage.MIN_JOBS_PER_WORKER = stage.MIN_JOBS_PER_WORKER, 1  # small n: use the pool anyway
        try:
            out[key] = timed(lambda c=cfg, lay=layout: run_stage(c, lay), n_images)
        finally:
            stage.MIN_JOBS_PER_WORKER = saved
    out["note"] = (f"the stage uses the pool only from {stage.MIN_JOBS_PER_WORKER} images per process on; "
                   "pool times include spawning the processes")
    out["pool_output_identical"] = same_store(tmp / "aug_1", tmp / f"aug_{cores}")
    aug = tmp / "aug_1"
    out["prepared_store_bytes"] = store_bytes_on_disk(prep)
    out["output_store_bytes"] = store_bytes_on_disk(aug)
    out["output_shards"] = len(list(aug.glob(f"*{SHARD_SUFFIX}")))
    out["output_images"] = int(len(pd.read_csv(aug / "manifest.csv")))
    out["output_bytes_per_image"] = round(out["output_store_bytes"] / max(out["output_images"], 1), 1)
    return out


def bench_diffusion(images: list[np.ndarray], n: int, steps: int, batch_size: int) -> dict:
    import torch

    from dfpipe.augment_sd.diffusion import TINY_MODEL, load_pipeline, native_size
    from dfpipe.augment_sd.generate import prompt_embeds, sd_batch

    out: dict = {"note": "tiny RANDOM-weight pipeline (UNet/VAE 32/64 channels), run at its 64 px native size; "
                         "times the diffusers code path only, not Stable Diffusion 1.5 at 512 px",
                 "steps": steps, "batch_size": batch_size, "device": "cpu", "torch_threads": torch.get_num_threads()}
    srcs = [images[i % len(images)] for i in range(n)]
    for mode, strength in (("img2img", 0.5), ("inpaint", 1.0)):
        d = DiffusionConfig(model=TINY_MODEL, mode=mode, steps=steps, strength=strength, batch_size=batch_size)
        pipe = load_pipeline(TINY_MODEL, mode, "float32", "cpu")
        embeds = prompt_embeds(pipe)
        sd_batch(pipe, d, srcs[:1], [0], embeds)  # warm-up

        def run(p: object = pipe, cfg: DiffusionConfig = d) -> None:
            for s in range(0, n, batch_size):
                sd_batch(p, cfg, srcs[s:s + batch_size], list(range(s, min(n, s + batch_size))), embeds)

        out[mode] = {**timed(run, n), "strength": strength, "denoising_steps": int(steps * strength),
                     "work_size": native_size(pipe)}
    return out


def machine() -> dict:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "usable_cores": cores,
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "numpy": np.__version__, "opencv": cv2.__version__, "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "opencv_threads": cv2.getNumThreads()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--n", type=int, default=200, help="images per editing method (and real sources for the stage)")
    p.add_argument("--size", type=int, default=160, help="image side in pixels")
    p.add_argument("--sd-n", type=int, default=16, help="images per diffusion mode")
    p.add_argument("--sd-steps", type=int, default=4)
    p.add_argument("--sd-batch", type=int, default=4)
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads for the diffusion part")
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    images = [synthetic(rng, args.size) for _ in range(args.n)]
    result: dict = {"benchmark": "augment", "n": args.n, "size": args.size, "machine": machine()}
    result["editing"] = bench_editing(images, args.n)
    tmp = Path(tempfile.mkdtemp(prefix="bench_augment_"))
    try:
        result["stage"] = bench_stage(images, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["real_widening"] = result["editing"][WIDEN]
    result["diffusion_tiny"] = bench_diffusion(images, args.sd_n, args.sd_steps, args.sd_batch)
    write_json(args.out, result)  # atomic: a killed bench never leaves half a report
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
