"""Stage 3: embeddings, k-means, cluster-held-out folds.

``run`` (the stage, :func:`dfpipe.cluster_split.pipeline.run`) is imported on first use: it needs torch, which
:mod:`.kmeans` and :mod:`.cluster` alone do not.
"""


def __getattr__(name: str):
    if name == "run":
        from .pipeline import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
