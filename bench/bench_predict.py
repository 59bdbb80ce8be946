"""Benchmark: ensemble scoring of JPEG files, ``Ensemble.score_files`` vs a seed-baseline-style loop and
vs the experts' forward passes alone.

All paths score the same random-weight experts (``pretrained="none"``, fixed seed, saved as
self-describing checkpoints with their preprocessing record, and loaded back) on the same generated
JPEGs with the same TTA.

* **ensemble**: ``Ensemble.score_files`` (decode in DataLoader workers, stage 1 and every expert's input
  policy once per file, normalisation on the device, channels-last, ``inference_mode``).
* **baseline**: must agree with the ensemble to 1e-5. It makes the contract's pixels one image at a time
  as the seed baseline did (PIL decode -> RGB, the stage-1 image, the expert's input policy: the library's
  own :func:`~dfpipe.data.preprocess.fit`, then per image "ToTensor + Normalize"); it scores one expert
  at a time (each expert decodes every file again), batches of 32, fp32, NCHW, ``torch.no_grad``, no
  DataLoader workers.
* **model only**: the ensemble's experts' forward passes (TTA views included, the ensemble's batches) on
  inputs decoded, cut and normalised beforehand: the throughput ceiling of file scoring. The issue's bar is
  file scoring at >= ``--min-ratio`` (0.8) of it; the report says whether it holds (``ratio_to_model_only``)
  and the run fails (after writing the report) when it does not.

Writes a JSON report; prints its path.

    python bench/bench_predict.py --out reports/bench/bench_predict.json [--n 256 --experts 2 --size 128]
"""

from __future__ import annotations

import argparse
import dataclasses
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

from dfpipe.config import ExpertConfig  # noqa: E402
from dfpipe.data.images import decode_image  # noqa: E402
from dfpipe.data.preprocess import (  # noqa: E402
    INPUT_MODES,
    Preprocess,
    Stage1,
    fit,
    scoring_image,
    stage1_from_dict,
)
from dfpipe.data.transforms import to_model_input  # noqa: E402
from dfpipe.models import build_expert, expert_from_description  # noqa: E402
from dfpipe.ensemble_predict import Ensemble, FileDataset  # noqa: E402
from dfpipe.ensemble_predict.experts import read_checkpoint  # noqa: E402
from dfpipe.train_experts.checkpoint import save_checkpoint  # noqa: E402

log = logging.getLogger("bench_predict")
TOL = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON report to write")
    p.add_argument("--n", type=int, default=256, help="number of JPEG files")
    p.add_argument("--experts", type=int, default=2, help="experts; sizes size, size-16, size-32, ...")
    p.add_argument("--size", type=int, default=128, help="input size of the first expert")
    p.add_argument("--stage1-max-side", type=int, default=0,
                   help="stage 1's max_side in the experts' preprocessing record (0 = native resolution)")
    p.add_argument("--input-mode", default="resize", choices=INPUT_MODES, help="the experts' input policy mode")
    p.add_argument("--tta", default="identity", help="comma-separated TTA views, used by BOTH paths")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the ensemble path")
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers of the ensemble path (-1 = auto)")
    p.add_argument("--min-side", type=int, default=150)
    p.add_argument("--max-side", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="time each path this many times (alternating); keep the best")
    p.add_argument("--min-ratio", type=float, default=0.8,
                   help="fail when file scoring is below this share of the model-only throughput (0 = never)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs
def make_experts(root: Path, n: int, size: int, stage1: Stage1, mode: str, backbone: str, seed: int) -> list[str]:
    """Random-weight experts (fixed seeds) saved as stage-4 checkpoints under ``root``, each with the
    preprocessing record training writes (``stage1`` + its input policy + its normalisation)."""
    names = []
    for i in range(n):
        torch.manual_seed(seed + i)
        cfg = ExpertConfig(backbone=backbone, pretrained="none", img_size=max(32, size - 16 * i), input_mode=mode)
        model = build_expert(cfg).eval()
        name = f"e{i}_{cfg.img_size}"
        save_checkpoint(root / name / "best.pt", model, stage1, cfg, name, {})
        names.append(name)
    return names


def synth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like RGB uint8 image: colour gradients, a few filled shapes, sensor-like noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = (np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=2) * rng.uniform(80, 220, 3)).astype(np.uint8)
    for _ in range(4):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(5, min(h, w) // 3)), c, -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def make_jpegs(root: Path, n: int, min_side: int, max_side: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(synth_image(rng, h, w), cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(75, 96))])
        assert ok
        paths.append(root / f"{i:05d}.jpg")
        paths[-1].write_bytes(buf.tobytes())
    return paths


# ----------------------------------------------------------------------------- the seed-style baseline
def load_plain(path: Path) -> tuple[torch.nn.Module, Preprocess]:
    ckpt = read_checkpoint(path)
    model = expert_from_description(ckpt["description"], str(path))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), Preprocess(stage1_from_dict(ckpt["stage1"]), model.input)


