"""Stage 4 loop: exact resume after a kill, early stopping, the EMA (weights and BN buffers) in best.pt,
deterministic checkpoints, rank sharding of the seeded sampler, the DVCLive logs (tiny, CPU), and the
DDP recipe's pieces (lr rule, SyncBatchNorm, rank seeds, GPU determinism). The 2-process DDP run:
test_train_ddp.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch

from dfpipe.config import ExpertConfig, LossWeights, TrainConfig
from dfpipe.train_experts import loop
from dfpipe.train_experts.distributed import global_batch, maybe_sync_bn, rank_seed, scaled_lr, set_determinism
from dfpipe.train_experts.ema import ema_decay, make_ema
from dfpipe.layout import Layout
from dfpipe.train_experts.sampling import SeededSampler, epoch_length
from conftest import layout_in, write_cache_pool

SIZE = 32


def _write_pool(root: Path, n_train: int = 24, n_val: int = 12) -> None:
    """A prepared cache (train/val .npy + manifest), an empty stage-2 manifest and a split table."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        labels = np.arange(n) % 2
        imgs = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        imgs[labels == 1, 8:24, 8:24] = (imgs[labels == 1, 8:24, 8:24] // 4) * 4  # a "manipulated" patch
        splits[split] = (imgs, labels)
    write_cache_pool(root, splits, n_clusters=3)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trainpool")
    _write_pool(root)
    return root


class Setup(NamedTuple):
    """A stage-4 config (one expert, "e") and the layout it reads the pool of ``root`` through."""

    cfg: TrainConfig
    layout: Layout


def pool_layout(root: Path, **entries) -> Layout:
    """The layout of a pool written by :func:`conftest.write_cache_pool` under ``root``."""
    return layout_in(root, splits=root / "splits.csv", prepared=root / "prepared", augmented=root / "aug",
                     **entries)


def _cfg(root: Path, models: str, workers: int = 0, **kw) -> Setup:
    """Expert "e" (``kw`` over a tiny recipe) trained on the pool of ``root`` into ``root / models``."""
    base = dict(pretrained="none", img_size=SIZE, epochs=3, batch_size=8, lr=2e-3, ema_epochs=0.5,
                warmup_epochs=0.5, augment="strong", loss=LossWeights(ce=1.0, kl=0.5, nce=0.1))
    base.update(kw)
    return Setup(TrainConfig(workers=workers, experts={"e": ExpertConfig(**base)}),
                 pool_layout(root, models=root / models))


# what dvc.yaml declares of reports/train/<name>, and the curves' PNG inside it (shows offline, unlike the .tsv plots)
LIVE_FILES = {"metrics.json", "plots/metrics", "plots/metrics/curves.png"}


def live_history(live_dir: Path) -> pd.DataFrame:
    """The per-epoch rows of a DVCLive directory, read independently of dfpipe: one .tsv per metric."""
    tsvs = sorted((live_dir / "plots" / "metrics").glob("*.tsv"))
    assert tsvs, f"no per-epoch logs in {live_dir}"
    cols = [pd.read_csv(f, sep="\t").set_index("step")[f.stem] for f in tsvs]
    return pd.concat(cols, axis=1).rename_axis("epoch").reset_index()


def live_files(live_dir: Path) -> set[str]:
    """Every file of ``live_dir``, relative, the .tsv files as their folder."""
    return {str(p.relative_to(live_dir).parent if p.suffix == ".tsv" else p.relative_to(live_dir))
            for p in live_dir.rglob("*") if p.is_file()}


def live_dir(root: Path, tag: str) -> Path:
    """Where :func:`_run` ``(..., root, tag)`` has expert "e" log: ``<train_logs>/e`` with train_logs = root/tag."""
    return root / tag / "e"


def _run(setup: Setup, root: Path, tag: str) -> tuple[dict, pd.DataFrame]:
    """Stage 4 (``loop.run``) on ``setup``, logging under ``root / tag``: (best of "e", its DVCLive history)."""
    best = loop.run(setup.cfg, dataclasses.replace(setup.layout, train_logs=str(root / tag)), "e")
    assert list(best) == ["e"]
    return best["e"], live_history(live_dir(root, tag))


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


def kill_at_epoch(monkeypatch, epoch: int):
    """Make training raise KeyboardInterrupt as epoch ``epoch`` starts (a killed run); returns the real epoch
    function, to put back with ``monkeypatch.setattr(loop, "_train_epoch", real)``."""
    real_epoch = loop._train_epoch

    def killed(*args, **kwargs):
        if args[9] == epoch:  # _train_epoch(model, teacher, ema, loader, loss_fn, opt, sched, acc, channels_last, epoch)
            raise KeyboardInterrupt("killed")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_epoch", killed)
    return real_epoch


def test_resume_after_a_kill_gives_the_uninterrupted_result(pool, monkeypatch, caplog):
    best_a, hist_a = _run(_cfg(pool, "models_a"), pool, "a")

    cfg_b = _cfg(pool, "models_b")
    real_epoch = kill_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg_b, pool, "b")
    last = _load(pool / "models_b" / "e" / "last.pt")
    assert last["epoch"] == 1 and not last["finished"] and len(last["history"]) == 1
    monkeypatch.setattr(loop, "_train_epoch", real_epoch)
    with caplog.at_level("INFO", logger="dfpipe.train_experts.checkpoint"):
        best_b, hist_b = _run(cfg_b, pool, "b")
    assert "resuming from" in caplog.text

    assert list(hist_b.epoch) == [1, 2, 3]
    pd.testing.assert_frame_equal(hist_a.drop(columns="images_per_s"), hist_b.drop(columns="images_per_s"))
    assert hist_b.images_per_s.notna().all()  # epoch 1's timing comes back from the killed run's logs
    assert "images_per_s" not in last["history"][0]  # timings never enter last.pt
    assert best_a == best_b
    # the logs of the resumed run are those of the uninterrupted one, to the byte (timings aside)
    assert live_files(live_dir(pool, "a")) == live_files(live_dir(pool, "b")) == LIVE_FILES
    for f in sorted((live_dir(pool, "a") / "plots" / "metrics").glob("*.tsv")):
        if f.name != "images_per_s.tsv":
            assert f.read_bytes() == (live_dir(pool, "b") / "plots" / "metrics" / f.name).read_bytes(), f.name
    assert (live_dir(pool, "a") / "metrics.json").read_bytes() == (live_dir(pool, "b") / "metrics.json").read_bytes()
    curves = "plots/metrics/curves.png"  # no timings drawn: the same picture, to the byte
    assert (live_dir(pool, "a") / curves).read_bytes() == (live_dir(pool, "b") / curves).read_bytes()
    summary = json.loads((live_dir(pool, "b") / "metrics.json").read_text())
    assert summary["step"] == 3 and summary["best_epoch"] == best_b["epoch"]
    assert summary["val_auc"] == best_b["auc"] and summary["val_n_pos"] == best_b["n_pos"]
    for f in ("best.pt", "last.pt"):
        a, b = _load(pool / "models_a" / "e" / f), _load(pool / "models_b" / "e" / f)
        for part in ("state_dict", "model", "ema", "optimizer"):
            if part in a:
                _assert_same_tensors(a[part], b[part])
    assert _load(pool / "models_a" / "e" / "last.pt")["finished"]
    for f in ("best.pt", "last.pt"):  # resumed = uninterrupted, to the byte (the DVC hash of models/<name>)
        assert (pool / "models_a" / "e" / f).read_bytes() == (pool / "models_b" / "e" / f).read_bytes(), f


