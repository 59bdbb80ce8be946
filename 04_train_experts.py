"""Stage 4: train one expert (``--expert NAME``) or all experts of params train_experts.experts.

One process with ``python``; DDP over GPUs or nodes with the same arguments under a launcher, e.g.
``accelerate launch --multi_gpu --num_processes 8 04_train_experts.py --expert NAME`` or
``torchrun --nproc-per-node 8 04_train_experts.py --expert NAME``. batch_size is per process: the global
batch is batch_size x N, and lr is rescaled to it from lr_ref_batch (docs/training_at_scale.md).
"""

import argparse

from dfpipe import harness


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert", help="name of the expert to train (default: all of train_experts.experts)")
    p.add_argument("--history", default="", help="also write the per-epoch history to this CSV; {name} is the "
                                                 "expert's name (default: no CSV; DVCLive logs go to paths.train_logs)")


if __name__ == "__main__":
    harness.stage("train_experts", __doc__, options)
