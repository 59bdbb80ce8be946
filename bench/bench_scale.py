"""Benchmark stages 1-3 at scale (issue 14 item 4): wall time, peak memory of the process tree and disk per stage.

    python bench/bench_scale.py --out reports/bench/bench_scale.json                      # cheap: 2,000 + 4,000 images
    python bench/bench_scale.py --out reports/bench/bench_scale.json --sizes 50000 100000 200000 500000

Generates ``max(--sizes)`` synthetic JPEGs once (``--min-px``..``--max-px`` a side: one of ``--bases``
noisy gradient backgrounds, then random filled circles and rectangles drawn per file, each file its own
seeded draw, so no two files are near duplicates; JPEG quality 80-95; in ``--gen-workers`` processes).
Generation is not timed in the runs. Each size ``n`` then gets the competition layout (``trainset/`` +
``trainset_label.txt``, ``valset/`` + ``valset_label.txt``, ``testset/``: 80/10/10 % of the first ``n``
files, hard links to the generated ones; label 1 = fake for half of each split) and runs, each stage in its
own child process (a fresh interpreter, as ``dvc repro`` runs it):

1. stage 1 (:func:`dfpipe.prepare_data.run`, defaults: native-resolution store, dedup on, ``--workers``);
2. stage 2 (:func:`dfpipe.augment_sd.run`) with ``--fakes-per-real`` (0.05 by default: it scales with ``n`` and
   stays cheap; no diffusion);
3. stage 3 (:func:`dfpipe.cluster_split.run`) embedding with ``--backbone`` (timm's tiny ``test_efficientnet``, random
   weights) at ``--embed-size`` px, sklearn k-means (MiniBatch above ``--minibatch-above`` originals);

then, timed apart (``train_sample``, not in the run's totals), one epoch of stage 4
(:func:`dfpipe.train_experts.loop.run`) of a tiny expert (the same backbone at ``--train-size`` px) on a
seeded sample of ``--train-sample`` training images of stage 3's split (and a quarter as many val images).

Per stage: wall seconds of the child (interpreter start and imports included), the seconds ``run`` took
inside it, the peak over time of the summed RSS of the child and all its descendants (decode and DataLoader
workers), sampled every ``--every`` s from this process with psutil (``peak_rss_mb``; shared pages count
once per process, so this over-counts forked workers; ``peak_pss_mb`` is the proportional-share sum, what
the tree really holds), the most processes seen at once, and the bytes of the stage's outputs. Per run:
``n_images`` (JPEG files), ``seconds`` (stages 1-3), ``peak_rss_mb`` (max over them), ``disk_bytes`` (all
their outputs: stage 1's store and tables, stage 2's generated store, stage 3's features and tables),
``input_bytes`` (the JPEG files). ``checks`` holds the issue's targets: time per image of the largest run <= 1.3x
that of the smallest, peak RSS of every run <= 2 GiB, disk of the largest run <= 1.3x its input bytes; a missed
target is reported, and fails the process only with ``--strict``.

Files are read from the page cache (just written): the times are for a warm cache. Each run's outputs are
deleted after it (``--keep`` keeps them, under ``--work``). Use a process-pool-safe invocation: this file
runs as a script (``__main__`` guard).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dfpipe  # noqa: E402,F401  (its import sets the offline env vars: dfpipe.OFFLINE_ENV)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402

from dfpipe.io import write_json  # noqa: E402  (atomic)
from dfpipe.layout import Layout  # noqa: E402

log = logging.getLogger("bench_scale")

MB = 2**20
TARGETS = {"time_per_image_ratio_max": 1.3, "peak_rss_mb_max": 2048.0, "disk_ratio_max": 1.3}
SPLIT_OF = ("train",) * 8 + ("val", "test")  # file i -> SPLIT_OF[i % 10]: 80 / 10 / 10 %
DIRS = {"train": "trainset", "val": "valset", "test": "testset"}
LABELS = {"train": "trainset_label.txt", "val": "valset_label.txt"}
TRAIN_EXPERT = "tiny"
STAGE_NAMES = {"prepare": "prepare_data", "augment": "augment_sd", "split": "cluster_split", "train": "train_experts"}

# One stage in a fresh interpreter: ``python -c CHILD <stage> <config json> <layout json>``; prints one JSON line last.
CHILD = r"""
import json, sys, time
from dfpipe.config import AugmentConfig, PrepareConfig, SplitConfig, TrainConfig, from_dict
from dfpipe.io import setup_logging
from dfpipe.layout import Layout
setup_logging()  # the stage's log lines (to stderr: the stage's log file), as its script would
stage, cfg, layout = sys.argv[1], json.loads(sys.argv[2]), Layout(**json.loads(sys.argv[3]))
t0 = time.perf_counter()
if stage == "prepare":
    from dfpipe.prepare_data import run
    rep = run(from_dict(PrepareConfig, cfg, "bench"), layout)
    out = {"n_prepared": rep["n_images"], "n_skipped": rep["n_skipped"], "store": rep["store"],
           "duplicates": {k: rep["duplicates"][k] for k in ("n_pairs", "n_groups_with_duplicates", "largest_group")}}