def test_changed_config_or_finished_run_starts_fresh(pool, caplog):
    cfg = _cfg(pool, "models_c", epochs=1)
    _run(cfg, pool, "c")
    with caplog.at_level("INFO", logger="dfpipe.train_experts.checkpoint"):
        _run(cfg, pool, "c")  # finished: trains again from scratch
        assert "finished run: starting fresh" in caplog.text
        caplog.clear()
        _run(_cfg(pool, "models_c", epochs=1, lr=1e-3), pool, "c")
        assert "another config or data (or number of processes): starting fresh" in caplog.text
        caplog.clear()  # an unfinished run of 2 processes: batch_size is per process, so not this run
        path = pool / "models_c" / "e" / "last.pt"
        ckpt = _load(path)
        ckpt["finished"], ckpt["key"]["world"] = False, 2
        torch.save(ckpt, path)
        _run(_cfg(pool, "models_c", epochs=1, lr=1e-3), pool, "c")
        assert "another config or data (or number of processes): starting fresh" in caplog.text


def test_early_stopping_on_val_auc(pool, monkeypatch, caplog):
    aucs = iter([0.6, 0.7, 0.65, 0.7, 0.9, 0.95])  # best at epoch 2, then 2 epochs without improvement
    real_summary = loop.summary

    def fake_summary(y, p):
        return {**real_summary(y, p), "auc": next(aucs)}

    monkeypatch.setattr(loop, "summary", fake_summary)
    with caplog.at_level("INFO", logger="dfpipe.train_experts.loop"):
        best, hist = _run(_cfg(pool, "models_p", epochs=6, patience=2, loss=LossWeights(kl=0.0)), pool, "p")
    assert list(hist.epoch) == [1, 2, 3, 4] and best["epoch"] == 2 and best["auc"] == 0.7
    assert "early stop after epoch 4" in caplog.text
    # per-epoch curves hold every epoch; the summary (dvc metrics show) the best one, not the last
    assert list(hist.val_auc) == [0.6, 0.7, 0.65, 0.7]
    summary = json.loads((live_dir(pool, "p") / "metrics.json").read_text())
    assert summary["best_epoch"] == 2 and summary["val_auc"] == 0.7 and summary["step"] == 4
    assert summary["loss"] == hist.loss[1] and "images_per_s" not in summary
    assert _load(pool / "models_p" / "e" / "last.pt")["finished"]


