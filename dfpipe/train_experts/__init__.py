"""Stage 4: train one expert (loop, EMA teacher, AMP, checkpoints).

``run`` (the stage, :func:`dfpipe.train_experts.loop.run`) is imported on first use: it needs torch.
"""


def __getattr__(name: str):
    if name == "run":
        from .loop import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
