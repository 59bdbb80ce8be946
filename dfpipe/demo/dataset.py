"""The demo dataset on disk: images, label files, manifest; ``python -m dfpipe.demo``'s command line."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ..data.datacard import DATASET_CARD
from ..io import setup_logging, write_csv, write_json
from .fakes import MANIPULATIONS
from .sources import BaseImage, build_sources, sample_real

log = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "trainset", "val": "valset", "test": "testset"}
LABEL_FILES = {"train": "trainset_label.txt", "val": "valset_label.txt", "test": "testset_label_private.txt"}
MANIFEST = "demo_manifest.csv"
FAKE_KINDS = {
    "train": ("blend", "splice"),
    "val": ("blend", "splice", "warp"),
    "test": ("blend", "splice", "warp", "upsample"),
}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
JPEG_QUALITY = (85, 95)  # inclusive range, drawn per image independently of the label

DEMO_DESCRIPTION = ("synthetic plumbing data: small JPEGs cut from bundled sample photographs and rendered scenes, "
                    "fakes made by local edits; it exercises every stage in minutes, and a model trained on it says "
                    "nothing about real deepfakes")

# A fake's mean absolute change inside its region (0-255 scale) must reach MIN_EFFECT, else its
# parameters are re-drawn (at most MAX_REDRAWS draws; the strongest is kept): no invisible "fakes".
MIN_EFFECT = 5.0
MAX_REDRAWS = 6


# --------------------------------------------------------------------------------------------
# dataset


def _encode_jpeg(img_rgb: np.ndarray, quality: int) -> bytes:
    bgr = cv2.cvtColor(np.clip(np.rint(img_rgb), 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(
        ".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_OPTIMIZE, 0]
    )
    if not ok:  # pragma: no cover
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _plan_split(rng: np.random.Generator, split: str, n: int, fake_kinds: dict | None = None) -> list[str]:
    """Per-image kinds: half fake (rounded down), fakes spread evenly over the split's kinds."""
    n_fake = n // 2
    kinds = (fake_kinds or FAKE_KINDS)[split]
    fake = [kinds[i % len(kinds)] for i in range(n_fake)]
    plan = ["real"] * (n - n_fake) + fake
    return [plan[i] for i in rng.permutation(n)]