def test_training_curves_png_shows_loss_and_val_auc_per_epoch_and_the_best_epoch(pool):
    """After training a tiny expert, curves.png is a PNG beside the .tsv files; its figure draws the logged loss
    and val AUC of every epoch, the terms that were on (ce, kl, nce here), and the best epoch. (Before: only the
    .tsv files, which ``dvc plots show`` renders with Vega-Lite from a CDN: nothing offline.)"""
    from dfpipe.train_experts.curves import curves_figure

    best, hist = _run(_cfg(pool, "models_curves", epochs=2), pool, "curves")
    png = live_dir(pool, "curves") / "plots" / "metrics" / "curves.png"
    assert png.read_bytes().startswith(b"\x89PNG") and b"Software" not in png.read_bytes()
    fig = curves_figure(hist.to_dict("records"), best["epoch"], "e")
    loss_ax, val_ax = fig.axes
    lines = {ax: {ln.get_label(): ln for ln in ax.get_lines()} for ax in (loss_ax, val_ax)}
    assert set(lines[loss_ax]) == {"loss", "ce", "kl", "nce", f"best epoch {best['epoch']}"}  # lil, gil: off
    assert set(lines[val_ax]) == {"val_auc", "val_tpr_at_fpr_1e-2", f"best epoch {best['epoch']}"}
    np.testing.assert_allclose(lines[loss_ax]["loss"].get_ydata(), hist.loss)
    np.testing.assert_allclose(lines[val_ax]["val_auc"].get_ydata(), hist.val_auc)
    assert list(lines[val_ax]["val_auc"].get_xdata()) == [1, 2]
    assert "images_per_s" not in {*lines[loss_ax], *lines[val_ax]}


