"""Stage 4: train one expert (``--expert NAME``) or all experts of params train.experts.

One process with ``python``; DDP over GPUs or nodes with the same arguments under a launcher, e.g.
``accelerate launch --multi_gpu --num_processes 8 04_train_experts.py --expert NAME`` or
``torchrun --nproc-per-node 8 04_train_experts.py --expert NAME``. batch_size is per process: the global
batch is batch_size x N, and lr is rescaled to it from lr_ref_batch (README, "Training on several GPUs").
"""

from dfpipe import harness
from dfpipe.config import TrainConfig, load_section


def main(args) -> None:
    from dfpipe.train_experts.loop import run_train

    cfg = load_section(TrainConfig, "train", args.params)
    names = [args.expert] if args.expert else list(cfg.experts)
    for name in names:
        history = args.history.format(name=name) if args.history else None
        run_train(cfg, name, args.live_dir.format(name=name), history)


if __name__ == "__main__":
    p = harness.parser(__doc__)
    p.add_argument("--expert", help="name of the expert to train (default: all)")
    p.add_argument("--live-dir", default="reports/train/{name}",
                   help="DVCLive directory: plots/metrics/*.tsv per epoch (dvc plots), metrics.json of the "
                        "best epoch (dvc metrics)")
    p.add_argument("--history", default="", help="also write the per-epoch history to this CSV (default: no)")
    harness.run(main, p.parse_args())