def make_image(
    seed: int,
    split: str,
    index: int,
    kind: str,
    photos: Sequence[BaseImage],
    scenes: Sequence[BaseImage],
    size_range: tuple[int, int],
    attempt: int = 0,
) -> tuple[bytes, dict]:
    """Render one image; the draws for size, quality, source, crop and noise do not depend on ``kind``."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, attempt])
    lo, hi = size_range
    w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    img, source = sample_real(rng, photos, scenes, w, h)
    region = 0.0
    if kind != "real":
        fake_rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, attempt, 1])
        ctx = {
            "source": source,
            "sample_real": lambda r, ww, hh, src=None: sample_real(r, photos, scenes, ww, hh, src),
        }
        best = None
        for _ in range(MAX_REDRAWS):  # re-draw the parameters of a manipulation too faint to see
            out, mask, extra = MANIPULATIONS[kind](fake_rng, img, ctx)
            inside = mask > 0.5
            effect = float(np.abs(out - img).mean(axis=2)[inside].mean()) if inside.any() else 0.0
            if best is None or effect > best[0]:
                best = (effect, out, mask, extra)
            if effect >= MIN_EFFECT:
                break
        _, img, mask, extra = best
        region = float((mask > 0.5).mean())
        if extra:
            source = f"{source}+{extra}"
    data = _encode_jpeg(img, quality)
    meta = {
        "split": split,
        "target": int(kind != "real"),
        "kind": kind,
        "source": source,
        "width": w,
        "height": h,
        "jpeg_quality": quality,
        "region_frac": round(region, 4),
    }
    return data, meta


def _check_overwritable(root: Path) -> None:
    """Refuse to replace split folders / label files that were not written by this module."""
    if (root / MANIFEST).is_file():
        return
    existing = [root / d for d in SPLIT_DIRS.values() if (root / d).exists() and any((root / d).iterdir())]
    existing += [root / f for f in [*LABEL_FILES.values(), "testset_label.txt"] if (root / f).exists()]
    if existing:
        raise FileExistsError(
            f"{root} already holds data not made by dfpipe.demo ({', '.join(p.name for p in existing)}; "
            f"no {MANIFEST}); refusing to overwrite it - pick an empty folder"
        )


def make_demo_dataset(
    root: str | Path,
    seed: int = 0,
    n_train: int = 240,
    n_val: int = 80,
    n_test: int = 80,
    size_range: tuple[int, int] = (128, 256),
    fake_kinds: dict[str, Sequence[str]] | None = None,
) -> dict:
    """Write the demo dataset under ``root`` (always regenerates) and return a summary dict.

    ``fake_kinds``: split -> manipulation kinds (of :data:`MANIPULATIONS`) instead of :data:`FAKE_KINDS`
    (tests use one easy kind everywhere to check that the pipeline learns end to end)."""
    unknown = {k for kinds in (fake_kinds or {}).values() for k in kinds} - set(MANIPULATIONS)
    if unknown or (fake_kinds is not None and set(fake_kinds) != set(SPLIT_DIRS)):
        raise ValueError(f"fake_kinds: one list of {sorted(MANIPULATIONS)} per split {sorted(SPLIT_DIRS)}, "
                         f"got {fake_kinds}")
    root = Path(root)
    lo, hi = (int(v) for v in size_range)
    if not 16 <= lo <= hi:
        raise ValueError(f"size_range must satisfy 16 <= min <= max, got {size_range}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    for split, n in counts.items():
        if n < 2:
            raise ValueError(f"n_{split} must be >= 2 (one real and one fake), got {n}")
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    _check_overwritable(root)
    photos, scenes = build_sources(seed)
    log.info(
        "sources: %d photos (%s) + %d procedural scenes",
        len(photos),
        ", ".join(s.name for s in photos),
        len(scenes),
    )

    plan_rng = np.random.default_rng([seed, 7])
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    try:
        with tqdm(total=sum(counts.values()), desc="demo images", unit="img", disable=None) as bar:
            for split, n in counts.items():
                out_dir = tmp / SPLIT_DIRS[split]
                out_dir.mkdir()
                names: set[str] = set()
                for index, kind in enumerate(_plan_split(plan_rng, split, n, fake_kinds)):
                    attempt = 0
                    while True:  # identical bytes are astronomically unlikely; re-draw if it happens
                        data, meta = make_image(seed, split, index, kind, photos, scenes, (lo, hi), attempt)
                        name = hashlib.md5(data).hexdigest() + ".jpg"
                        if name not in names:
                            break
                        attempt += 1
                    names.add(name)
                    (out_dir / name).write_bytes(data)
                    rows.append({"img_name": name, **meta})
                    bar.update()
        manifest = pd.DataFrame(rows)
        # swap the new split folders in (old demo output, if any, is replaced)
        for split, d in SPLIT_DIRS.items():
            dest = root / d
            if dest.exists():
                shutil.rmtree(dest)
            (tmp / d).rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for split, fname in LABEL_FILES.items():
        part = manifest[manifest["split"] == split].sort_values("img_name")
        write_csv(root / fname, part[["img_name", "target"]])
    (root / "testset_label.txt").unlink(missing_ok=True)  # the public layout has no test labels
    write_csv(
        root / MANIFEST,
        manifest.sort_values(["split", "img_name"], key=lambda s: s.map(_SPLIT_IDS) if s.name == "split" else s),
    )
    # the mark stage 1 carries to the ensemble card: a model trained on this is labelled a demo model everywhere
    write_json(root / DATASET_CARD, {"name": "dfpipe demo data", "demo": True, "generator": "python -m dfpipe.demo",
                                     "seed": int(seed), "description": DEMO_DESCRIPTION})

    summary = {
        "root": str(root),
        "seed": int(seed),
        "size_range": [lo, hi],
        "sources": [s.name for s in photos] + [f"procedural x{len(scenes)}"],
        "splits": {
            split: {
                "n": int((manifest["split"] == split).sum()),
                "n_fake": int(manifest.loc[manifest["split"] == split, "target"].sum()),
                "kinds": {
                    k: int(v)
                    for k, v in manifest.loc[manifest["split"] == split, "kind"].value_counts().sort_index().items()
                },
            }
            for split in SPLIT_DIRS
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info(
        "wrote %d images to %s in %.1fs (%s)",
        len(manifest),
        root,
        summary["seconds"],
        "; ".join(f"{s}: {v['n']} ({v['n_fake']} fake)" for s, v in summary["splits"].items()),
    )
    return summary


def auc_by_kind(root: str | Path, prediction_csv: str | Path, split: str = "test") -> dict[str, float]:
    """ROC AUC of a submission on the demo's ``split``: all fakes, then real vs each fake kind.

    Uses ``demo_manifest.csv`` (the kind of every image) so one can see how a model does on the kind
    it never trained on (``upsample`` in test). Names missing from the submission are an error.
    """
    from ..metrics import roc_auc

    man = pd.read_csv(Path(root) / "demo_manifest.csv", dtype={"img_name": str})
    man = man[man.split == split]
    sub = pd.read_csv(prediction_csv, dtype={"img_name": str}).set_index("img_name").y_pred
    missing = sorted(set(man.img_name) - set(sub.index))
    if missing:
        raise ValueError(f"{prediction_csv}: {len(missing)} {split} images have no score, e.g. {missing[:3]}")
    man = man.assign(score=sub.loc[man.img_name].to_numpy())
    real = man[man.target == 0]
    out = {"all": roc_auc(man.target, man.score)}
    for kind, fakes in man[man.target == 1].groupby("kind"):
        both = pd.concat([real, fakes])
        out[str(kind)] = roc_auc(both.target, both.score)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dfpipe.demo",
        description="Write a small deterministic deepfake-detection demo dataset in the competition layout.",
    )
    p.add_argument("root", type=Path, help="output folder, e.g. data/raw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=240)
    p.add_argument("--n-val", type=int, default=80)
    p.add_argument("--n-test", type=int, default=80)
    p.add_argument("--size-min", type=int, default=128)
    p.add_argument("--size-max", type=int, default=256)
    args = p.parse_args(argv)
    setup_logging()
    try:
        summary = make_demo_dataset(
            args.root,
            seed=args.seed,
            n_train=args.n_train,
            n_val=args.n_val,
            n_test=args.n_test,
            size_range=(args.size_min, args.size_max),
        )
    except (ValueError, FileExistsError) as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
