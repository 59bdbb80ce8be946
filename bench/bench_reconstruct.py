"""Benchmark stage 2's reconstruction fakes on CPU: images per second for taef2 and random_ae at 256 px.

    python bench/bench_reconstruct.py --out reports/bench/bench_reconstruct.json [--n 32 --stage-reals 64]

Images: real face crops from ``../shared/data/dfdc_faces/real`` (224 px JPEG q75) resized to 256 px and
saved again as JPEG q75, so the parity path (the real's quantisation tables) runs as in the stage;
synthetic images when that folder is absent. For each method, a pair costs the model call (batched,
``--batch`` images) plus parity / post-processing / decoding (:mod:`dfpipe.augment_sd.reconstruct.parity`),
both timed. random_ae also costs training once per stage run: ``--ae-steps`` steps of each of
``--ae-models`` models are timed and extrapolated to the configured ``ae_steps``. The extrapolation to
2,000 reals uses stage 2's default mix (taef2 : random_ae = 1 : 1, one reconstruction per real).

``stage``: stage 1 then stage 2 for real (reconstruction only, the default settings, ``workers: 0`` = one
single-threaded process per core) on ``--stage-reals`` such JPEGs; its wall time without the random_ae
training, per real, times 2,000, plus the training, is the extrapolated stage time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dfpipe  # noqa: E402,F401  (its import sets the offline env vars: dfpipe.OFFLINE_ENV)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dfpipe.augment_sd.reconstruct import (METHODS, Context, Reconstructor, ae_seed, random_ae,  # noqa: E402
                                           reconstruct, resolve_dtype)
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


def time_pairs(rec: Reconstructor, raws: list[bytes], r: ReconstructConfig, dtype: str | None = None) -> dict:
    """Seconds per pair: model (batched) and parity + post-processing + decode of both images."""
    reals = [decode_image(b) for b in raws]
    dtype = dtype or resolve_dtype(r.dtype, "cpu")
    reconstruct(rec, reals[:r.batch_size], r.batch_size, dtype)  # warm-up
    t = time.perf_counter()
    made = reconstruct(rec, reals, r.batch_size, dtype)
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


def bench_stage(raws: list[bytes]) -> dict:
    """Stage 1 + stage 2 (reconstruction only) on ``raws``; seconds in all, in random_ae training, per real."""
    import logging
    import tempfile

    from dfpipe.augment_sd import run as run_augment
    from dfpipe.augment_sd.reconstruct import stage
    from dfpipe.config import AugmentConfig, PrepareConfig
    from dfpipe.layout import Layout
    from dfpipe.prepare_data import run as prepare

    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        (raw / "trainset").mkdir(parents=True)
        (raw / "valset").mkdir()
        (raw / "testset").mkdir()
        for split in ("trainset", "valset"):  # every 4th real in val: stage 2 reads both splits
            names = [f"r{i}.jpg" for i in range(len(raws)) if (i % 4 == 3) == (split == "valset")]
            for name in names:
                (raw / split / name).write_bytes(raws[int(name[1:-4])])
            (raw / split / "fake.jpg").write_bytes(raws[0])  # stage 1 wants both classes; fakes are no source
            (raw / f"{split}_label.txt").write_text("img_name,target\nfake.jpg,1\n" + "".join(f"{n},0\n" for n in names))
        layout = Layout().under(tmp, data_root=str(raw))  # every stage's outputs under tmp
        prepare(PrepareConfig(workers=1), layout)
        timed = {"train_s": 0.0}
        plain = stage.load_models

        def load_models(*a, **k):  # the main process's call trains the random autoencoders
            t = time.perf_counter()
            try:
                return plain(*a, **k)
            finally:
                timed["train_s"] += time.perf_counter() - t

        stage.load_models = load_models
        try:
            cfg = AugmentConfig(fakes_per_real=0.0, reconstruct=ReconstructConfig(per_real=1.0), workers=0,
                                contact_sheet_per_method=0)
            t = time.perf_counter()
            summary = run_augment(cfg, layout)
            total = time.perf_counter() - t
        finally:
            stage.load_models = plain
            logging.disable(logging.NOTSET)
    per_real = (total - timed["train_s"]) / len(raws)
    return {"reals": len(raws), "total_s": round(total, 1), "random_ae_training_s": round(timed["train_s"], 1),
            "s_per_real_without_training": round(per_real, 3), "by_method": summary["by_method"],
            "workers": "0 (one single-threaded process per core)"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=32, help="images timed per method")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the per-method timings")
    p.add_argument("--stage-reals", type=int, default=64, help="reals of the stage run (0 = skip it)")
    p.add_argument("--ae-steps", type=int, default=30, help="random_ae training steps timed per model")
    p.add_argument("--reals", type=int, default=2000, help="extrapolate to this many reals")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    r = ReconstructConfig(per_real=1.0)
    raws, source = load_images(args.n, args.size)
    load = os.getloadavg()[0]
    taef2_model = METHODS["taef2"](r, Context())[0]
    taef2 = time_pairs(taef2_model, raws, r)
    taef2_fp32 = time_pairs(taef2_model, raws, r, "float32")  # the cost where the CPU has no native bf16
    rae = bench_random_ae(raws, r, args.ae_steps)
    mix = 0.5 / taef2["images_per_s"] + 0.5 / rae["images_per_s"]  # seconds per pair, default 1 : 1 mix
    staged = bench_stage(load_images(args.stage_reals, args.size)[0]) if args.stage_reals else None
    extrap = {"taef2_only_min": round(args.reals / taef2["images_per_s"] / 60, 1),
              "random_ae_only_min": round((args.reals / rae["images_per_s"] + rae["train_s_total_extrapolated"]) / 60, 1),
              "default_mix_min_one_process": round((args.reals * mix + rae["train_s_total_extrapolated"]) / 60, 1)}
    if staged:
        extrap["stage_min"] = round((args.reals * staged["s_per_real_without_training"]
                                     + staged["random_ae_training_s"]) / 60, 1)
    result = {
        "images": source, "n": args.n, "size": args.size, "torch_threads": args.threads,
        "cpus": os.cpu_count(), "load_avg_1min_at_start": round(load, 2), "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "note": "2 CPU cores shared with other workers' jobs while timing: numbers are upper bounds on the cost",
        "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
        "dtype": resolve_dtype(r.dtype, "cpu"),
        "config": {"batch_size": r.batch_size, "ae_models": r.ae_models, "ae_steps": r.ae_steps, "ae_crop": r.ae_crop,
                   "ae_batch": r.ae_batch, "clean_share": r.clean_share},
        "taef2": taef2, "taef2_float32": taef2_fp32, "random_ae": rae, "stage": staged, f"extrapolated_{args.reals}_reals": extrap,
        "target_min": 20,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=1))  # noqa: T201 - the script's result on stdout, as the other bench scripts