def test_logs_go_to_their_directory_only_no_dvc_yaml_no_experiment(pool, tmp_path, monkeypatch):
    """In a Git + DVC repo with a commit, DVCLive's defaults would write dvc.yaml and save a DVC experiment
    (a commit under refs/exps) at the end: stage 4 asks for neither. The optional CSV holds the same rows."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, env=env,
                              check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, env=env, check=True)
    monkeypatch.chdir(repo)
    # no commit yet (git init; dvc init; dvc repro): DVCLive cannot read the repo, logs all the same
    first = _cfg(pool, "models_x0", epochs=1)  # relative train_logs: inside the repo, as under DVC
    loop.run(first.cfg, dataclasses.replace(first.layout, train_logs="reports/train0"), "e")
    assert live_files(repo / "reports" / "train0" / "e") == LIVE_FILES
    git("commit", "-qm", "init")
    head = git("rev-parse", "HEAD")
    cfg, layout = _cfg(pool, "models_x", epochs=2)
    best = loop.run(cfg, dataclasses.replace(layout, train_logs="reports/train"), "e", history="h_{name}.csv")["e"]

    live = repo / "reports" / "train" / "e"
    assert live_files(live) == LIVE_FILES
    assert json.loads((live / "metrics.json").read_text())["val_auc"] == best["auc"]
    assert not (repo / "dvc.yaml").exists() and not list(repo.rglob("dvc.yaml"))
    assert git("for-each-ref", "refs/exps") == "" and git("rev-parse", "HEAD") == head
    assert git("diff", "--cached", "--name-only") == ""  # nothing staged either
    assert not (repo / ".dvc" / "tmp" / "exps" / "run" / "DVCLIVE_ONLY").exists()
    hist, csv = live_history(live), pd.read_csv(repo / "h_e.csv")  # the pattern's {name} is the expert
    assert set(csv.columns) == set(hist.columns)
    pd.testing.assert_frame_equal(csv[hist.columns], hist)


def test_best_checkpoint_holds_the_ema_weights_and_bn_statistics(pool, monkeypatch):
    models = {}
    real_build = loop.build_expert

    def keep(ecfg):
        models["m"] = real_build(ecfg)
        return models["m"]

    monkeypatch.setattr(loop, "build_expert", keep)
    aucs = iter([0.5, 0.9])  # the best epoch is the last one: best.pt = the EMA at the end
    real_summary = loop.summary
    monkeypatch.setattr(loop, "summary", lambda y, p: {**real_summary(y, p), "auc": next(aucs)})
    _run(_cfg(pool, "models_e", epochs=2), pool, "e")
    best = _load(pool / "models_e" / "e" / "best.pt")["state_dict"]
    ema = _load(pool / "models_e" / "e" / "last.pt")["ema"]  # ModelEmaV3's state: "module.<key>"
    student = models["m"].state_dict()
    assert set(ema) == {f"module.{k}" for k in best} and set(best) == set(student)
    for k, v in best.items():
        assert torch.equal(v, ema[f"module.{k}"]), k  # saved = the EMA
    params = dict(models["m"].named_parameters())
    stats = [k for k in best if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 10
    assert sum(not torch.equal(best[k], student[k]) for k in params) > len(params) // 2  # not the raw weights
    assert all(not torch.equal(best[k], student[k]) for k in stats)  # nor the student's BN statistics


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def test_ema_is_the_closed_form_average_of_weights_and_bn_buffers(pool, monkeypatch):
    """With per-step decay d = exp(-1 / (ema_epochs * S)), S steps per epoch, after K updates every float
    entry of the EMA's state_dict (weights and BN running statistics alike) is
    d^K s_0 + sum_k (1 - d) d^(K - k) s_k over the student's snapshots s_0 (when the EMA is made) .. s_K
    (after each optimizer step); integer buffers (num_batches_tracked) are the student's."""
    snaps, captured = [], {}
    real_make = loop.make_ema

    def make(model, ema_epochs, steps_per_epoch, teacher):
        captured["ema"] = e = real_make(model, ema_epochs, steps_per_epoch, teacher)
        captured["steps"], captured["model"] = steps_per_epoch, model
        snaps.append(_float_state(model))  # s_0
        real_update = e.update

        def update(m, step=None):
            snaps.append(_float_state(m))  # s_k, after step k
            real_update(m, step)

        e.update = update
        return e

    monkeypatch.setattr(loop, "make_ema", make)
    ema_epochs = 0.5
    _run(_cfg(pool, "models_ema", epochs=2, ema_epochs=ema_epochs, loss=LossWeights(kl=0.0)), pool, "ema")
    k_max = len(snaps) - 1
    assert captured["steps"] == epoch_length(24, 8, 1) // 8 == 3 and k_max == 2 * 3  # 24 images, batch 8, 2 epochs
    d = math.exp(-1 / (ema_epochs * 3))
    ema = captured["ema"]
    assert ema.decay == pytest.approx(d, rel=1e-12)
    weights = [d ** k_max] + [(1 - d) * d ** (k_max - k) for k in range(1, k_max + 1)]
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    state = {k.removeprefix("module."): v for k, v in _load(pool / "models_ema" / "e" / "last.pt")["ema"].items()}
    live = ema.module.state_dict()
    moved = {"weights": 0, "buffers": 0}
    for key, s0 in snaps[0].items():
        want = sum(w * snap[key] for w, snap in zip(weights, snaps))
        torch.testing.assert_close(state[key].double(), want, rtol=1e-5, atol=1e-6, msg=f"EMA {key}")
        assert torch.equal(state[key], live[key])  # last.pt holds the live EMA
        if not torch.allclose(snaps[-1][key], s0):  # the snapshots differ, so the average is really tested
            moved["buffers" if key.endswith(("running_mean", "running_var")) else "weights"] += 1
    assert moved["weights"] > 10 and moved["buffers"] > 10
    student = captured["model"].state_dict()
    for key, v in state.items():
        if not v.is_floating_point():
            assert torch.equal(v, student[key]), key  # counters are copied, not averaged


