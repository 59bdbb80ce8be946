"""Pair batching (expert setting ``pair_batches``): an original and the stage-2 images made from it share one
global batch (dfpipe.train_experts.sampling.PairBatchSampler), with SeededSampler's guarantees kept: determinism
from the generator's state, whole batches, disjoint DDP shards whose step k makes up the one-process batch k.
Off, stage 4 shuffles exactly as before. A tiny training run on a pool with reconstruction pairs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_cache_pool
from dfpipe.config import ConfigError, ExpertConfig, LossWeights, TrainConfig, from_dict
from dfpipe.data.samples import load_split_pool
from dfpipe.data.store import shard_name, write_png_shard
from dfpipe.train_experts import loop
from dfpipe.train_experts.sampling import PairBatchSampler, SeededSampler, epoch_length, pair_groups, pack_groups
from test_train import live_history, pool_layout

SIZE = 32


def _groups(rng: np.random.Generator, sizes: list[int], n_groups: int) -> np.ndarray:
    """Group codes of a frame of ``n_groups`` groups with sizes drawn from ``sizes``, rows in shuffled order."""
    codes = np.repeat(np.arange(n_groups), rng.choice(sizes, n_groups))
    return codes[rng.permutation(len(codes))]


def _epochs(groups: np.ndarray, seed: int, batch: int, rank: int = 0, world: int = 1, epochs: int = 3,
            length: int | None = None) -> tuple[list[list[tuple[int, int]]], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    length = epoch_length(len(groups), batch, world) if length is None else length
    sampler = PairBatchSampler(groups, g, batch, rank=rank, world=world, length=length)
    return [list(sampler) for _ in range(epochs)], g.get_state()


def _batches_of(groups: np.ndarray, rows: list[int], batch: int) -> pd.Series:
    """How many global batches each group's rows of ``rows`` (one epoch, in order) fall in."""
    return pd.Series(np.arange(len(rows)) // batch).groupby(groups[rows]).nunique()


def _even(rng: np.random.Generator, n_groups: int) -> np.ndarray:
    """Singletons and pairs, an even number of rows: with an even batch the packing never has to split a group
    (a batch left one short with only pairs waiting would leave an odd number of rows to an even total)."""
    groups = _groups(rng, [1, 2], n_groups)
    return groups if len(groups) % 2 == 0 else np.append(groups, n_groups)  # one more singleton


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch", [4, 8, 16])
def test_every_group_is_in_one_global_batch_of_an_epoch_that_permutes_whole_batches(seed, batch):
    rng = np.random.default_rng(seed)
    groups = _even(rng, 40)
    epochs, _ = _epochs(groups, seed, batch)
    length = epoch_length(len(groups), batch)
    orders = []
    for pairs in epochs:
        rows = [i for i, _ in pairs]
        assert len(rows) == length and length % batch == 0  # whole batches, fewer than a batch left out
        assert len(set(rows)) == length and set(rows) <= set(range(len(groups)))  # each row at most once
        assert (_batches_of(groups, rows, batch) == 1).all()  # no group across two batches
        orders.append(rows)
    assert orders[0] != orders[1] != orders[2]  # a new order each epoch
    # the pairs really are together: without pairing, some pair would be cut (checks the check)
    plain = [i for i, _ in SeededSampler(len(groups), torch.Generator().manual_seed(seed), length=length)]
    assert (_batches_of(groups, plain, batch) > 1).any()


def test_a_group_is_split_only_when_whole_groups_cannot_fill_the_batches():
    """Groups larger than a batch, and sizes that cannot tile a batch: every batch still full, every row once."""
    groups = np.repeat(np.arange(10), [9, 3, 3, 3, 3, 3, 1, 2, 2, 3])  # 32 rows: a group of 9 > batch 4
    for pairs in _epochs(groups, 0, 4, epochs=5)[0]:
        rows = [i for i, _ in pairs]
        assert sorted(rows) == list(range(32))  # 32 = 8 whole batches of 4: every row
        spans = _batches_of(groups, rows, 4)
        assert spans[0] >= 3  # 9 rows need 3 batches
        assert (spans.drop(0) <= 2).all()  # a split group is cut once
    assert [(s, n) for s, n in pack_groups(np.array([0, 3, 6]), np.array([3, 3, 3]), 4, 2)] == [
        (0, 3), (3, 1), (4, 2), (6, 2)]  # triples into batches of 4: the second triple fills both gaps


def test_same_generator_state_same_batches_and_resume():
    groups = _even(np.random.default_rng(1), 30)
    a, state_a = _epochs(groups, 5, 8)
    b, state_b = _epochs(groups, 5, 8)
    assert a == b and torch.equal(state_a, state_b)
    assert _epochs(groups, 6, 8)[0][0] != a[0]  # another seed, another order
    # resume: a generator restored to its state after epoch 1 gives epochs 2 and 3
    g = torch.Generator().manual_seed(5)
    list(PairBatchSampler(groups, g, 8, length=epoch_length(len(groups), 8)))
    resumed = PairBatchSampler(groups, torch.Generator().set_state(g.get_state()), 8,
                               length=epoch_length(len(groups), 8))
    assert [list(resumed), list(resumed)] == a[1:]
    # the augmentation seeds come from the generator too, one per position
    assert len({s for _, s in a[0]}) == len(a[0])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("n_groups, batch", [(40, 8), (3, 8)])  # many batches; fewer rows than one batch
def test_ddp_shards_are_disjoint_and_step_k_is_the_one_process_batch_k(world, n_groups, batch):
    groups = _even(np.random.default_rng(2), n_groups)
    length = epoch_length(len(groups), batch, world)
    one, state_one = _epochs(groups, 3, batch, length=length)
    shards = [_epochs(groups, 3, batch, rank=r, world=world, length=length) for r in range(world)]
    cap = min(batch, length)
    for e in range(3):
        per_rank = [s[0][e] for s in shards]
        assert len({len(p) for p in per_rank}) == 1  # equal steps on every rank
        rows = [i for p in per_rank for i, _ in p]
        assert len(rows) == len(set(rows)) == length  # disjoint
        step = cap // world
        for k in range(length // cap):
            together = {pair for p in per_rank for pair in p[k * step:(k + 1) * step]}
            assert together == set(one[e][k * cap:(k + 1) * cap])  # same rows, same augmentation seeds
        # interleaving the ranks gives back the one-process order exactly
        assert [per_rank[i % world][i // world] for i in range(length)] == one[e]
    for _, state in shards:  # every rank's generator moves on like the one-process one
        assert torch.equal(state, state_one)


def test_bad_shards_are_refused():
    groups = np.arange(10)
    with pytest.raises(ValueError, match="rank"):
        PairBatchSampler(groups, torch.Generator(), 4, rank=2, world=2)
    with pytest.raises(ValueError, match="whole batches"):
        PairBatchSampler(groups, torch.Generator(), 4, length=10)  # 10 rows are not whole batches of 4


def test_pair_groups_roots_originals_and_generated_rows():
    df = pd.DataFrame({
        "uid": ["train/a", "train/b", "aug/r1", "aug/r1_real", "aug/splice", "aug/sbi", "train/c"],
        "origin": ["train", "train", "aug", "aug", "aug", "aug", "train"],
        "source_uid": ["train/a", "train/b", "train/a", "train/a", "train/b", "train/c", "train/c"],
        "donor_uid": ["", "", "", "", "train/a", "", ""]})
    codes = pair_groups(df)
    assert codes[0] == codes[2] == codes[3]  # a real, its reconstruction and the pair's real copy
    assert codes[1] == codes[4] != codes[0]  # a splice goes with its source, not its donor
    assert codes[5] == codes[6] and len(set(codes)) == 3


def test_pair_batches_needs_use_augmented():
    with pytest.raises(ConfigError, match="use_augmented"):
        from_dict(ExpertConfig, {"pair_batches": True}, "train_experts.experts.a")
    assert from_dict(ExpertConfig, {"pair_batches": True, "use_augmented": True}, "x").pair_batches


# --------------------------------------------------------------------------- stage 4 with a paired pool
N_REAL, N_FAKE, N_RECON = 8, 8, 6  # train originals; the first N_RECON reals get a reconstruction


def _write_paired_pool(root: Path) -> None:
    """conftest's pool (train: N_REAL reals then N_FAKE fakes; val) plus a stage-2 shard of reconstructions of the
    first N_RECON reals, in the split table in their source's fold."""
    rng = np.random.default_rng(0)
    labels = {"train": np.repeat([0, 1], [N_REAL, N_FAKE]), "val": np.arange(8) % 2}
    imgs = {s: rng.integers(0, 256, (len(y), SIZE, SIZE, 3), dtype=np.uint8) for s, y in labels.items()}
    for s in imgs:
        imgs[s][labels[s] == 1, 8:24, 8:24] //= 4  # the fakes' "manipulated" patch
    write_cache_pool(root, {s: (imgs[s], labels[s]) for s in labels}, n_clusters=2)
    recon = (imgs["train"][:N_RECON] // 8) * 8  # a "decoder trace": the real's low bits lost
    shard = shard_name("aug", 0)
    index = write_png_shard(root / "aug" / shard, recon)
    src = [f"train/{i}.jpg" for i in range(N_RECON)]
    aug = pd.DataFrame({"uid": [f"aug/recon_{i}.png" for i in range(N_RECON)], "img_name": "", "label": 1,
                        "source_uid": src, "donor_uid": "", "method": "recon_taef2", "cache_file": shard,
                        "cache_index": index})
    aug.to_csv(root / "aug" / "manifest.csv", index=False)
    splits = pd.read_csv(root / "splits.csv")
    rows = splits.set_index("uid").loc[src, ["cluster", "fold", "subset"]].reset_index(drop=True)
    rows = rows.assign(uid=aug.uid, origin="aug")  # a reconstruction sits in its source's fold (stage 3's rule)
    pd.concat([splits, rows[splits.columns]], ignore_index=True).to_csv(root / "splits.csv", index=False)


@pytest.fixture(scope="module")
def paired_pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairpool")
    _write_paired_pool(root)
    return root


def _setup(root: Path, models: str, **kw) -> tuple[TrainConfig, object]:
    expert = ExpertConfig(pretrained="none", img_size=SIZE, epochs=2, batch_size=4, lr=2e-3, augment="light",
                          use_augmented=True, loss=LossWeights(ce=1.0, nce=0.1), **kw)
    return TrainConfig(workers=0, experts={"e": expert}), pool_layout(root, models=root / models)


def _spy_loaders(monkeypatch) -> dict:
    """Keep what stage 4's ``_loaders`` was given and built."""
    seen: dict = {}
    real = loop._loaders

    def spy(cfg, ecfg, train_df, val_df, g, acc):
        out = real(cfg, ecfg, train_df, val_df, g, acc)
        seen.update(train_df=train_df, loader=out[0], g=g)
        return out

    monkeypatch.setattr(loop, "_loaders", spy)
    return seen


@pytest.mark.usefixtures("one_torch_thread")
def test_a_training_run_with_pair_batches_trains_on_paired_batches(paired_pool, monkeypatch, caplog):
    seen = _spy_loaders(monkeypatch)
    cfg, layout = _setup(paired_pool, "models_paired", pair_batches=True)
    layout = dataclasses.replace(layout, train_logs=str(paired_pool / "logs_paired"))
    with caplog.at_level("INFO", logger="dfpipe.train_experts.loop"):
        best = loop.run(cfg, layout, "e")["e"]
    # 22 training images: 6 real + reconstruction pairs, 10 singletons
    assert "pair batches: 22 training images in 16 groups (6 of 2+ images, largest 2), packed whole" in caplog.text
    history = live_history(paired_pool / "logs_paired" / "e")
    assert list(history.epoch) == [1, 2] and np.isfinite(history.loss).all() and 0.0 <= best["auc"] <= 1.0
    ckpt = torch.load(paired_pool / "models_paired" / "e" / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["pair_batches"] is True
    # the loader stage 4 trained with: batches of 4 that keep every real with its reconstruction
    groups = pair_groups(seen["train_df"])
    batches = [idx.tolist() for _, _, idx in seen["loader"]]
    assert {len(b) for b in batches} == {4} and len(batches) == 5
    rows = [i for b in batches for i in b]
    assert (_batches_of(groups, rows, 4) == 1).all() and len(set(rows)) == 20
    assert sum(len(set(groups[b])) < len(b) for b in batches) >= 1  # some batch does hold a pair


def test_off_stage_4_shuffles_exactly_as_before(paired_pool):
    """pair_batches false: the loader's sampler is SeededSampler, whose draws are pinned (taken before the
    setting existed: torch is pinned in constraints.txt)."""
    g = torch.Generator().manual_seed(7)
    before = SeededSampler(10, g, rank=1, world=2, length=8)
    assert list(before) == [(0, 123961976), (4, 460349232), (7, 1008284691), (6, 183049916)]
    assert list(before) == [(1, 1958470325), (2, 578353978), (4, 1099022331), (7, 1853169803)]
    cfg, _ = _setup(paired_pool, "unused")
    ecfg = cfg.experts["e"]
    train_df = load_split_pool(paired_pool / "splits.csv", paired_pool / "prepared", paired_pool / "aug")
    train_df = train_df[train_df.subset == "train"].reset_index(drop=True)
    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    loaders = loop._loaders(cfg, ecfg, train_df, train_df, torch.Generator().manual_seed(3), acc)
    sampler = loaders[0].sampler
    assert type(sampler) is SeededSampler
    expect = SeededSampler(len(train_df), torch.Generator().manual_seed(3), length=20)
    assert [list(sampler), list(sampler)] == [list(expect), list(expect)]
    on = dataclasses.replace(ecfg, pair_batches=True)
    assert type(loop._loaders(cfg, on, train_df, train_df, torch.Generator(), acc)[0].sampler) is PairBatchSampler
