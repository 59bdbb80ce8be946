"""Build the detector shipped in the repo (issue 23 item 5): one recipe trained on the training parts of all the
dev sources at once, then packaged into ``dfpipe/assets/detector/`` with its ensemble card and a model card.

    bench/build_detector.py --grid bench/detector.yaml --work data/detector --loso reports/benchmark/loso_quick

The grid file names the sources, the training cap, stage 2's settings and exactly one recipe (a grid of the
benchmark's own format; ``train_on`` and ``leave_one_out`` are not used: the set holds every source). The
training runs as one benchmark cell (stages 1-5 in ``--work``, the sources' held-out parts scored by stage 6), so
the card's in-source numbers come from images no training or selection step saw. The leave-one-source-out
numbers quoted in the model card are read from ``--loso``'s ``grid.json`` (the same recipe name), never typed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

from dfpipe import harness  # its import sets the offline env vars (dfpipe.OFFLINE_ENV)

log = logging.getLogger("build_detector")

MAX_MB = 30.0  # the bound on what the repo carries


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="bench/detector.yaml")
    p.add_argument("--work", default="data/detector", help="the cell's work folder (reused: resume)")
    p.add_argument("--loso", default="reports/benchmark/loso_quick", help="folder of the LOSO grid.json to quote")
    p.add_argument("--out", default="dfpipe/assets/detector")
    p.add_argument("--report", default="reports/detector/metrics.json",
                   help="the held-out numbers of the build (stage 6 of its cell), for the docs' generated numbers")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def loso_rows(grid_json: Path, recipe: str, baseline: str) -> list[dict]:
    """Per held-out source: the recipe's and the baseline's AUC and TPR@1e-2 (mean over seeds, seeds listed)."""
    if not grid_json.is_file():
        return []
    from dfbench import held_out_means  # the table's own leave-one-source-out columns

    grid = json.loads(grid_json.read_text())
    rows = []
    for held in grid["spec"]["sources"]:
        row = {"held_out": held}
        for name in (recipe, baseline):  # None, not nan: a dash in the card and valid JSON in the report
            row[name] = {k: None if np.isnan(v) else v for k, v in held_out_means(grid["cells"], name, held).items()}
        rows.append(row)
    return rows


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def model_card(recipe: str, ecfg: dict, result: dict, card: dict, counts: dict[str, dict[str, int]],
               loso: list[dict], baseline: str, grid_path: str, loso_dir: str) -> str:
    """The model card (markdown): what it is, training data and licences, numbers, intended use, known failures."""
    ev = result["eval"]
    lines = [
        "# The shipped detector",
        "",
        f"`dfpipe predict`, `scan`, `serve` and the web page use this detector when no `--card` is named. It is "
        f"built by `bench/build_detector.py --grid {grid_path}` (recipe `{recipe}`, seed {result['seed']}, "
        f"code {result.get('code', 'unknown')}); a card made by the DAG (`submissions/ensemble.json`) is used when "
        "named.",
        "",
        "## Model",
        "",
        f"One expert, `{recipe}`: " + ", ".join(f"{k} {ecfg[k]}" for k in ("arch", "backbone", "img_size", "input_mode",
                                                                         "augment", "epochs") if k in ecfg)
        + f"; test-time views {card['tta']}, combine {card['combine']}. Verdict thresholds (chosen on stage 3's val "
        f"fold, FPR / FNR <= {card['thresholds'].get('max_fpr')}): likely fake at score >= "
        f"{card['thresholds']['t_fake']:.3f}, likely real below {card['thresholds']['t_real']:.3f}.",
        "",
        "## Training data (research use only)",
        "",
        "The training parts of the five development sources of `../shared/data` (their README gives provenance "
        "and each source's confounds), at most a capped, class-balanced share of each:",
        "",
        "| source | real | fake | licence of the source data |",
        "|---|---|---|---|",
    ]
    licences = {
        "yonsei_faces": "no licence stated; research and testing only",
        "stylegan3_utk": "StyleGAN3 (NVIDIA, non-commercial); UTKFace (non-commercial research)",
        "genphotos_frll": "fakes: no licence stated; reals: CC BY 4.0 (DeBruine & Jones 2017)",
        "dfdc_faces": "DFDC terms (non-commercial research)",
        "sd14_coco": "DiffusionDB (CC0); COCO (Flickr licences); ImageNet (non-commercial research)",
    }
    for src, n in counts.items():
        lines.append(f"| {src} | {n.get('real', 0)} | {n.get('fake', 0)} | {licences.get(src, 'see its README')} |")
    lines += ["", "Because of these licences the weights are for research and evaluation, not for commercial use.",
              "", "## How well it does", "",
              "On each source's held-out part (images no training or selection step saw; stage 6 of the build):", "",
              "| held-out part | images | ROC AUC [95% CI] | TPR at FPR 1e-2 |", "|---|---|---|---|"]
    for name, m in ev.items():
        if name == "mean" or "clean" not in m:
            continue
        c = m["clean"]
        ci = [c.get("auc_ci_low"), c.get("auc_ci_high")]
        lines.append(f"| {name} | {c.get('n_real', 0) + c.get('n_fake', 0)} | {_fmt(c['auc'])} [{_fmt(ci[0])}, {_fmt(ci[1])}] | "
                     f"{_fmt(c.get('tpr_at_fpr_1e-2'))} |")
    beside = "" if recipe == baseline else ", beside the seed-style baseline trained the same way"
    lines += ["", "These sources were seen in training (other images of them), so this is the optimistic number. The "
              "honest one is leave-one-source-out: the same recipe trained on four sources and scored on the fifth "
              f"(`{loso_dir}`: its grid file gives the training cap and image size; mean over seeds){beside}:", ""]
    if loso and recipe == baseline:  # the shipped recipe is the baseline itself: one set of columns
        lines += [f"| held out | {recipe} AUC | {recipe} TPR@1e-2 | seeds |", "|---|---|---|---|"]
        lines += [f"| {r['held_out']} | {_fmt(r[recipe]['auc'])} | {_fmt(r[recipe]['tpr_at_fpr_1e-2'])} | "
                  f"{r[recipe]['seeds']} |" for r in loso]
    elif loso:
        lines += [f"| held out | {recipe} AUC | {recipe} TPR@1e-2 | {baseline} AUC | seeds |", "|---|---|---|---|---|"]
        for r in loso:
            a, b = r.get(recipe, {}), r.get(baseline, {})
            lines.append(f"| {r['held_out']} | {_fmt(a.get('auc'))} | {_fmt(a.get('tpr_at_fpr_1e-2'))} | "
                         f"{_fmt(b.get('auc'))} | {a.get('seeds', 0)} |")
    else:
        lines.append("(no leave-one-source-out grid found)")
    lines += ["", "## Intended use", "",
              "Screening face images and photos for AI generation or face manipulation in research and evaluation, "
              "as one signal among others, with a person reviewing what it flags. Not for decisions about people.",
              "", "## Known failures", "",
              "- Generators and edits unlike the five sources: leave-one-source-out AUC above is what to expect, and "
              "on some held-out sources it is near chance.",
              "- Compression and resizing: the sources' classes differ in JPEG history (their README); a detector can "
              "learn that instead of forgery traces, and re-compressed uploads move scores.",
              "- Content: `sd14_coco` fakes are mostly illustrations and its reals photos, so some of that column is "
              "content, not traces.",
              "- Scores near the thresholds are uncertain; the verdicts' error rates were set on a small val fold.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    harness.run(build, parse_args(list(sys.argv[1:] if argv is None else argv)))


def build(args: argparse.Namespace) -> None:
    import dataclasses

    from dfbench import TrainingSet, load_grid, load_sources, recipe_config, run_cell
    from dfbench.cells import cell_dir, cell_layout
    from dfpipe.errors import ConfigError

    spec = load_grid(args.grid)
    if len(spec.recipes) != 1 or len(spec.seeds) != 1:
        raise ConfigError(f"{args.grid}: a detector grid names exactly one recipe and one seed")
    recipe, seed = next(iter(spec.recipes)), spec.seeds[0]
    spec = dataclasses.replace(spec, train_on=[], leave_one_out=False, in_source_eval=True)
    sources = load_sources(spec)
    ts = TrainingSet("+".join(spec.sources), tuple(sources[s] for s in spec.sources))
    result = run_cell(spec, recipe, seed, ts, sources, Path(args.work))
    cell = cell_dir(spec, recipe, seed, ts.name, args.work)
    layout = cell_layout(spec, ts.name, args.work, cell)
    card = json.loads(Path(layout.card).read_text())
    counts = {p.name: {"real": int((p.train.label == 0).sum()), "fake": int((p.train.label == 1).sum())}
              for p in ts.parts}
    loso = loso_rows(Path(args.loso) / "grid.json", recipe, spec.baseline)
    ecfg = dataclasses.asdict(recipe_config(spec, recipe, seed))
    text = model_card(recipe, ecfg, result, card, counts, loso, spec.baseline, args.grid, args.loso)
    package(Path(layout.card), Path(layout.models), Path(args.out), text)
    from dfpipe.io import write_json

    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.report, {"recipe": recipe, "seed": seed, "code": result.get("code"), "train": counts,
                             "held_out": {k: v["clean"] for k, v in result["eval"].items() if "clean" in v},
                             "loso": loso})


def package(card_path: Path, models_dir: Path, out: Path, model_card_md: str) -> float:
    """Copy the card's experts (sha256 checked against the card) and the card into ``out`` with ``MODEL_CARD.md``;
    ``out`` is replaced whole, only once everything is in place. Returns its size in MB (at most :data:`MAX_MB`)."""
    from dfpipe.errors import ConfigError

    card = json.loads(card_path.read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for e in card["experts"]:
        src, dst = models_dir / e["checkpoint"], tmp / e["checkpoint"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        if hashlib.sha256(dst.read_bytes()).hexdigest() != e["sha256"]:
            shutil.rmtree(tmp)
            raise ConfigError(f"{src}: checkpoint does not match its card's sha256")
    shutil.copyfile(card_path, tmp / "ensemble.json")
    (tmp / "MODEL_CARD.md").write_text(model_card_md, encoding="utf-8")
    size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**20
    if size > MAX_MB:
        shutil.rmtree(tmp)
        raise ConfigError(f"{out}: {size:.1f} MB, over the {MAX_MB:.0f} MB the repo may carry")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("shipped detector: %s (%.1f MB): %s", out, size,
             ", ".join(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())))
    return size

if __name__ == "__main__":
    main()