def test_ema_decay_is_set_in_epochs():
    """The EMA's reach is ``ema_epochs`` epochs whatever the steps per epoch: the last ``ema_epochs`` epochs
    carry 1 - 1/e of the weight. The old per-step 0.98 is one epoch of 50 steps."""
    assert ema_decay(0.0, 100) == 0.0
    assert ema_decay(1.0, 50) == pytest.approx(0.98, abs=2e-4)
    for steps in (10, 5000):
        d = ema_decay(2.0, steps)
        assert 1 - d ** (2 * steps) == pytest.approx(1 - math.exp(-1), rel=1e-9)
    with pytest.raises(ValueError, match="ema_epochs"):
        ema_decay(-1.0, 10)


def test_ema_off_keeps_no_copy_unless_the_kl_teacher_needs_one():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    assert make_ema(model, 0.0, 10, teacher=False) is None
    teacher = make_ema(model, 0.0, 10, teacher=True)  # decay 0: a copy of the student after each step
    assert teacher.decay == 0.0 and not teacher.module.training
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(2.0)
    teacher.update(model)
    for a, b in zip(teacher.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_batches_do_not_depend_on_the_number_of_workers(pool):
    """Order and augmentation seeds come from the main process's generator, not the workers' RNGs."""
    _, h0 = _run(_cfg(pool, "models_w0", epochs=1), pool, "w0")
    _, h2 = _run(_cfg(pool, "models_w2", workers=2, epochs=1), pool, "w2")
    pd.testing.assert_frame_equal(h0.drop(columns="images_per_s"), h2.drop(columns="images_per_s"))
    a = _load(pool / "models_w0" / "e" / "best.pt")["state_dict"]
    b = _load(pool / "models_w2" / "e" / "best.pt")["state_dict"]
    _assert_same_tensors(a, b)
    # two runs write the same bytes (timings stay in the CSV): models/<name> keeps its DVC hash
    assert h0.images_per_s.notna().all()
    for f in ("best.pt", "last.pt"):
        assert (pool / "models_w0" / "e" / f).read_bytes() == (pool / "models_w2" / "e" / f).read_bytes(), f


def _epoch_pairs(n: int, seed: int, rank: int, world: int, length: int, epochs: int = 2) -> list[list]:
    g = torch.Generator().manual_seed(seed)
    sampler = SeededSampler(n, g, rank=rank, world=world, length=length)
    return [list(sampler) for _ in range(epochs)] + [g.get_state()]


@pytest.mark.parametrize("n, batch", [(23, 8), (5, 8), (16, 4)])
@pytest.mark.parametrize("world", [2, 4])
def test_sampler_shards_are_disjoint_and_make_up_the_one_process_epoch(n, batch, world):
    length = epoch_length(n, batch, world)
    one = _epoch_pairs(n, 7, 0, 1, epoch_length(n, batch, 1))
    shards = [_epoch_pairs(n, 7, r, world, length) for r in range(world)]
    for e in range(2):
        per_rank = [s[e] for s in shards]
        assert len({len(p) for p in per_rank}) == 1  # equal steps on every rank (DDP would hang otherwise)
        assert len(per_rank[0]) == len(SeededSampler(n, torch.Generator(), 0, world, length))
        interleaved = [per_rank[i % world][i // world] for i in range(length)]
        assert interleaved == one[e][:length]  # same global order, same augmentation seeds
        idx = [i for p in per_rank for i, _ in p]
        assert len(idx) == len(set(idx)) == length  # disjoint
        if n > batch:  # whole global batches: the one-process epoch is exactly the union
            assert length == len(one[e]) and length % batch == 0
            per_rank_batch = batch // world
            for k in range(length // batch):  # global step k = the one-process batch k
                step = {i for p in per_rank for i, _ in p[k * per_rank_batch:(k + 1) * per_rank_batch]}
                assert step == {i for i, _ in one[e][k * batch:(k + 1) * batch]}
    for s in shards:  # every rank's generator moves on exactly like the one-process one
        assert torch.equal(s[-1], one[-1])


def test_sampler_rejects_bad_shards():
    g = torch.Generator()
    with pytest.raises(ValueError, match="rank"):
        SeededSampler(10, g, rank=2, world=2)
    with pytest.raises(ValueError, match="divisible"):
        SeededSampler(10, g, rank=0, world=4, length=10)
    assert epoch_length(3, 8, 4) == 0  # fewer images than processes: train_expert refuses


def test_checkpoints_are_byte_reproducible(tmp_path):
    """The same checkpoint saved twice gives the same bytes (stable DVC hashes across runs)."""
    from dfpipe.data.preprocess import Stage1
    from dfpipe.models import build_expert
    from dfpipe.train_experts.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_expert(ExpertConfig(pretrained="none", img_size=32))
    for name in ("a", "b"):
        save_checkpoint(tmp_path / name / "best.pt", model, Stage1(), ExpertConfig(), "x", {"auc": 0.5})
    assert (tmp_path / "a" / "best.pt").read_bytes() == (tmp_path / "b" / "best.pt").read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))


def test_lr_rule_for_the_global_batch():
    """``lr`` is tuned for a global batch of ``lr_ref_batch``; N processes x ``batch_size`` rescale it."""
    assert global_batch(32, 8) == 256
    assert scaled_lr(3e-4, 32, 32, "sqrt") == 3e-4  # one process at the reference batch: lr as is
    assert scaled_lr(3e-4, 256, 32, "sqrt") == pytest.approx(3e-4 * math.sqrt(8))
    assert scaled_lr(3e-4, 256, 32, "linear") == pytest.approx(2.4e-3)
    assert scaled_lr(3e-4, 256, 0, "none") == 3e-4
    with pytest.raises(ValueError, match="lr_ref_batch"):
        scaled_lr(3e-4, 256, 0, "sqrt")
    with pytest.raises(ValueError, match="batch_size"):
        global_batch(0, 2)


def test_sync_bn_only_on_several_gpus_and_keeps_the_checkpoint_keys():
    from types import SimpleNamespace

    from dfpipe.models import build_expert

    def acc(n: int, device: str):
        return SimpleNamespace(num_processes=n, device=torch.device(device))

    torch.manual_seed(0)
    plain = build_expert(ExpertConfig(pretrained="none", img_size=SIZE)).train()
    for off in (maybe_sync_bn(plain, False, acc(8, "cuda")), maybe_sync_bn(plain, True, acc(1, "cuda")),
                maybe_sync_bn(plain, True, acc(2, "cpu"))):  # off, one process, gloo (no SyncBatchNorm kernel)
        assert off is plain and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in off.modules())
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    synced = maybe_sync_bn(copy.deepcopy(plain), True, acc(2, "cuda"))  # converting needs no GPU; syncing does
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn > 10
    assert list(synced.state_dict()) == list(plain.state_dict())  # best.pt loads into the plain expert
    x = torch.randn(4, 3, SIZE, SIZE)
    torch.manual_seed(1)
    a = plain(x)["logits"]
    torch.manual_seed(1)
    b = synced(x)["logits"]  # no process group: plain BN maths (timm's BN + activation layers kept)
    torch.testing.assert_close(a, b)


def test_rank_seeds_differ_by_rank_and_epoch_and_repeat():
    seeds = {(e, r): rank_seed(0, e, r) for e in (1, 2, 3) for r in range(8)}
    assert len(set(seeds.values())) == len(seeds)
    assert rank_seed(0, 2, 1) == seeds[(2, 1)] and rank_seed(1, 2, 1) != seeds[(2, 1)]


def test_accelerator_takes_plain_flags_and_tells_ddp_of_unused_heads_only_when_asked():
    """make_accelerator knows processes, not expert configs: the loop decides (leaves_parameters_unused) and passes
    the answer, which reaches DDP's kwargs; the search for unused layers is off by default (it costs a graph walk)."""
    from dfpipe.train_experts.distributed import make_accelerator

    assert make_accelerator().ddp_handler.to_kwargs() == {}  # accelerate's default: find_unused_parameters off
    acc = make_accelerator(find_unused_parameters=True)
    assert acc.ddp_handler.to_kwargs() == {"find_unused_parameters": True} and acc.device.type == "cpu"
    unused = ExpertConfig(proj_dim=16, loss=LossWeights(ce=1.0, nce=0.0))  # a projection head NCE never reads
    assert loop.leaves_parameters_unused(unused) and not loop.leaves_parameters_unused(ExpertConfig())


def test_gpu_determinism_settings(monkeypatch):
    """Set on CUDA only (CPU kernels already are deterministic); cuBLAS's workspace before its first use."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_determinism(True, cuda=False)
    set_determinism(False, cuda=True)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()
    try:
        set_determinism(True, cuda=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert cudnn.deterministic and not cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        set_determinism(False, cuda=True)  # a later expert of the same process without it
        assert not cudnn.deterministic and not torch.are_deterministic_algorithms_enabled()
    finally:
        cudnn.benchmark, cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def test_a_killed_run_leaves_a_best_pt_that_stage_5_refuses_until_resumed(pool, monkeypatch):
    """Stage 4 killed in epoch 2 of 3: its best.pt (epoch 1) is refused by load_expert (stage 5, the CLI and the
    API load experts through it) with one line naming the expert and the resume command; resumed, it loads."""
    from dfpipe.ensemble_predict.experts import load_expert
    from dfpipe.errors import DataError

    setup = _cfg(pool, "models_k")
    real_epoch = kill_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, pool, "k")
    best = pool / "models_k" / "e" / "best.pt"
    assert best.is_file()
    with pytest.raises(DataError) as err:
        load_expert(best, torch.device("cpu"))
    msg = str(err.value)
    assert msg == f"{pool / 'models_k' / 'e'}: training stopped at epoch 1 of 3; resume it with dvc repro train_experts@e"
    assert "\n" not in msg
    monkeypatch.setattr(loop, "_train_epoch", real_epoch)
    _run(setup, pool, "k")
    assert _load(best)["training"] == {"epoch": 3, "epochs": 3, "finished": True}
    assert load_expert(best, torch.device("cpu")).name == "e"


def test_early_stopping_counts_as_finished(pool, monkeypatch):
    from dfpipe.ensemble_predict.experts import load_expert

    aucs = iter([0.6, 0.7, 0.65, 0.7])
    real_summary = loop.summary
    monkeypatch.setattr(loop, "summary", lambda y, p: {**real_summary(y, p), "auc": next(aucs)})
    _run(_cfg(pool, "models_s", epochs=6, patience=2, loss=LossWeights(kl=0.0)), pool, "s")
    best = pool / "models_s" / "e" / "best.pt"
    assert _load(best)["training"] == {"epoch": 4, "epochs": 6, "finished": True}
    assert load_expert(best, torch.device("cpu")).name == "e"


class _RunsCode:
    """A pickle that runs code when loaded (what a planted last.pt could hold)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_reads_last_pt_as_weights_only_and_never_runs_its_code(pool, tmp_path, caplog):
    """last.pt holds tensors and plain values only (numpy's RNG state as a list), so resume reads it with
    weights_only=True: a planted file that would run code on load is refused (a fresh start), not executed."""
    from dfpipe.train_experts.checkpoint import load_resumable

    setup = _cfg(pool, "models_w", epochs=1)
    _run(setup, pool, "w")
    last = pool / "models_w" / "e" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # a real last.pt loads safely
    assert isinstance(ckpt["rng"]["numpy"][1], list)
    marker = tmp_path / "ran"
    torch.save({**ckpt, "finished": False, "payload": _RunsCode(marker)}, last)
    with caplog.at_level("WARNING", logger="dfpipe.train_experts.checkpoint"):
        assert load_resumable(last.parent, ckpt["key"]) is None
    assert not marker.exists() and "cannot read" in caplog.text


def test_stage_5_the_cli_and_the_api_refuse_an_expert_whose_retraining_was_killed(pool, monkeypatch, tmp_path, capsys):
    """A finished expert and its card; then stage 4 retrains it (another lr) and is killed in epoch 2 of 2. Stage 5
    (Ensemble.load), the CLI and the API (load_ensemble) each stop with the one line naming the expert and the
    resume command, instead of scoring the half-trained epoch-1 weights."""
    import cv2

    from dfpipe.cli import main
    from dfpipe.ensemble_predict import Ensemble
    from dfpipe.errors import DataError
    from dfpipe.io import write_json
    from dfpipe.serve.service import ServeError, load_ensemble

    cpu = torch.device("cpu")
    models, card = pool / "models_r", tmp_path / "ensemble.json"
    _run(_cfg(pool, "models_r", epochs=2), pool, "r")
    write_json(card, Ensemble.load(models, ["e"], ["identity"], "mean_prob", cpu).card({"t_decision": 0.5}))
    kill_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(pool, "models_r", epochs=2, lr=1e-3), pool, "r")
    line = f"{models / 'e'}: training stopped at epoch 1 of 2; resume it with dvc repro train_experts@e"
    with pytest.raises(DataError) as err:
        Ensemble.load(models, ["e"], ["identity"], "mean_prob", cpu)
    assert str(err.value) == line
    with pytest.raises(ServeError) as err:
        load_ensemble(card, models, "cpu", serving=True)
    assert str(err.value).endswith(line) and "\n" not in str(err.value)
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.zeros((SIZE, SIZE, 3), np.uint8))
    capsys.readouterr()
    assert main(["predict", str(img), "--card", str(card), "--models", str(models), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"dfpipe: error: {line}"
