"""Shared fixtures. Nothing in the tests may wait on the network."""

import os

import dfpipe  # noqa: F401  (its import sets the offline env vars: dfpipe.OFFLINE_ENV)

os.environ.setdefault("OMP_NUM_THREADS", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def photo_like(rng: np.random.Generator, h: int = 96, w: int = 96) -> np.ndarray:
    """A smooth, textured RGB image (gradients + shapes + noise), uint8."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=2) * rng.uniform(80, 200, 3)
    img = base.astype(np.uint8).copy()
    for _ in range(3):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(5, h // 3)), c, -1)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def write_jpeg(path, img: np.ndarray, quality: int = 92) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def write_cache_pool(root, splits: dict, n_clusters: int) -> None:
    """What stage 4 reads, written directly: a prepared image store (one PNG shard per split, manifest,
    ``store.json``), an empty stage-2 manifest and ``splits.csv`` (val = fold 1). ``splits``: split ->
    (uint8 images (n, H, W, 3) or a list of (H, W, 3), labels written to the manifest)."""
    import pandas as pd

    from dfpipe.data.preprocess import Stage1
    from dfpipe.data.store import shard_name, write_png_shard, write_store_record

    prepared, aug = root / "prepared", root / "aug"
    prepared.mkdir(parents=True)
    aug.mkdir()
    rows = []
    for split, (imgs, labels) in splits.items():
        shard = shard_name(split, 0)
        index = write_png_shard(prepared / shard, imgs)
        rows += [dict(uid=f"{split}/{i}.jpg", img_name=f"{i}.jpg", split=split, label=int(y), path="",
                      cache_file=shard, cache_index=k, orig_w=im.shape[1], orig_h=im.shape[0], error="")
                 for i, (im, y, k) in enumerate(zip(imgs, labels, index))]
    write_store_record(prepared, Stage1())
    man = pd.DataFrame(rows)
    man.to_csv(prepared / "manifest.csv", index=False)
    pd.DataFrame(columns=["uid", "img_name", "label", "source_uid", "method", "cache_file", "cache_index"]
                 ).to_csv(aug / "manifest.csv", index=False)
    subset = np.where(man.split == "train", "train", "val")
    pd.DataFrame({"uid": man.uid, "origin": man.split, "cluster": np.arange(len(man)) % n_clusters,
                  "fold": (subset == "val").astype(int), "subset": subset}).to_csv(root / "splits.csv", index=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models: on 2 cores shared with other work, two contending
    threads make such steps 5-20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_expert_checkpoint(path, model, cfg=None, stage1=None, name: str = "m", metrics: dict | None = None) -> None:
    """``model`` saved as training saves ``best.pt``: its description (with its input contract), ``stage1``
    (default: stage 1's defaults), the training config ``cfg`` (default: ExpertConfig's defaults)."""
    from dfpipe.config import ExpertConfig
    from dfpipe.data.preprocess import Stage1
    from dfpipe.train_experts.checkpoint import save_checkpoint

    save_checkpoint(path, model, stage1 or Stage1(), cfg or ExpertConfig(), name, metrics or {})


def layout_in(root, **entries):
    """A :class:`~dfpipe.layout.Layout` with every stage's outputs under ``root`` and ``entries`` (inputs such as
    ``data_root``, or outputs) set as given: what a test runs a stage with."""
    import dataclasses

    from dfpipe.layout import Layout

    return dataclasses.replace(Layout().under(root), **{k: str(v) for k, v in entries.items()})
