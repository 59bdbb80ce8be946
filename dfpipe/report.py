"""``dfpipe report``: the DAG's results in one short table (under 100 columns), read from the catalog's reports.

Rows: the ensemble and each expert on the val fold (selection-biased: epochs and thresholds were chosen there), the
test set when its labels exist, and every stage-6 set (held out: no training or selection step saw it) clean and
under each degradation's mean. Columns: AUC with its 95% interval where stage 6 computed one, TPR at FPR 1e-2, and
the number of real / fake images behind them. Then where the pictures are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError
from .layout import Layout

WIDTH = 100


def _read(path: str | Path) -> dict[str, Any] | None:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{p}: not a JSON report ({exc}); rerun the stage that writes it (dvc repro)") from None


def _num(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(float(x), fmt)


def _row(what: str, kind: str, m: dict[str, Any], n: str = "") -> list[str]:
    auc = _num(m.get("auc"))
    if "auc_ci_low" in m:
        auc += f" [{_num(m['auc_ci_low'], '.2f')}, {_num(m['auc_ci_high'], '.2f')}]"
    return [what, kind, auc, _num(m.get("tpr_at_fpr_1e-2")), n]


def _counts(m: dict[str, Any]) -> str:
    real, fake = m.get("n_real", m.get("n_neg")), m.get("n_fake", m.get("n_pos"))
    return f"{real}/{fake}" if real is not None and fake is not None else ""


def rows(layout: Layout) -> list[list[str]]:
    """[what, kind, AUC [CI], TPR@1e-2, real/fake] for every result the reports hold."""
    out: list[list[str]] = []
    stage5 = _read(layout.metrics)
    if stage5 is not None:
        for split, kind in (("val", "val (selection-biased)"), ("test", "test (held out)")):
            block = stage5.get(split)
            if not block:
                continue
            out.append(_row("ensemble", kind, block["ensemble"], _counts(block["ensemble"])))
            for name, m in sorted(block.get("experts", {}).items()):
                out.append(_row(f"  {name}", kind, m))
    stage6 = _read(layout.eval_metrics) or {}
    for name, per in stage6.items():
        if name == "mean" or "clean" not in per:
            continue
        out.append(_row(f"set {name}", "held out, clean", per["clean"], _counts(per["clean"])))
        for deg, m in per.items():
            if deg != "clean":
                out.append(_row(f"set {name}", f"held out, {deg}", m))
    return out


def pictures(layout: Layout) -> list[str]:
    """The pictures the DAG drew that are on disk: the ROC, stage 3's two, stage 2's contact sheet and each
    expert's training curves (else the training logs' folder, whose .tsv plots need ``dvc plots show``)."""
    from .train_experts.curves import CURVES_PNG

    names = [layout.roc_png, layout.cluster_plot, layout.cluster_examples,
             str(Path(layout.augmented) / "contact_sheet.png")]
    curves = sorted(str(p) for p in Path(layout.train_logs).glob(f"*/{CURVES_PNG.as_posix()}"))
    if not curves and Path(layout.train_logs).exists():  # logs from before the curves were drawn
        curves = [layout.train_logs]
    return [p for p in names if Path(p).exists()] + curves


def render(layout: Layout) -> str:
    """The table and the pictures' paths, every line at most :data:`WIDTH` characters."""
    table = rows(layout)
    if not table:
        raise InputError(f"no results yet: {layout.metrics} and {layout.eval_metrics} are missing; run the DAG "
                         "first (make repro, or dvc repro)")
    head = ["", "scored on", "AUC [95% CI]", "TPR@1e-2", "real/fake"]
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [line(head), line(["-" * w for w in widths]), *map(line, table)]
    pics = pictures(layout)
    if pics:
        out += ["", "pictures: " + pics[0], *("          " + p for p in pics[1:])]
    return "\n".join(s.rstrip()[:WIDTH] for s in out) + "\n"
