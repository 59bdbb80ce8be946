"""Stage 4 under DDP: a 2-process run on CPU (gloo) through the same stage entry, ``loop.run``.

Each process is a rank set up as ``torchrun`` / ``accelerate launch`` would (RANK, WORLD_SIZE, MASTER_*),
with a few spies: which training samples it loaded per epoch, the val predictions that went into the
metrics, the files it wrote, the dropout seed of each epoch, the NCE batch, and its final params and EMA.
One uninterrupted run and one run killed after epoch 1 and resumed. Apart from the run: the joint loss
with NCE and LIL over the gathered global batch gives the one-process loss and gradients.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from test_train import LIVE_FILES, _cfg, _write_pool, live_dir, live_files, live_history

WORLD = 2
N_TRAIN, N_VAL = 24, 11  # 24 = 3 global batches of 8 (batch_size 4 per rank); 11 val: uneven shards, 6 + 5
BATCH = 4  # per rank


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

    from dfpipe.train_experts import checkpoint, logs, loop

    root_p = Path(root)
    spy = {"epoch": 0, "seen": [], "val": [], "writes": [], "seeds": [], "nce_batch": set()}

    class Recording(loop.SeededAugmentDataset):
        def __getitem__(self, item):
            spy["seen"].append((spy["epoch"], int(item[0])))
            return super().__getitem__(item)

    real_epoch, real_summary, real_save = loop._train_epoch, loop.summary, checkpoint.save_torch
    kill_at = {"epoch": None}

    def train_epoch(*args, **kwargs):
        spy["epoch"] = args[-1]
        spy["seeds"].append(torch.initial_seed())  # the dropout seed this rank trains the epoch with
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
    real_build, real_ema, real_gather = loop.build_expert, loop.make_ema, loop.gather_across_ranks

    def build(ecfg):
        captured["model"] = real_build(ecfg)
        return captured["model"]

    def ema(*args, **kwargs):
        captured["ema"] = real_ema(*args, **kwargs)
        return captured["ema"]

    def gather(t):
        out = real_gather(t)
        spy["nce_batch"].add((len(t), len(out)))
        return out

    loop.SeededAugmentDataset, loop._train_epoch, loop.summary = Recording, train_epoch, summary
    loop.build_expert, loop.make_ema, loop.gather_across_ranks = build, ema, gather
    logs.write_csv, checkpoint.save_torch, dvclive.Live.__init__ = writer(logs.write_csv), save_torch, live_init

    def train(models: str, tag: str) -> dict:
        """Stage 4 on this rank: expert "e" into ``root / models``, logs under ``root / tag`` and ``tag.csv``."""
        cfg, layout = _cfg(root_p, models, **RUN)
        layout = dataclasses.replace(layout, train_logs=str(root_p / tag))
        return loop.run(cfg, layout, "e", history=str(root_p / f"{tag}.csv"))["e"]

    best_a = train("models_a", "a")
    state = {"params": {k: v.detach().clone() for k, v in captured["model"].state_dict().items()},
             "ema": {k: v.clone() for k, v in captured["ema"].state_dict().items()}}
    record = {"best": best_a, "seen": spy["seen"], "val": spy["val"], "writes": spy["writes"], "seeds": spy["seeds"],
              "nce_batch": sorted(spy["nce_batch"]),
              "sync_bn": any(isinstance(m, torch.nn.SyncBatchNorm) for m in captured["model"].modules())}

    spy["seen"], spy["writes"], spy["seeds"] = [], [], []
    kill_at["epoch"] = 2
    try:
        train("models_b", "b")
    except KeyboardInterrupt:
        torch.distributed.barrier()  # a launcher restarts every rank after rank 0 wrote last.pt
    kill_at["epoch"] = None
    record["best_b"] = train("models_b", "b")
    record["writes_b"], record["seeds_b"] = spy["writes"], spy["seeds"]
    torch.save(state, root_p / f"rank{rank}.pt")
    (root_p / f"rank{rank}.json").write_text(json.dumps(record))


# per-rank batch; sync_bn asked for but skipped on CPU (gloo); KL to the EMA teacher and NCE both on
RUN = {"epochs": 2, "batch_size": BATCH, "sync_bn": True}


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
    from dfpipe.data.samples import load_split_pool
    from dfpipe.models import expert_from_description
    from dfpipe.train_experts.loop import predict_probs

    recs = [_record(ddp_run, r) for r in range(WORLD)]
    df = load_split_pool(ddp_run / "splits.csv", ddp_run / "prepared", ddp_run / "aug")
    val_df = df[df.subset == "val"].reset_index(drop=True)
    metrics = recs[0]["best"]
    assert metrics["n_pos"] + metrics["n_neg"] == N_VAL
    logged = json.loads((live_dir(ddp_run, "a") / "metrics.json").read_text())  # DVCLive's summary: the best epoch
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
    policy = model.input.policy  # the contract the checkpoint carries
    loader = torch.utils.data.DataLoader(StoreDataset(val_df, [policy]), batch_size=4)
    probs = predict_probs(model, loader, torch.device("cpu"))
    gathered = np.asarray(recs[0]["val"][metrics["epoch"] - 1][1])
    np.testing.assert_allclose(gathered, probs, rtol=1e-4, atol=1e-6)


def test_only_rank_0_writes_one_checkpoint_set_and_the_reports(ddp_run):
    recs = [_record(ddp_run, r) for r in range(WORLD)]
    assert recs[1]["writes"] == [] and recs[1]["writes_b"] == []
    assert {Path(p).relative_to(ddp_run).as_posix() for p in recs[0]["writes"]} == {
        "models_a/e/best.pt", "models_a/e/last.pt", "a/e", "a.csv"}  # <train_logs>/<expert>: DVCLive's dir
    assert sorted(p.name for p in (ddp_run / "models_a" / "e").iterdir()) == ["best.pt", "last.pt"]
    last = torch.load(ddp_run / "models_a" / "e" / "last.pt", map_location="cpu", weights_only=False)
    assert last["finished"] and last["world"] == WORLD and last["epoch"] == 2
    assert live_files(live_dir(ddp_run, "a")) == LIVE_FILES
    hist = live_history(live_dir(ddp_run, "a"))
    assert list(hist.epoch) == [1, 2] and hist.images_per_s.gt(0).all()
    csv = pd.read_csv(ddp_run / "a.csv")  # the optional plain CSV: the same rows
    pd.testing.assert_frame_equal(csv[hist.columns], hist)


def test_params_and_ema_stay_identical_on_every_rank(ddp_run):
    a, b = (torch.load(ddp_run / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert a["ema"].keys() == b["ema"].keys() and len(a["ema"]) > 0  # weights and BN buffers
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k


def test_a_killed_ddp_run_resumes_to_the_uninterrupted_result(ddp_run):
    rec = _record(ddp_run, 0)
    assert rec["best_b"] == rec["best"]
    for f in ("best.pt", "last.pt"):
        assert (ddp_run / "models_a" / "e" / f).read_bytes() == (ddp_run / "models_b" / "e" / f).read_bytes(), f
    hist_a, hist_b = live_history(live_dir(ddp_run, "a")), live_history(live_dir(ddp_run, "b"))
    pd.testing.assert_frame_equal(hist_a.drop(columns="images_per_s"), hist_b.drop(columns="images_per_s"))
    assert hist_b.images_per_s.notna().all()  # epoch 1's timing comes back from the killed run's logs
    live_a, live_b = live_dir(ddp_run, "a"), live_dir(ddp_run, "b")
    assert (live_a / "metrics.json").read_bytes() == (live_b / "metrics.json").read_bytes()


def test_global_batch_nce_and_rank_seeds_in_the_run(ddp_run):
    recs = [_record(ddp_run, r) for r in range(WORLD)]
    for rec in recs:
        # NCE features and labels of BATCH per rank were gathered into the global batch
        assert rec["nce_batch"] == [[BATCH, BATCH * WORLD]]
        assert rec["sync_bn"] is False  # gloo has no SyncBatchNorm: skipped, with a log line
        assert len(rec["seeds"]) == 2 and rec["seeds"][0] != rec["seeds"][1]  # a new dropout seed per epoch
    assert recs[0]["seeds"][0] != recs[1]["seeds"][0]  # ... and per rank: different dropout masks
    for rec in recs:  # the resumed run (killed at epoch 2, then epoch 2 again) used the same seeds
        assert rec["seeds_b"] == [rec["seeds"][0], rec["seeds"][1], rec["seeds"][1]]


# --------------------------------------------------------------------------- the NCE and LIL terms over the ranks
N_LOSS, DIM = 8, 5  # a global batch of 8 samples, 4 per rank


def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_LOSS, DIM, generator=g)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    net = torch.nn.Linear(DIM, 12)  # (B, 12): 2 logits, 4 features, 2 + 2 x 2 logits of the variational heads
    with torch.no_grad():
        net.weight.copy_(torch.randn(12, DIM, generator=g))
        net.bias.copy_(torch.randn(12, generator=g))
    return x, labels, net


def _joint(net, x, labels, gather=None) -> dict:
    from dfpipe.config import LossWeights
    from dfpipe.losses import JointLoss

    z = net(x)
    fn = JointLoss(LossWeights(ce=1.0, kl=0.0, nce=0.5, lil=1.0, gil=0.5), temperature=0.2, gather=gather)
    return fn({"logits": z[:, :2], "feat": z[:, 2:6], "info_logits": z[:, 6:8],
               "info_loo_logits": z[:, 8:].reshape(-1, 2, 2)}, labels)


def _loss_rank(rank: int, port: int, root: str) -> None:
    """One rank of a DDP-wrapped linear 'expert' on its half of the global batch, gathering for NCE and LIL."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD)
    from dfpipe.train_experts.distributed import gather_across_ranks

    x, labels, net = _loss_inputs()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    mine = slice(rank * N_LOSS // WORLD, (rank + 1) * N_LOSS // WORLD)
    out = _joint(ddp, x[mine], labels[mine], gather=gather_across_ranks)
    out["total"].backward()  # DDP averages the gradients over the ranks
    torch.save({"nce": out["nce"], "lil": out["lil"], "ce": out["ce"], "total": out["total"].detach(),
                "grads": {k: p.grad for k, p in net.named_parameters()}}, Path(root) / f"loss{rank}.pt")
    torch.distributed.destroy_process_group()


def test_nce_and_lil_over_gathered_ranks_give_the_one_process_loss_and_gradients(tmp_path):
    """On one process ``gather`` is the identity; on two, every rank's NCE and LIL are the losses of the whole
    global batch and DDP's averaged gradients are those of one process on it (CE, GIL: the mean of the rank
    means)."""
    from dfpipe.train_experts.distributed import gather_across_ranks

    x, labels, net = _loss_inputs()
    one = _joint(net, x, labels, gather=gather_across_ranks)  # no process group: the identity
    one["total"].backward()
    mp.spawn(_loss_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"loss{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in ranks:
        torch.testing.assert_close(r["nce"], one["nce"])  # the global-batch NCE on every rank
        torch.testing.assert_close(r["lil"], one["lil"])  # and LIL: exp of the global mean
        for k, p in net.named_parameters():
            torch.testing.assert_close(r["grads"][k], p.grad, msg=k)
    torch.testing.assert_close(sum(r["ce"] for r in ranks) / WORLD, one["ce"])
    assert one["nce"] > 0 and 0 < one["lil"] < 1
    # without the gather each rank's NCE / LIL would be those of its own 4 samples: not the same losses
    local = _joint(net, x[:N_LOSS // WORLD], labels[:N_LOSS // WORLD])
    assert not torch.isclose(local["nce"], one["nce"]) and not torch.isclose(local["lil"], one["lil"])


# ----------------------------------------------------------------------------- unused heads under DDP
_WEIGHT_SETS = [  # (loss weights, proj_dim, info_heads): the layouts a params.yaml can ask for
    (dict(ce=1.0), 0, 0), (dict(ce=1.0, kl=0.5, nce=0.1), 16, 0), (dict(ce=1.0), 16, 0),
    (dict(ce=0.0, kl=0.5), 0, 0), (dict(ce=0.0, nce=0.1), 0, 0), (dict(ce=0.0, nce=0.1), 16, 0),
    (dict(ce=1.0, lil=1.0, gil=1.0), 0, 2), (dict(ce=0.0, kl=0.5, lil=1.0), 0, 2), (dict(ce=0.0, kl=0.5), 0, 2),
    (dict(ce=0.0, gil=1.0), 0, 2), (dict(ce=0.0, lil=1.0), 0, 2), (dict(ce=1.0, nce=0.1), 16, 2),
    (dict(ce=1.0), 16, 2),
]


def _one_step_grads(ecfg, steps: int = 1, ddp_unused: bool | None = None, root: Path | None = None):
    """The real expert and JointLoss of ``ecfg`` (KL against a fixed teacher), ``steps`` optimizer steps; wrapped
    in a one-process gloo DDP with ``find_unused_parameters=ddp_unused`` unless that is None. The names of the
    trainable parameters left without a gradient by the last step."""
    import torch.distributed as dist

    from dfpipe.losses import JointLoss
    from dfpipe.models import build_expert, trainable_parameters

    torch.manual_seed(0)
    net = build_expert(ecfg)
    model = net
    if ddp_unused is not None:
        dist.init_process_group("gloo", init_method=f"file://{root / 'pg'}", rank=0, world_size=1)
        model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=ddp_unused)
    try:
        loss = JointLoss(ecfg.loss)
        opt = torch.optim.SGD(trainable_parameters(net), lr=0.01)
        x, y = torch.randn(4, 3, ecfg.img_size, ecfg.img_size), torch.tensor([0, 1, 0, 1])
        for _ in range(steps):
            model.train()
            opt.zero_grad(set_to_none=True)
            loss(model(x), y, teacher_logits=torch.randn(4, 2))["total"].backward()
            opt.step()
    finally:
        if ddp_unused is not None:
            dist.destroy_process_group()
    return [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize(("weights", "proj_dim", "info_heads"), _WEIGHT_SETS)
def test_ddp_is_told_of_unused_heads_exactly_when_a_head_gets_no_gradient(weights, proj_dim, info_heads):
    """The rule behind make_accelerator's find_unused_parameters, checked against a real backward: asked for
    exactly when some trainable layer gets no gradient (off otherwise: the search costs a graph walk a step)."""
    from dfpipe.config import ExpertConfig, LossWeights
    from dfpipe.train_experts.loop import leaves_parameters_unused

    ecfg = ExpertConfig(pretrained="none", img_size=32, proj_dim=proj_dim, info_heads=info_heads,
                        loss=LossWeights(**{"ce": 0.0, "kl": 0.0, "nce": 0.0, **weights}))
    unused = _one_step_grads(ecfg)
    assert all(not n.startswith("backbone.") for n in unused)
    assert leaves_parameters_unused(ecfg) == bool(unused), unused


def test_a_projection_head_without_nce_trains_under_ddp(tmp_path):
    """proj_dim > 0 with loss.nce = 0 (NCE switched off in params, the head kept): the projection head gets no
    gradient. Without find_unused_parameters DDP fails on the second step; with the rule's answer it trains."""
    from dfpipe.config import ExpertConfig, LossWeights
    from dfpipe.train_experts.loop import leaves_parameters_unused

    ecfg = ExpertConfig(pretrained="none", img_size=32, proj_dim=16, loss=LossWeights(ce=1.0, kl=0.0, nce=0.0))
    assert leaves_parameters_unused(ecfg)
    with pytest.raises(RuntimeError, match="finished reduction"):
        _one_step_grads(ecfg, steps=2, ddp_unused=False, root=tmp_path)
    unused = _one_step_grads(ecfg, steps=2, ddp_unused=True, root=tmp_path)
    assert unused and all(n.startswith("proj.") for n in unused)
