"""The data catalog: every file and folder of the DAG named once (kedro's ``catalog.yml`` is the model).

``params.yaml``'s ``paths:`` section is read into a :class:`Layout`; every stage runs as ``run(cfg, layout)`` and
asks the layout for its inputs and outputs, ``dvc.yaml`` reads the same names through ``${paths.*}``, and the CLI
and API take their defaults from ``Layout()``. No stage section repeats a path.

Each entry says which stage writes it (``stage`` in the field's metadata; inputs have none), so a client such as
the benchmark moves whole stages into a folder of its own with :meth:`Layout.under` without knowing their paths:
an output added here is moved with its stage, with no edit in the client.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .config import from_dict, read_params

INPUT = ""  # the stage of an input entry: nothing in the DAG writes it


def _entry(default: str, stage: str = INPUT) -> str:
    return field(default=default, metadata={"stage": stage})


STAGES = ("prepare_data", "augment_sd", "cluster_split", "train_experts", "ensemble_predict", "evaluate")


@dataclass(frozen=True)
class Layout:
    """Paths relative to the working directory (the repo root under DVC) or absolute.

    The input data is ``data_root``; the six names after it are relative to it (the competition's layout).
    """

    # ---- inputs
    data_root: str = _entry("data/raw")  # the one setting that points every stage at other data
    train_dir: str = _entry("trainset")  # inside data_root
    train_labels: str = _entry("trainset_label.txt")  # img_name,target (1 = fake)
    val_dir: str = _entry("valset")
    val_labels: str = _entry("valset_label.txt")
    test_dir: str = _entry("testset")  # no labels needed: every image file in it is a test image
    test_labels: str = _entry("testset_label_private.txt")  # a test set's labels once released; missing = none
    # ---- stage 1
    prepared: str = _entry("data/prepared", "prepare_data")  # the image store and its manifest
    prepare_report: str = _entry("data/prepare_report.json", "prepare_data")
    duplicates: str = _entry("data/duplicates.csv", "prepare_data")
    # ---- stage 2
    augmented: str = _entry("data/augmented", "augment_sd")  # generated images: a store like stage 1's
    # ---- stage 3
    splits: str = _entry("data/splits.csv", "cluster_split")
    features: str = _entry("data/features.npy", "cluster_split")  # (N, D) float16
    features_index: str = _entry("data/features_index.csv", "cluster_split")  # row -> uid, img_name, label, origin
    cluster_report: str = _entry("data/cluster_report.json", "cluster_split")
    cluster_plot: str = _entry("data/cluster_report.png", "cluster_split")
    cluster_examples: str = _entry("data/cluster_examples.png", "cluster_split")
    # ---- stage 4
    models: str = _entry("models", "train_experts")  # <models>/<expert>/best.pt, last.pt
    train_logs: str = _entry("reports/train", "train_experts")  # <train_logs>/<expert>/: DVCLive metrics, plots
    # ---- stage 5
    submission: str = _entry("submissions/prediction.txt", "ensemble_predict")
    card: str = _entry("submissions/ensemble.json", "ensemble_predict")  # what the CLI / API load
    metrics: str = _entry("reports/metrics.json", "ensemble_predict")
    roc: str = _entry("reports/roc.csv", "ensemble_predict")
    roc_png: str = _entry("reports/roc.png", "ensemble_predict")
    failures: str = _entry("reports/test_failures.csv", "ensemble_predict")
    # ---- stage 6
    eval_metrics: str = _entry("reports/eval/metrics.json", "evaluate")
    eval_table: str = _entry("reports/eval/table.md", "evaluate")
    eval_roc: str = _entry("reports/eval/roc", "evaluate")  # roc_<set>.csv per set
    eval_scores: str = _entry("reports/eval/scores.csv", "evaluate")

    @classmethod
    def load(cls, params_path: str | Path = "params.yaml") -> Layout:
        """The ``paths`` section of ``params_path`` (unknown names rejected, missing ones at their default)."""
        return from_dict(cls, read_params(params_path).get("paths") or {}, f"{params_path}:paths")

    @classmethod
    def entries(cls, stage: str | None = None) -> list[str]:
        """The names of the entries ``stage`` writes (``""``: the inputs; None: all)."""
        if stage is not None and stage != INPUT and stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {list(STAGES)}")
        return [f.name for f in dataclasses.fields(cls) if stage is None or f.metadata["stage"] == stage]

    def under(self, root: str | Path, stages: tuple[str, ...] | list[str] = STAGES, **inputs: str) -> Layout:
        """This layout with the outputs of ``stages`` moved under ``root`` (their relative paths kept, an absolute
        one taken from its anchor), and input entries replaced by ``inputs`` (e.g. ``data_root=...``)."""
        unknown = sorted(set(inputs) - set(self.entries(INPUT)))
        if unknown:
            raise ValueError(f"not input entries: {unknown}")
        moved = {}
        for stage in stages:
            for name in self.entries(stage):
                p = Path(getattr(self, name))
                moved[name] = str(Path(root) / p.relative_to(p.anchor) if p.is_absolute() else Path(root) / p)
        return dataclasses.replace(self, **moved, **inputs)

    def outputs(self) -> list[str]:
        """Every path the DAG writes, in stage order."""
        return [getattr(self, name) for stage in STAGES for name in self.entries(stage)]

    def data(self, name: str) -> str:
        """An input entry inside ``data_root`` as a path (``""`` stays ``""``: not given)."""
        value = getattr(self, name)
        return str(Path(self.data_root) / value) if value else ""


if __name__ == "__main__":  # python -m dfpipe.layout [params.yaml]: the outputs of the catalog, one per line
    import sys

    print("\n".join(Layout.load(*sys.argv[1:2]).outputs()))
