"""Stage 4: train one expert (``--expert NAME``) or all experts of params train.experts.

One process with ``python``; DDP over GPUs or nodes with the same arguments under a launcher, e.g.
``accelerate launch --multi_gpu --num_processes 8 04_train_experts.py --expert NAME`` or
``torchrun --nproc-per-node 8 04_train_experts.py --expert NAME`` (batch_size is the global batch).
"""

from dfpipe import stage
from dfpipe.config import TrainConfig, load_section


def main(args) -> None:
    from dfpipe.train.loop import run_train

    cfg = load_section(TrainConfig, "train", args.params)
    names = [args.expert] if args.expert else list(cfg.experts)
    for name in names:
        run_train(cfg, name, args.history.format(name=name), args.metrics.format(name=name))


if __name__ == "__main__":
    p = stage.parser(__doc__)
    p.add_argument("--expert", help="name of the expert to train (default: all)")
    p.add_argument("--history", default="reports/train/{name}.csv", help="per-epoch CSV for dvc plots")
    p.add_argument("--metrics", default="reports/train/{name}.json", help="best-epoch metrics JSON")
    stage.run(main, p.parse_args())
