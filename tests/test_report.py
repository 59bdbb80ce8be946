"""`dfpipe report`: the DAG's results in one table of at most 100 columns, read from the catalog's reports."""

import json
from pathlib import Path

import pytest

from conftest import layout_in

from dfpipe.cli import main
from dfpipe.errors import InputError
from dfpipe.report import WIDTH, pictures, render, rows


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _metrics(auc, tpr, neg=30, pos=40):
    return {"auc": auc, "tpr_at_fpr_1e-2": tpr, "n_neg": neg, "n_pos": pos}


def test_report_reads_every_result_into_one_narrow_table(tmp_path, capsys):
    lay = layout_in(tmp_path)
    names = {"a_very_long_expert_name_that_still_fits": _metrics(0.61, 0.05), "b": _metrics(0.58, 0.0)}
    _write(Path(lay.metrics), {"val": {"ensemble": _metrics(0.72, 0.19), "experts": names},
                               "test": {"ensemble": _metrics(0.65, 0.025, 40, 40), "experts": names}})
    _write(Path(lay.eval_metrics), {"test": {"clean": {"auc": 0.649, "auc_ci_low": 0.522, "auc_ci_high": 0.773,
                                                       "tpr_at_fpr_1e-2": 0.025, "n_real": 40, "n_fake": 40},
                                             "jpeg50": {"auc": 0.619, "tpr_at_fpr_1e-2": 0.0}},
                                    "mean": {"clean": {"auc": 0.649}}})
    Path(lay.roc_png).write_bytes(b"png")
    for expert in ("b", "a"):  # each expert's training curves, by name; not the logs' folder
        curves = Path(lay.train_logs) / expert / "plots" / "metrics" / "curves.png"
        curves.parent.mkdir(parents=True)
        curves.write_bytes(b"png")
    table = rows(lay)
    assert [r[:2] for r in table][:3] == [["ensemble", "val (selection-biased)"],
                                          ["  a_very_long_expert_name_that_still_fits", "val (selection-biased)"],
                                          ["  b", "val (selection-biased)"]]
    assert ["set test", "held out, clean", "0.649 [0.52, 0.77]", "0.025", "40/40"] in table
    assert ["set test", "held out, jpeg50", "0.619", "0.000", ""] in table
    assert not any(r[0].startswith("set mean") for r in table)  # the mean row of stage 6 is no set
    text = render(lay)
    assert max(len(line) for line in text.splitlines()) <= WIDTH and f"pictures: {lay.roc_png}" in text
    assert pictures(lay) == [lay.roc_png, *(str(Path(lay.train_logs) / e / "plots" / "metrics" / "curves.png")
                                           for e in ("a", "b"))]
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"paths": {"metrics": lay.metrics, "eval_metrics": lay.eval_metrics,
                                            "roc_png": lay.roc_png}}))
    assert main(["report", "--params", str(params)]) == 0
    assert "0.649 [0.52, 0.77]" in capsys.readouterr().out


def test_report_without_results_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(InputError, match="no results yet.*run the DAG"):
        render(layout_in(tmp_path))
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"paths": {"metrics": str(tmp_path / "m.json"),
                                            "eval_metrics": str(tmp_path / "e.json")}}))
    assert main(["report", "--params", str(params)]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("dfpipe: error: no results yet")
