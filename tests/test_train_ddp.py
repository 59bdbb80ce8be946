"""Stage 4 under DDP: a 2-process run on CPU (gloo) through the same ``run_train`` entry.

Each process is a rank set up as ``torchrun`` / ``accelerate launch`` would (RANK, WORLD_SIZE, MASTER_*),
with a few spies: which training samples it loaded per epoch, the val predictions that went into the
metrics, the files it wrote, and its final params and EMA. One uninterrupted run and one run killed after
epoch 1 and resumed.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from test_train import LIVE_FILES, _cfg, _write_pool, live_files, live_history

WORLD = 2
N_TRAIN, N_VAL = 24, 11  # 24 = 3 global batches of 8 (4 per rank); 11 val: uneven shards, 6 + 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, root: str) -> None:
    """One rank: the uninterrupted run (models_a) and the killed + resumed run (models_b)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), ACCELERATE_USE_CPU="1",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import dvclive

    from dfpipe.train import checkpoint, logs, loop

    root_p = Path(root)
    spy = {"epoch": 0, "seen": [], "val": [], "writes": []}

    class Recording(loop.SeededAugmentDataset):
        def __getitem__(self, item):
            spy["seen"].append((spy["epoch"], int(item[0])))
            return super().__getitem__(item)

    real_epoch, real_summary, real_save = loop._train_epoch, loop.summary, checkpoint.save_torch
    kill_at = {"epoch": None}

    def train_epoch(*args, **kwargs):
        spy["epoch"] = args[-1]
        if args[-1] == kill_at["epoch"]:
            raise KeyboardInterrupt("killed")
        return real_epoch(*args, **kwargs)

    def summary(y, p):
        spy["val"].append((np.asarray(y).tolist(), np.asarray(p, dtype=float).tolist()))
        return real_summary(y, p)

    def save_torch(obj, path):
        spy["writes"].append(str(path))
        real_save(obj, path)

    real_live_init = dvclive.Live.__init__

    def live_init(self, *args, **kwargs):  # every DVCLive logger a rank opens (each writes its dir)
        spy["writes"].append(str(kwargs.get("dir", args[0] if args else "dvclive")))
        real_live_init(self, *args, **kwargs)

    def writer(real):
        def write(path, obj):
            spy["writes"].append(str(path))
            real(path, obj)
        return write

    captured: dict = {}
    real_build, real_ema = loop.build_expert, loop.ExponentialMovingAverage

    def build(ecfg):
        captured["model"] = real_build(ecfg)
        return captured["model"]

    def ema(params, decay):
        captured["ema"] = real_ema(params, decay=decay)
        return captured["ema"]

    loop.SeededAugmentDataset, loop._train_epoch, loop.summary = Recording, train_epoch, summary
    loop.build_expert, loop.ExponentialMovingAverage = build, ema
    logs.write_csv, checkpoint.save_torch, dvclive.Live.__init__ = writer(logs.write_csv), save_torch, live_init

    best_a = loop.run_train(_cfg(root_p, "models_a", epochs=2), "e", root_p / "a", root_p / "a.csv")
    state = {"params": {k: v.detach().clone() for k, v in captured["model"].state_dict().items()},
             "ema": [t.clone() for t in captured["ema"].shadow_params]}
    record = {"best": best_a, "seen": spy["seen"], "val": spy["val"], "writes": spy["writes"]}

    spy["seen"], spy["writes"] = [], []
    kill_at["epoch"] = 2
    cfg_b = _cfg(root_p, "models_b", epochs=2)
    try:
        loop.run_train(cfg_b, "e", root_p / "b", root_p / "b.csv")
    except KeyboardInterrupt:
        torch.distributed.barrier()  # a launcher restarts every rank after rank 0 wrote last.pt
    kill_at["epoch"] = None
    record["best_b"] = loop.run_train(cfg_b, "e", root_p / "b", root_p / "b.csv")
    record["writes_b"] = spy["writes"]
    torch.save(state, root_p / f"rank{rank}.pt")
    (root_p / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    _write_pool(root, n_train=N_TRAIN, n_val=N_VAL)
    mp.spawn(_rank_main, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root


def _record(root: Path, rank: int) -> dict:
    return json.loads((root / f"rank{rank}.json").read_text())


def test_each_epoch_covers_every_training_sample_once_across_ranks(ddp_run):
    seen = [_record(ddp_run, r)["seen"] for r in range(WORLD)]
    for epoch in (1, 2):
        shards = [[i for e, i in s if e == epoch] for s in seen]
        assert [len(s) for s in shards] == [N_TRAIN // WORLD] * WORLD  # equal shares
        assert sorted(shards[0] + shards[1]) == list(range(N_TRAIN))  # disjoint, and all of them
    assert [i for e, i in seen[0] if e == 1] != [i for e, i in seen[0] if e == 2]  # reshuffled per epoch


def test_val_metrics_are_those_of_the_whole_val_set(ddp_run):
    from dfpipe.data.dataset import StoreDataset
    from dfpipe.data.preprocess import InputPolicy
    from dfpipe.data.samples import load_split_pool
    from dfpipe.models import expert_from_description
    from dfpipe.train.loop import predict_probs

    recs = [_record(ddp_run, r) for r in range(WORLD)]
    df = load_split_pool(ddp_run / "splits.csv", ddp_run / "prepared", ddp_run / "aug")
    val_df = df[df.subset == "val"].reset_index(drop=True)
    metrics = recs[0]["best"]
    assert metrics["n_pos"] + metrics["n_neg"] == N_VAL
    logged = json.loads((ddp_run / "a" / "metrics.json").read_text())  # DVCLive's summary: the best epoch
    assert logged["val_auc"] == metrics["auc"] and logged["best_epoch"] == metrics["epoch"]
    assert logged["val_n_pos"] + logged["val_n_neg"] == N_VAL
    for rec in recs:  # every rank scored the same, whole, val set in its original order
        assert rec["val"] == recs[0]["val"] and rec["best"] == metrics
        for y, _ in rec["val"]:
            assert y == val_df.label.tolist()
    # the gathered predictions are those of best.pt on the full val set, each at its own index
    ckpt = torch.load(ddp_run / "models_a" / "e" / "best.pt", map_location="cpu", weights_only=False)
    model = expert_from_description(ckpt["description"])
    model.load_state_dict(ckpt["state_dict"])
    policy = InputPolicy(**ckpt["description"]["preprocess"]["input"])  # the contract the checkpoint carries
    loader = torch.utils.data.DataLoader(StoreDataset(val_df, [policy]), batch_size=4)
    probs = predict_probs(model, loader, torch.device("cpu"))
    gathered = np.asarray(recs[0]["val"][metrics["epoch"] - 1][1])
    np.testing.assert_allclose(gathered, probs, rtol=1e-4, atol=1e-6)


def test_only_rank_0_writes_one_checkpoint_set_and_the_reports(ddp_run):
    recs = [_record(ddp_run, r) for r in range(WORLD)]
    assert recs[1]["writes"] == [] and recs[1]["writes_b"] == []
    assert {Path(p).name for p in recs[0]["writes"]} == {"best.pt", "last.pt", "a", "a.csv"}
    assert sorted(p.name for p in (ddp_run / "models_a" / "e").iterdir()) == ["best.pt", "last.pt"]
    last = torch.load(ddp_run / "models_a" / "e" / "last.pt", map_location="cpu", weights_only=False)
    assert last["finished"] and last["world"] == WORLD and last["epoch"] == 2
    assert live_files(ddp_run / "a") == LIVE_FILES
    hist = live_history(ddp_run / "a")
    assert list(hist.epoch) == [1, 2] and hist.images_per_s.gt(0).all()
    csv = pd.read_csv(ddp_run / "a.csv")  # the optional plain CSV: the same rows
    pd.testing.assert_frame_equal(csv[hist.columns], hist)


def test_params_and_ema_stay_identical_on_every_rank(ddp_run):
    a, b = (torch.load(ddp_run / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert len(a["ema"]) == len(b["ema"]) > 0
    assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"]))


def test_a_killed_ddp_run_resumes_to_the_uninterrupted_result(ddp_run):
    rec = _record(ddp_run, 0)
    assert rec["best_b"] == rec["best"]
    for f in ("best.pt", "last.pt"):
        assert (ddp_run / "models_a" / "e" / f).read_bytes() == (ddp_run / "models_b" / "e" / f).read_bytes(), f
    hist_a, hist_b = live_history(ddp_run / "a"), live_history(ddp_run / "b")
    pd.testing.assert_frame_equal(hist_a.drop(columns="images_per_s"), hist_b.drop(columns="images_per_s"))
    assert hist_b.images_per_s.notna().all()  # epoch 1's timing comes back from the killed run's logs
    assert (ddp_run / "a" / "metrics.json").read_bytes() == (ddp_run / "b" / "metrics.json").read_bytes()
