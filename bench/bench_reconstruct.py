"""Benchmark stage 2's reconstruction fakes on CPU: images per second for taef2 and random_ae at 256 px.

    python bench/bench_reconstruct.py --out reports/bench/bench_reconstruct.json [--n 32 --threads 2]

Images: real face crops from ``../shared/data/dfdc_faces/real`` (224 px JPEG q75) resized to 256 px and
saved again as JPEG q75, so the parity path (the real's quantisation tables) runs as in the stage;
synthetic images when that folder is absent. For each method, a pair costs the model call (batched,
``--batch`` images) plus parity / post-processing / decoding (:mod:`dfpipe.augment_sd.reconstruct.parity`),
both timed. random_ae also costs training once per stage run: ``--ae-steps`` steps of each of
``--ae-models`` models are timed and extrapolated to the configured ``ae_steps``. The extrapolation to
2,000 reals uses stage 2's default mix (taef2 : random_ae = 1 : 1, one reconstruction per real).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_ALBUMENTATIONS_UPDATE", "DVC_NO_ANALYTICS"):
    os.environ.setdefault(_k, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dfpipe.augment_sd.reconstruct import METHODS, Context, Reconstructor, ae_seed, random_ae, reconstruct  # noqa: E402
from dfpipe.augment_sd.reconstruct.parity import draw_post, encode, fake_bytes, real_bytes  # noqa: E402
from dfpipe.config import ReconstructConfig  # noqa: E402
from dfpipe.data.images import decode_image  # noqa: E402
from dfpipe.io import write_json  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dfdc_faces" / "real"


def load_images(n: int, size: int) -> tuple[list[bytes], str]:
    """``n`` JPEG q75 files of ``size`` px (the bytes a stage-1 store keeps) and where they came from."""
    files = sorted(SHARED.glob("*.jpg"))[:n]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if len(files) == n:
            img = cv2.resize(decode_image(files[i]), (size, size), interpolation=cv2.INTER_CUBIC)
        else:
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
            img = np.clip(np.stack([xx, yy, (xx + yy) / 2], 2) * 255 + rng.normal(0, 6, (size, size, 3)), 0, 255)
            img = img.astype(np.uint8)
        out.append(encode(img, "jpeg", 75))
    return out, (f"dfdc_faces/real (first {n}, resized to {size})" if len(files) == n else "synthetic")


def time_pairs(rec: Reconstructor, raws: list[bytes], r: ReconstructConfig) -> dict:
    """Seconds per pair: model (batched) and parity + post-processing + decode of both images."""
    reals = [decode_image(b) for b in raws]
    reconstruct(rec, reals[:r.batch_size], r.batch_size)  # warm-up
    t = time.perf_counter()
    made = reconstruct(rec, reals, r.batch_size)
    model_s = time.perf_counter() - t
    t = time.perf_counter()
    for i, (raw, real, m) in enumerate(zip(raws, reals, made)):
        post = draw_post(i, r, *real.shape[:2])
        decode_image(fake_bytes(m, raw, post)[0])
        if post.new_real:
            decode_image(real_bytes(raw, real, post))
    post_s = time.perf_counter() - t
    n = len(raws)
    return {"model_s_per_image": round(model_s / n, 4), "parity_post_s_per_pair": round(post_s / n, 4),
            "images_per_s": round(n / (model_s + post_s), 3)}


def bench_random_ae(raws: list[bytes], r: ReconstructConfig, steps: int) -> dict:
    reals = [decode_image(b) for b in raws]
    models, train_s = [], []
    for k in range(r.ae_models):
        seed = ae_seed(0, k)
        model = random_ae.build(seed)
        patches = random_ae.crops(reals, r.ae_crop, seed)
        t = time.perf_counter()
        random_ae.train(model, patches, steps, r.ae_batch, seed)
        train_s.append((time.perf_counter() - t) * r.ae_steps / steps)
        models.append(model)
    per_model = []
    for model in models:
        rec = Reconstructor(model.requires_grad_(False), model.arch.factor, {})
        per_model.append({"arch": random_ae.describe(model), "train_s_extrapolated": round(train_s[len(per_model)], 1),
                          **time_pairs(rec, raws, r)})
    per_image = float(np.mean([1 / m["images_per_s"] for m in per_model]))  # pairs spread evenly over models
    return {"models": per_model, "train_s_total_extrapolated": round(sum(train_s), 1),
            "images_per_s": round(1 / per_image, 3), "timed_steps_per_model": steps}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=32, help="images timed per method")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the stage uses all cores)")
    p.add_argument("--ae-steps", type=int, default=30, help="random_ae training steps timed per model")
    p.add_argument("--reals", type=int, default=2000, help="extrapolate to this many reals")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    r = ReconstructConfig(per_real=1.0)
    raws, source = load_images(args.n, args.size)
    load = os.getloadavg()[0]
    taef2 = time_pairs(METHODS["taef2"](r, Context())[0], raws, r)
    rae = bench_random_ae(raws, r, args.ae_steps)
    mix = 0.5 / taef2["images_per_s"] + 0.5 / rae["images_per_s"]  # seconds per pair, default 1 : 1 mix
    extrap = {"taef2_only_min": round(args.reals / taef2["images_per_s"] / 60, 1),
              "random_ae_only_min": round((args.reals / rae["images_per_s"] + rae["train_s_total_extrapolated"]) / 60, 1),
              "default_mix_min": round((args.reals * mix + rae["train_s_total_extrapolated"]) / 60, 1)}
    result = {
        "images": source, "n": args.n, "size": args.size, "torch_threads": args.threads,
        "cpus": os.cpu_count(), "load_avg_1min_at_start": round(load, 2), "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "note": "2 CPU cores shared with other workers' jobs while timing: numbers are upper bounds on the cost",
        "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
        "config": {"batch_size": r.batch_size, "ae_models": r.ae_models, "ae_steps": r.ae_steps, "ae_crop": r.ae_crop,
                   "ae_batch": r.ae_batch, "clean_share": r.clean_share},
        "taef2": taef2, "random_ae": rae, f"extrapolated_{args.reals}_reals": extrap,
        "target_min": 20,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=1))  # noqa: T201 - the script's result on stdout, as the other bench scripts
