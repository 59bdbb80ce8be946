"""Stage 4 loop: exact resume after a kill, early stopping, EMA weights in best.pt (tiny, CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dfpipe.config import ExpertConfig, LossWeights, TrainConfig
from dfpipe.train import loop
from dfpipe.train.loop import run_train

SIZE = 32


def _write_pool(root: Path, n_train: int = 24, n_val: int = 12) -> None:
    """A prepared cache (train/val .npy + manifest), an empty stage-2 manifest and a split table."""
    rng = np.random.default_rng(0)
    prepared, aug = root / "prepared", root / "aug"
    prepared.mkdir()
    aug.mkdir()
    rows = []
    for split, n in (("train", n_train), ("val", n_val)):
        labels = np.arange(n) % 2
        imgs = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        imgs[labels == 1, 8:24, 8:24] = (imgs[labels == 1, 8:24, 8:24] // 4) * 4  # a "manipulated" patch
        np.save(prepared / f"{split}.npy", imgs)
        rows += [dict(uid=f"{split}/{i}.jpg", img_name=f"{i}.jpg", split=split, label=int(y), path="",
                      cache_file=f"{split}.npy", cache_index=i, orig_w=SIZE, orig_h=SIZE, error="")
                 for i, y in enumerate(labels)]
    man = pd.DataFrame(rows)
    man.to_csv(prepared / "manifest.csv", index=False)
    pd.DataFrame(columns=["uid", "img_name", "label", "source_uid", "method", "cache_file", "cache_index"]
                 ).to_csv(aug / "manifest.csv", index=False)
    subset = np.where(man.split == "train", "train", "val")
    pd.DataFrame({"uid": man.uid, "origin": man.split, "cluster": np.arange(len(man)) % 3,
                  "fold": (subset == "val").astype(int), "subset": subset}).to_csv(root / "splits.csv", index=False)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trainpool")
    _write_pool(root)
    return root


def _cfg(root: Path, models: str, **kw) -> TrainConfig:
    base = dict(pretrained="none", img_size=SIZE, epochs=3, batch_size=8, lr=2e-3, ema_decay=0.8,
                warmup_epochs=0.5, augment="strong", loss=LossWeights(ce=1.0, kl=0.5, nce=0.1))
    base.update(kw)
    return TrainConfig(splits_csv=str(root / "splits.csv"), prepared_dir=str(root / "prepared"),
                       augmented_dir=str(root / "aug"), models_dir=str(root / models), workers=0,
                       experts={"e": ExpertConfig(**base)})


def _run(cfg: TrainConfig, root: Path, tag: str) -> tuple[dict, pd.DataFrame]:
    best = run_train(cfg, "e", root / f"{tag}.csv", root / f"{tag}.json")
    return best, pd.read_csv(root / f"{tag}.csv")


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_tensors(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_tensors(x, y)


def test_resume_after_a_kill_gives_the_uninterrupted_result(pool, monkeypatch, caplog):
    best_a, hist_a = _run(_cfg(pool, "models_a"), pool, "a")

    cfg_b = _cfg(pool, "models_b")
    real_epoch = loop._train_epoch

    def killed_at_epoch_2(*args, **kwargs):
        if args[-1] == 2:
            raise KeyboardInterrupt("killed")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_epoch", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg_b, pool, "b")
    last = _load(pool / "models_b" / "e" / "last.pt")
    assert last["epoch"] == 1 and not last["finished"] and len(last["history"]) == 1
    monkeypatch.setattr(loop, "_train_epoch", real_epoch)
    with caplog.at_level("INFO", logger="dfpipe.train.checkpoint"):
        best_b, hist_b = _run(cfg_b, pool, "b")
    assert "resuming from" in caplog.text

    assert list(hist_b.epoch) == [1, 2, 3]
    pd.testing.assert_frame_equal(hist_a.drop(columns="images_per_s"), hist_b.drop(columns="images_per_s"))
    assert best_a == best_b
    for f in ("best.pt", "last.pt"):
        a, b = _load(pool / "models_a" / "e" / f), _load(pool / "models_b" / "e" / f)
        for part in ("state_dict", "model", "ema", "optimizer"):
            if part in a:
                _assert_same_tensors(a[part], b[part])
    assert _load(pool / "models_a" / "e" / "last.pt")["finished"]


def test_changed_config_or_finished_run_starts_fresh(pool, caplog):
    cfg = _cfg(pool, "models_c", epochs=1)
    _run(cfg, pool, "c")
    with caplog.at_level("INFO", logger="dfpipe.train.checkpoint"):
        _run(cfg, pool, "c")  # finished: trains again from scratch
        assert "finished run: starting fresh" in caplog.text
        caplog.clear()
        _run(_cfg(pool, "models_c", epochs=1, lr=1e-3), pool, "c")
        assert "another config or data: starting fresh" in caplog.text


def test_early_stopping_on_val_auc(pool, monkeypatch, caplog):
    aucs = iter([0.6, 0.7, 0.65, 0.7, 0.9, 0.95])  # best at epoch 2, then 2 epochs without improvement
    real_summary = loop.summary

    def fake_summary(y, p):
        return {**real_summary(y, p), "auc": next(aucs)}

    monkeypatch.setattr(loop, "summary", fake_summary)
    with caplog.at_level("INFO", logger="dfpipe.train.loop"):
        best, hist = _run(_cfg(pool, "models_p", epochs=6, patience=2, loss=LossWeights(kl=0.0)), pool, "p")
    assert list(hist.epoch) == [1, 2, 3, 4] and best["epoch"] == 2 and best["auc"] == 0.7
    assert "early stop after epoch 4" in caplog.text
    assert _load(pool / "models_p" / "e" / "last.pt")["finished"]


def test_best_checkpoint_holds_the_ema_weights_not_the_raw_ones(pool, monkeypatch):
    models = {}
    real_build = loop.build_expert

    def keep(ecfg):
        models["m"] = real_build(ecfg)
        return models["m"]

    monkeypatch.setattr(loop, "build_expert", keep)
    aucs = iter([0.5, 0.9])  # the best epoch is the last one: best.pt = EMA shadow at the end
    real_summary = loop.summary
    monkeypatch.setattr(loop, "summary", lambda y, p: {**real_summary(y, p), "auc": next(aucs)})
    _run(_cfg(pool, "models_e", epochs=2), pool, "e")
    best = _load(pool / "models_e" / "e" / "best.pt")["state_dict"]
    last = _load(pool / "models_e" / "e" / "last.pt")
    raw = dict(models["m"].named_parameters())
    shadow = last["ema"]["shadow_params"]
    assert len(shadow) == len(raw)
    differs = 0
    for (k, p), s in zip(raw.items(), shadow):
        assert torch.equal(best[k], s), k  # saved = EMA shadow
        differs += not torch.equal(best[k], p.detach())
    assert differs > len(raw) // 2  # and not the raw weights
    for k, v in models["m"].state_dict().items():  # buffers (BN statistics) are the student's
        if k not in raw:
            assert torch.equal(best[k], v), k


def test_batches_do_not_depend_on_the_number_of_workers(pool):
    """Order and augmentation seeds come from the main process's generator, not the workers' RNGs."""
    _, h0 = _run(_cfg(pool, "models_w0", epochs=1), pool, "w0")
    _, h2 = _run(dataclasses.replace(_cfg(pool, "models_w2", epochs=1), workers=2), pool, "w2")
    pd.testing.assert_frame_equal(h0.drop(columns="images_per_s"), h2.drop(columns="images_per_s"))
    a = _load(pool / "models_w0" / "e" / "best.pt")["state_dict"]
    b = _load(pool / "models_w2" / "e" / "best.pt")["state_dict"]
    _assert_same_tensors(a, b)


def test_checkpoints_are_byte_reproducible(tmp_path):
    """The same checkpoint saved twice gives the same bytes (stable DVC hashes across runs)."""
    from dfpipe.models import build_expert
    from dfpipe.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_expert(ExpertConfig(pretrained="none", img_size=32))
    for name in ("a", "b"):
        save_checkpoint(tmp_path / name / "best.pt", model, model.describe(), ExpertConfig(), "x", {"auc": 0.5})
    assert (tmp_path / "a" / "best.pt").read_bytes() == (tmp_path / "b" / "best.pt").read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))