elif stage == "augment":
    from dfpipe.augment_sd import run
    rep = run(from_dict(AugmentConfig, cfg, "bench"), layout)
    out = {"n_generated": rep["n_images"], "by_method": rep["by_method"]}
elif stage == "split":
    from dfpipe.cluster_split import run
    from dfpipe.cluster_split.kmeans import make_engine
    df = run(from_dict(SplitConfig, cfg, "bench"), layout)
    out = {"n_split": len(df), "n_val": int((df.subset == "val").sum()), "n_clusters": int(df.cluster.nunique()),
           "kmeans": make_engine(cfg["kmeans_backend"], cfg["minibatch_above"]).describe(
               int((df.origin != "aug").sum()))}
elif stage == "train":
    import pandas as pd
    from dfpipe.train_experts.loop import run
    best = run(from_dict(TrainConfig, cfg["train"], "bench"), layout, cfg["name"], cfg["history"])[cfg["name"]]
    hist = pd.read_csv(cfg["history"])
    out = {"val_auc": best.get("auc"), "epochs": len(hist),
           "train_loop_images_per_s": float(hist.images_per_s.iloc[-1])}
else:
    raise SystemExit(f"unknown stage {stage!r}")
out["stage_seconds"] = time.perf_counter() - t0
print(json.dumps(out))
"""


# ----------------------------------------------------------------------------- process-tree memory
def tree_memory(root: psutil.Process, pss: bool = True) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, number of processes) of ``root`` and all its descendants, now.

    A process that exits between the listing and the read is skipped; PSS is 0 where it cannot be read.
    """
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:  # root itself has gone
        return 0, 0, 0
    rss = pss_sum = n = 0
    for p in procs:
        try:
            try:
                mi = p.memory_full_info() if pss else p.memory_info()  # full: smaps_rollup, rss and pss
            except psutil.AccessDenied:
                mi = p.memory_info()
        except psutil.Error:  # exited meanwhile
            continue
        rss, pss_sum, n = rss + mi.rss, pss_sum + getattr(mi, "pss", 0), n + 1
    return rss, pss_sum, n


def run_measured(cmd: list[str], cwd: str | Path | None = None, env: dict | None = None,
                 log_path: str | Path | None = None, every: float = 0.2) -> dict:
    """Run ``cmd`` to its end, sampling the memory of its whole process tree every ``every`` s.

    Returns ``returncode``, ``seconds`` (wall), ``peak_rss_bytes``, ``peak_pss_bytes``, ``max_processes`` and
    ``stdout``; the child's stderr goes to ``log_path`` (or is dropped).
    """
    err = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    t0 = time.perf_counter()
    try:
        child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        proc = psutil.Process(child.pid)
        peak = {"rss": 0, "pss": 0, "n": 0}
        stop = threading.Event()
        use_pss = [True]

        def sample() -> None:
            while not stop.is_set():
                try:
                    rss, pss, n = tree_memory(proc, use_pss[0])
                except (psutil.Error, OSError):
                    rss, pss, n = 0, 0, 0
                if use_pss[0] and n and not pss:  # PSS unreadable here: RSS alone from now on
                    use_pss[0] = False
                peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
                peak["n"] = max(peak["n"], n)
                stop.wait(every)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        out, _ = child.communicate()
        seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
    finally:
        if err is not subprocess.DEVNULL:
            err.close()
    return {"returncode": child.returncode, "seconds": seconds, "peak_rss_bytes": peak["rss"],
            "peak_pss_bytes": peak["pss"], "max_processes": peak["n"], "stdout": out}