def preprocess_one(path: Path, prep: Preprocess, model: torch.nn.Module) -> torch.Tensor:
    """One file -> (3, S, S) normalised float, per image (the contract's pixels, then ToTensor/Normalize)."""
    img = fit(scoring_image(decode_image(path), prep.stage1), prep.input.policy)  # PIL open + RGB, stage 1, policy
    t = torch.from_numpy(img).permute(2, 0, 1).float().div(255.0)  # ToTensor (already model.img_size square)
    mean = torch.tensor(model.mean).view(3, 1, 1)
    std = torch.tensor(model.std).view(3, 1, 1)
    return (t - mean) / std  # Normalize


def view(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "identity":
        return x
    if name == "hflip":
        return torch.flip(x, dims=[3])
    if name.startswith("rot"):
        return torch.rot90(x, int(name[3:]) // 90, dims=(2, 3))
    raise ValueError(f"the baseline knows identity, hflip and rot*; got {name!r}")


def baseline_scores(ckpts: list[Path], paths: list[Path], tta: list[str], batch: int = 32) -> np.ndarray:
    """(E, N) probabilities: one expert at a time, a plain loop over files, batch 32, fp32."""
    out = []
    for ckpt in ckpts:
        model, prep = load_plain(ckpt)
        scores = []
        with torch.no_grad():
            for i in range(0, len(paths), batch):
                x = torch.stack([preprocess_one(p, prep, model) for p in paths[i:i + batch]])
                scores.append(torch.stack([model(view(x, v))["prob"] for v in tta]).mean(0).numpy())
        out.append(np.concatenate(scores))
    return np.stack(out)


# ----------------------------------------------------------------------------- run
def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "opencv_threads": cv2.getNumThreads(), "python": platform.python_version(),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def decode_ms(ds: FileDataset) -> float:
    """Mean time to decode one file and cut it to every input policy (single process), in ms."""
    _, dt = timed(lambda: [ds[i] for i in range(len(ds))])
    return 1000 * dt / max(1, len(ds))


# ----------------------------------------------------------------------------- model only
def model_inputs(ens: Ensemble, ds: FileDataset, batch_size: int) -> list[list[tuple[torch.nn.Module, torch.Tensor]]]:
    """Per batch of the ensemble path: (model, input) of every forward pass the ensemble makes on it, the
    inputs already decoded, cut, normalised and TTA-viewed (the views of one size in one batch, as
    ``Ensemble`` groups them)."""
    out = []
    for start in range(0, len(ds), batch_size):
        items = [ds[i][0] for i in range(start, min(len(ds), start + batch_size))]
        xs = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        calls = []
        for e, prep in zip(ens.experts, ens.preps):
            m = e.model
            by_size: dict[int, list] = {}
            for v in ens.views:
                by_size.setdefault(v.size(m.img_size), []).append(v)
            for size, views in by_size.items():
                x = to_model_input(xs[prep.input.key], size, m.mean, m.std, channels_last=True)
                calls.append((m, torch.cat([v.apply(x) for v in views]).contiguous(memory_format=torch.channels_last)))
        out.append(calls)
    return out


@torch.inference_mode()
def model_only(batches: list[list[tuple[torch.nn.Module, torch.Tensor]]]) -> None:
    for calls in batches:
        for m, x in calls:
            m(x)


def run(args: argparse.Namespace) -> dict:
    tta = [v.strip() for v in args.tta.split(",") if v.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        tmp = Path(tmp)
        stage1 = Stage1(max_side=args.stage1_max_side)
        names = make_experts(tmp / "models", args.experts, args.size, stage1, args.input_mode, args.backbone, args.seed)
        paths = make_jpegs(tmp / "images", args.n, args.min_side, args.max_side, args.seed)
        ckpts = [tmp / "models" / n / "best.pt" for n in names]
        ens = Ensemble.load(tmp / "models", names, tta, "mean_prob", torch.device("cpu"))
        ds = FileDataset(paths, ens.stage1, ens.policies)
        baseline_scores(ckpts, paths[:4], tta)  # warm-up (allocator, oneDNN kernels)
        ens.score_files(paths[:4], batch_size=args.batch_size, workers=0)
        per_ms = decode_ms(ds)
        forward = model_inputs(ens, ds, args.batch_size)
        model_only(forward[:1])
        t_base, t_ours, t_model = [], [], []  # alternate them, keep each one's best: the CPU is shared and noisy
        for _ in range(args.repeats):
            base_pe, t = timed(baseline_scores, ckpts, paths, tta)
            t_base.append(t)
            (ours, errors), t = timed(ens.score_files, paths, batch_size=args.batch_size, workers=args.workers)
            t_ours.append(t)
            _, t = timed(model_only, forward)
            t_model.append(t)
    runs = {"baseline_seconds": t_base, "ensemble_seconds": t_ours, "model_only_seconds": t_model}
    t_base, t_ours, t_model = min(t_base), min(t_ours), min(t_model)
    base = base_pe.mean(axis=0)
    diff = float(np.abs(base - ours).max())
    if errors or diff > TOL:
        raise AssertionError(f"scores differ: max |diff| {diff:.2e} (tolerance {TOL}), {len(errors)} decode errors")
    return {
        "n_images": args.n, "image_sides": [args.min_side, args.max_side],
        "stage1": dataclasses.asdict(ens.stage1), "input_policies": [p.key for p in ens.policies],
        "experts": {n: int(n.rsplit("_", 1)[1]) for n in names}, "backbone": args.backbone, "tta": tta,
        "baseline": {"seconds": t_base, "images_per_s": args.n / t_base, "batch_size": 32, "workers": 0,
                     "dtype": "float32", "memory_format": "NCHW", "grad_mode": "no_grad",
                     "decodes_per_image": args.experts},
        "ensemble": {"seconds": t_ours, "images_per_s": args.n / t_ours, "batch_size": args.batch_size,
                     "workers": args.workers, "dtype": "float32", "memory_format": "channels_last",
                     "grad_mode": "inference_mode", "decodes_per_image": 1},
        "model_only": {"seconds": t_model, "images_per_s": args.n / t_model, "batch_size": args.batch_size,
                       "what": "the experts' forward passes (TTA views included) on inputs decoded, cut and "
                               "normalised beforehand"},
        "speedup": t_base / t_ours, "ratio_to_model_only": t_model / t_ours, "min_ratio": args.min_ratio,
        "meets_min_ratio": t_model / t_ours >= args.min_ratio,
        "runs": runs, "max_abs_diff": diff, "tolerance": TOL,
        "decode_preprocess_ms_per_image": per_ms, "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("baseline %.1f img/s, ensemble %.1f img/s: %.2fx (max |diff| %.1e); model only %.1f img/s: files at "
             "%.0f%% of it", report["baseline"]["images_per_s"], report["ensemble"]["images_per_s"], report["speedup"],
             report["max_abs_diff"], report["model_only"]["images_per_s"], 100 * report["ratio_to_model_only"])
    if not report["meets_min_ratio"]:
        raise AssertionError(f"scoring files runs at {report['ratio_to_model_only']:.0%} of the model-only "
                             f"throughput, below --min-ratio {args.min_ratio:.0%} (report: {out})")
    return out


if __name__ == "__main__":
    print(main())
