"""The data catalog (dfpipe.layout): params.yaml's ``paths:``, dvc.yaml and the stages agree on every artifact."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from dfpipe.config import STAGE_CONFIGS
from dfpipe.layout import INPUT, STAGES, Layout

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def _stage_of(entry: str) -> str:
    return next(f.metadata["stage"] for f in dataclasses.fields(Layout) if f.name == entry)


def test_the_repo_catalog_is_the_layout_defaults_and_names_every_path_once():
    assert Layout.load(PARAMS) == Layout()
    text = PARAMS.read_text()
    assert text.count("data/prepared") == 1  # the check
    for entry in Layout.entries():  # every catalog path (a word such as "models" aside) is written once in the file
        value = getattr(Layout(), entry)
        if "/" not in value and "." not in value:
            continue
        assert len(re.findall(rf"(?<![\w/.]){re.escape(value)}(?![\w/.])", text)) == 1, entry
    params = yaml.safe_load(text)
    assert set(params) == {"paths", *STAGE_CONFIGS}


def test_stages_are_named_once_each():
    """Script 0N_<name>.py, params section <name>, package dfpipe.<name>, DVC stage <name>: one name."""
    import importlib

    scripts = sorted(p.stem for p in REPO.glob("0[1-9]_*.py"))
    assert [s[3:] for s in scripts] == list(STAGES) == list(STAGE_CONFIGS)
    dvc_stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc_stages) == list(STAGES)
    for name in STAGES:
        assert callable(importlib.import_module(f"dfpipe.{name}").run)
        assert f'harness.stage("{name}"' in (REPO / f"{scripts[STAGES.index(name)]}.py").read_text()


def test_dvc_yaml_declares_each_catalog_output_in_the_stage_that_writes_it():
    """Every ``${paths.X}`` in a stage's outs / metrics / plots is an output of that stage in the catalog, and every
    output of the catalog is declared by its stage: a path the code writes is never hidden from DVC."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared: dict[str, set[str]] = {}
    for name, st in stages.items():
        body = st.get("do", st)
        text = yaml.safe_dump({k: body.get(k) for k in ("outs", "metrics", "plots")})
        declared[name] = set(re.findall(r"\$\{paths\.(\w+)\}", text))
        for entry in declared[name]:
            assert _stage_of(entry) == name, f"dvc.yaml stage {name} declares {entry}, which {_stage_of(entry)} writes"
        deps = yaml.safe_dump(body.get("deps"))
        for entry in re.findall(r"\$\{paths\.(\w+)\}", deps):  # inputs, or what an earlier stage writes
            assert _stage_of(entry) == INPUT or STAGES.index(_stage_of(entry)) < STAGES.index(name), (name, entry)
    for stage in STAGES:
        assert set(Layout.entries(stage)) == declared[stage], stage


def test_under_moves_the_chosen_stages_and_replaces_inputs(tmp_path):
    lay = Layout(prepared="/abs/store").under(tmp_path / "cell", ("prepare_data", "train_experts"), data_root="/d")
    assert lay.prepared == str(tmp_path / "cell" / "abs" / "store")  # an absolute output stays inside the folder
    assert lay.models == str(tmp_path / "cell" / "models") and lay.splits == Layout().splits  # stage 3 not moved
    assert lay.data_root == "/d" and lay.train_dir == Layout().train_dir
    assert lay.data("train_labels") == str(Path("/d") / "trainset_label.txt")
    assert dataclasses.replace(lay, test_labels="").data("test_labels") == ""
    with pytest.raises(ValueError, match="not input entries"):
        Layout().under(tmp_path, prepared="x")
    with pytest.raises(ValueError, match="unknown stage"):
        Layout.entries("train")


def test_expert_presets_show_only_what_differs_and_dvc_sees_the_whole_expert():
    """lite0_b names lite0_a with a YAML merge key and overrides two settings: the file shows the difference, the
    loaded expert (as the stage and DVC's params dependency read it) has every setting, so a change to lite0_a
    reruns lite0_b too."""
    from dfpipe.config import TrainConfig, load_section

    text = PARAMS.read_text()
    block = text[text.index("    lite0_b:"):text.index("\nensemble_predict:")]
    assert "<<: *lite0_a" in block and len([ln for ln in block.splitlines() if ln.strip()]) <= 6
    experts = load_section(TrainConfig, "train_experts", PARAMS).experts
    a, b = dataclasses.asdict(experts["lite0_a"]), dataclasses.asdict(experts["lite0_b"])
    assert {k for k in a if a[k] != b[k]} == {"img_size", "seed"}
    raw = yaml.safe_load(text)["train_experts"]["experts"]
    assert set(raw["lite0_b"]) == set(raw["lite0_a"])  # merged: every key spelled out for DVC's params check


def test_outputs_lists_every_written_path_once_in_stage_order():
    """``python -m dfpipe.layout`` (make clean-outputs) removes what the DAG writes and nothing else: never an
    input, never the committed benchmark reports beside reports/eval."""
    import subprocess
    import sys

    outs = Layout().outputs()
    assert len(outs) == len(set(outs)) == len(Layout.entries()) - len(Layout.entries(INPUT))
    assert outs[0] == Layout().prepared and outs[-1] == Layout().eval_scores
    assert not set(outs) & {getattr(Layout(), n) for n in Layout.entries(INPUT)}
    assert not any(o in ("reports", "reports/bench", "reports/benchmark", "data") for o in outs)
    printed = subprocess.run([sys.executable, "-m", "dfpipe.layout", str(PARAMS)], capture_output=True, text=True,
                             check=True, cwd=REPO).stdout.split()
    assert printed == outs