# ----------------------------------------------------------------------------- synthetic JPEGs
_BASES: list[np.ndarray] = []


def make_bases(seed: int, n: int, min_px: int, max_px: int) -> list[np.ndarray]:
    """``n`` noisy colour-gradient backgrounds (H, W, 3) uint8 BGR, sides in [min_px, max_px]."""
    rng = np.random.default_rng([seed, 2**31])
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(min_px, max_px + 1, 2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx / w + np.sin(a) * yy / h
        img = np.stack([t, xx / w * (1 - t), yy / h], axis=2) * rng.uniform(60, 220, 3) + rng.uniform(0, 30, 3)
        out.append(np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8))
    return out


def synth_jpeg(i: int, seed: int, bases: list[np.ndarray]) -> bytes:
    """JPEG bytes of file ``i``: its background plus four random filled shapes (its own seeded draw)."""
    rng = np.random.default_rng([seed, i])
    img = bases[int(rng.integers(len(bases)))].copy()
    h, w = img.shape[:2]
    lo, hi = max(3, min(h, w) // 8), max(4, min(h, w) // 3)
    for _ in range(4):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(lo, hi)), colour, -1)
        else:
            cv2.rectangle(img, (x, y), (int(rng.integers(0, w)), int(rng.integers(0, h))), colour, -1)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(80, 96))])
    if not ok:
        raise RuntimeError(f"cannot encode synthetic image {i}")
    return buf.tobytes()


def file_name(i: int) -> str:
    return f"{i:07d}.jpg"


def _init_gen(seed: int, n_bases: int, min_px: int, max_px: int) -> None:
    _BASES[:] = make_bases(seed, n_bases, min_px, max_px)


def _gen_range(args: tuple[Path, int, int, int]) -> tuple[int, list[int]]:
    folder, start, stop, seed = args
    sizes = []
    for i in range(start, stop):
        data = synth_jpeg(i, seed, _BASES)
        (folder / file_name(i)).write_bytes(data)
        sizes.append(len(data))
    return start, sizes


def generate(folder: Path, n: int, seed: int, n_bases: int, min_px: int, max_px: int, workers: int) -> np.ndarray:
    """Write files ``0..n-1`` into ``folder`` (in ``workers`` processes); their sizes in bytes, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    step = 2000
    tasks = [(folder, s, min(n, s + step), seed) for s in range(0, n, step)]
    sizes = np.zeros(n, dtype=np.int64)
    init = (seed, n_bases, min_px, max_px)
    if workers <= 1:
        _init_gen(*init)
        results = map(_gen_range, tasks)
    else:
        pool = multiprocessing.Pool(workers, initializer=_init_gen, initargs=init)
        results = pool.imap_unordered(_gen_range, tasks)
    try:
        for start, part in results:
            sizes[start:start + len(part)] = part
    finally:
        if workers > 1:
            pool.close()
            pool.join()
    return sizes


def label_of(i: int) -> int:
    """1 = fake for half of each split (files i and i + 10 share a split, not a label)."""
    return (i // 10) % 2


def make_layout(pool: Path, raw: Path, n: int) -> dict:
    """The competition layout of files ``0..n-1`` under ``raw`` (hard links into ``pool``)."""
    for d in DIRS.values():
        (raw / d).mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {"train": [], "val": []}
    link = os.link
    for i in range(n):
        split, name = SPLIT_OF[i % 10], file_name(i)
        try:
            link(pool / name, raw / DIRS[split] / name)
        except OSError:  # no hard links on this file system: copy
            link = shutil.copyfile
            link(pool / name, raw / DIRS[split] / name)
        if split in rows:
            rows[split].append(f"{name},{label_of(i)}")
    for split, lines in rows.items():
        (raw / LABELS[split]).write_text("img_name,target\n" + "\n".join(lines) + "\n")
    return {s: sum(1 for i in range(n) if SPLIT_OF[i % 10] == s) for s in DIRS}


# ----------------------------------------------------------------------------- stages
def du(paths: list[Path]) -> int:
    """Bytes of the files at or under ``paths`` (apparent sizes)."""
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            for root, _, files in os.walk(p):
                total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
    return total


def run_stage(stage: str, cfg: dict, layout: Layout, n_images: int, work: Path, every: float) -> dict:
    """Run one stage in a child process under the tree sampler; its record (disk: the stage's catalog outputs)."""
    outputs = [Path(getattr(layout, name)) for name in Layout.entries(STAGE_NAMES[stage])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log_path = work / f"{stage}.log"
    m = run_measured([sys.executable, "-c", CHILD, stage, json.dumps(cfg), json.dumps(dataclasses.asdict(layout))], cwd=work, env=env, log_path=log_path,
                     every=every)
    if m["returncode"] != 0:
        tail = log_path.read_text(errors="replace")[-4000:] if log_path.is_file() else ""
        raise RuntimeError(f"stage {stage} failed with exit code {m['returncode']}; its log ends:\n{tail}")
    res = json.loads(m["stdout"].strip().splitlines()[-1])
    rec = {"seconds": m["seconds"], "stage_seconds": res.pop("stage_seconds"),
           "images_per_s": n_images / m["seconds"], "peak_rss_mb": m["peak_rss_bytes"] / MB,
           "peak_pss_mb": m["peak_pss_bytes"] / MB, "max_processes": m["max_processes"],
           "disk_bytes": du(outputs), **res}
    log.info("%-8s %7d images: %7.1f s (%6.1f img/s), peak RSS %7.1f MB (PSS %7.1f MB, %d processes), %.1f MB out",
             stage, n_images, rec["seconds"], rec["images_per_s"], rec["peak_rss_mb"], rec["peak_pss_mb"],
             rec["max_processes"], rec["disk_bytes"] / 1e6)
    return rec


def sample_splits(splits_csv: Path, out: Path, n_train: int, seed: int) -> tuple[int, int]:
    """A seeded sample of stage 3's originals: ``n_train`` train-subset rows and a quarter as many val rows."""
    df = pd.read_csv(splits_csv, keep_default_na=False, dtype={"img_name": str})
    df = df[df.origin != "aug"]
    parts = []
    for subset, k in (("train", n_train), ("val", max(32, n_train // 4))):
        rows = df[df.subset == subset]
        parts.append(rows.sample(n=min(k, len(rows)), random_state=seed))
    sample = pd.concat(parts).sort_index()
    sample.to_csv(out, index=False)
    return int((sample.subset == "train").sum()), int((sample.subset == "val").sum())


def one_run(n: int, pool: Path, sizes: np.ndarray, work: Path, args: argparse.Namespace) -> dict:
    w = work / f"run_{n}"
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    counts = make_layout(pool, w / "raw", n)
    input_bytes = int(sizes[:n].sum())
    layout = Layout().under(w, data_root=str(w / "raw"))  # every stage's files under the run's folder
    prep = {"workers": args.workers}
    aug = {"seed": args.seed, "fakes_per_real": args.fakes_per_real, "workers": args.workers}
    split = {"backbone": args.backbone, "pretrained": "none", "img_size": args.embed_size,
             "kmeans_backend": "sklearn", "minibatch_above": args.minibatch_above, "n_clusters": args.clusters,
             "seed": args.seed}
    stages = {
        "prepare": run_stage("prepare", prep, layout, n, w, args.every),
        "augment": run_stage("augment", aug, layout, n, w, args.every),
        "split": run_stage("split", split, layout, n, w, args.every),
    }
    seconds = sum(s["seconds"] for s in stages.values())
    disk = sum(s["disk_bytes"] for s in stages.values())
    run = {"n_images": n, "seconds": seconds, "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
           "disk_bytes": disk, "input_bytes": input_bytes,
           "peak_pss_mb": max(s["peak_pss_mb"] for s in stages.values()),
           "seconds_per_image": seconds / n, "images_per_s": n / seconds, "disk_ratio": disk / input_bytes,
           "disk_ratio_by_stage": {k: s["disk_bytes"] / input_bytes for k, s in stages.items()},
           "store_ratio": stages["prepare"]["store"]["ratio"], "files": counts, "stages": stages}
    if args.train_sample > 0:
        n_tr, n_val = sample_splits(Path(layout.splits), w / "splits_sample.csv", args.train_sample, args.seed)
        expert = {"backbone": args.backbone, "pretrained": "none", "img_size": args.train_size, "epochs": 1,
                  "batch_size": 64, "lr_ref_batch": 64, "augment": "light", "seed": args.seed}
        train = {"workers": args.train_workers, "experts": {TRAIN_EXPERT: expert}}
        rec = run_stage("train", {"train": train, "name": TRAIN_EXPERT, "history": str(w / "train_history.csv")},
                        dataclasses.replace(layout, splits=str(w / "splits_sample.csv")), n_tr, w, args.every)
        run["train_sample"] = {"n_train": n_tr, "n_val": n_val, "expert": expert, **rec}
    if not args.keep:
        shutil.rmtree(w, ignore_errors=True)
    log.info("%d images: stages 1-3 %.1f s (%.2f ms/image), peak RSS %.1f MB, disk %.1f MB = %.2fx the input %.1f MB",
             n, seconds, 1000 * seconds / n, run["peak_rss_mb"], disk / 1e6, run["disk_ratio"], input_bytes / 1e6)
    return run


# ----------------------------------------------------------------------------- report
def checks(runs: list[dict]) -> dict:
    """The issue's targets: time per image of the largest run against the smallest (None with one size), the peak
    RSS of any run, the disk of the largest run."""
    lo, hi = min(runs, key=lambda r: r["n_images"]), max(runs, key=lambda r: r["n_images"])
    ratio = hi["seconds_per_image"] / lo["seconds_per_image"] if hi is not lo else None
    peak = max(r["peak_rss_mb"] for r in runs)
    disk = hi["disk_ratio"]  # at scale: fixed-size outputs (reports, contact sheets) weigh on small runs
    out = {"smallest_n": lo["n_images"], "largest_n": hi["n_images"],
           "time_per_image_ratio": ratio,
           "time_per_image_ok": None if ratio is None else ratio <= TARGETS["time_per_image_ratio_max"],
           "peak_rss_mb": peak, "peak_rss_ok": peak <= TARGETS["peak_rss_mb_max"],
           "peak_pss_mb": max(r["peak_pss_mb"] for r in runs),
           "disk_ratio": disk, "disk_ok": disk <= TARGETS["disk_ratio_max"],
           "store_ratio": max(r["store_ratio"] for r in runs)}
    out["all_ok"] = all(out[k] is not False for k in ("time_per_image_ok", "peak_rss_ok", "disk_ok"))
    return out


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30,
            "python": platform.python_version(), "torch": _version("torch"), "timm": _version("timm"),
            "opencv_threads": cv2.getNumThreads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "nice": os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None,
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def parse_sizes(values: list[str]) -> list[int]:
    sizes = sorted({int(v) for item in values for v in str(item).split(",") if v.strip()})
    if not sizes or min(sizes) < 20:
        raise ValueError(f"--sizes {values}: give image counts of at least 20")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON report to write (atomically)")
    p.add_argument("--sizes", nargs="+", default=["2000", "4000"],
                   help="image counts, one run each (space- or comma-separated); the issue's run: 50000 100000 "
                        "200000 500000")
    p.add_argument("--min-px", type=int, default=64)
    p.add_argument("--max-px", type=int, default=256)
    p.add_argument("--bases", type=int, default=256, help="distinct backgrounds the files are drawn on")
    p.add_argument("--gen-workers", type=int, default=0, help="processes generating the JPEGs (0 = all cores)")
    p.add_argument("--workers", type=int, default=0, help="prepare_data.workers and augment_sd.workers (0 = all cores)")
    p.add_argument("--fakes-per-real", type=float, default=0.05, help="stage 2's augment_sd.fakes_per_real")
    p.add_argument("--backbone", default="test_efficientnet", help="stage 3's embedder and the tiny expert (timm)")
    p.add_argument("--embed-size", type=int, default=32, help="cluster_split.img_size")
    p.add_argument("--minibatch-above", type=int, default=100_000, help="cluster_split.minibatch_above")
    p.add_argument("--clusters", type=int, default=12, help="cluster_split.n_clusters")
    p.add_argument("--train-sample", type=int, default=2000,
                   help="training images of the one-epoch stage-4 sample (0 = no training sample)")
    p.add_argument("--train-size", type=int, default=32, help="the tiny expert's img_size")
    p.add_argument("--train-workers", type=int, default=-1, help="train_experts.workers (-1 = auto)")
    p.add_argument("--every", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="", help="working folder (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep each run's inputs and outputs under --work")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed (the report is written)")
    args = p.parse_args(argv)
    try:
        args.sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        p.error(str(exc))
    return args


def check_disk(work: Path, sizes: list[int], bytes_per_image: float) -> None:
    """Refuse to start when the work folder's disk cannot hold the files and the largest run's outputs."""
    need = bytes_per_image * (max(sizes) * 3.5)  # the generated files + the largest run's store, fakes, tables
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, this benchmark needs about {need / 1e9:.1f} GB "
                         "(use --work on a larger disk, or smaller --sizes)")


def run(args: argparse.Namespace) -> dict:
    gen_workers = args.gen_workers or os.cpu_count() or 1
    own = not args.work
    work = Path(tempfile.mkdtemp(prefix="bench_scale_") if own else args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        est = np.mean([len(synth_jpeg(i, args.seed, make_bases(args.seed, 4, args.min_px, args.max_px)))
                       for i in range(16)])
        check_disk(work, args.sizes, est)
        t0 = time.perf_counter()
        pool = work / "pool"
        shutil.rmtree(pool, ignore_errors=True)
        sizes = generate(pool, max(args.sizes), args.seed, args.bases, args.min_px, args.max_px, gen_workers)
        gen = {"seconds": time.perf_counter() - t0, "n_files": len(sizes), "bytes": int(sizes.sum()),
               "mean_bytes": float(sizes.mean()), "workers": gen_workers, "bases": args.bases,
               "px_range": [args.min_px, args.max_px]}
        log.info("generated %d JPEGs (%.1f MB) in %.1f s", len(sizes), sizes.sum() / 1e6, gen["seconds"])
        runs = [one_run(n, pool, sizes, work, args) for n in args.sizes]
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "bench": "bench_scale", "runs": runs, "targets": TARGETS, "checks": checks(runs),
        "settings": {"sizes": args.sizes, "split_fractions": {"train": 0.8, "val": 0.1, "test": 0.1},
                     "workers": args.workers, "fakes_per_real": args.fakes_per_real,
                     "split": {"backbone": args.backbone, "pretrained": "none", "img_size": args.embed_size,
                               "kmeans_backend": "sklearn", "minibatch_above": args.minibatch_above,
                               "n_clusters": args.clusters},
                     "train_sample": args.train_sample, "train_size": args.train_size,
                     "sample_every_s": args.every},
        "generate": gen,
        "notes": [
            ("seconds: wall time of each stage's child process (interpreter start and imports included), stages 1-3 "
             "summed; stage 4's one-epoch sample is apart (train_sample)"),
            ("peak_rss_mb: peak over time of the summed RSS of the stage process and all its descendants, MiB "
             "(shared pages counted in every process); peak_pss_mb: the same with proportional shares"),
            f"stage 2 runs with fakes_per_real {args.fakes_per_real} (editing fakes only, no diffusion)",
            ("disk_bytes: every output of stages 1-3 (stage 1's store and tables, stage 2's generated store, stage 3's "
             "features and tables); input_bytes: the JPEG files"),
            "inputs read from a warm page cache (just generated)",
        ],
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = parse_args(argv)
    report = run(args)
    write_json(args.out, report)
    c = report["checks"]
    log.info("wrote %s: time/image ratio %s (<= %.1f), peak RSS %.0f MB (<= %.0f), disk %.2fx input (<= %.1f): %s",
             args.out, "n/a" if c["time_per_image_ratio"] is None else f"{c['time_per_image_ratio']:.2f}",
             TARGETS["time_per_image_ratio_max"], c["peak_rss_mb"], TARGETS["peak_rss_mb_max"], c["disk_ratio"],
             TARGETS["disk_ratio_max"], "all targets met" if c["all_ok"] else "TARGET MISSED")
    return 1 if args.strict and not c["all_ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
