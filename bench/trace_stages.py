"""Trace how each stage's config travels through the package: calls, files, returns to a file.

The issue's measure for the config refactor: "each stage's config, followed call by call from its ``run``,
visits fewer files and returns to them less often". This tool runs stage scripts of a checkout, each in its
own subprocess under a profiler (``sys.setprofile``, main thread only), and records every Python call into
``<repo>/dfpipe/`` that receives the stage's config or a ``Layout`` (the path catalog of the new code) as an
argument, or an argument that holds one (a list / tuple / set / dict of <= 64 items, or an object attribute,
one level deep: a method of an object keeping ``self.cfg`` counts).

"The config" is the first object seen whose class is named like a stage config (PrepareConfig,
AugmentConfig, SplitConfig, TrainConfig, PredictConfig, EvaluateConfig); later calls must receive that
very object. Calls receiving another object of such a class (a ``dataclasses.replace`` copy...) are counted
apart (``other_config_calls``). Any object of a class named ``Layout`` counts as the layout.

Two wider views also follow the *values* read from them (``config_or_values``,
``config_layout_or_values``): a call counts when an argument is one of the config's (or the first Layout's)
field values or an item of a list / tuple / dict field, by identity, e.g. ``load(cfg.models_dir)``. Values
CPython shares between unrelated uses (None, bools, small ints, strings of <= 1 character) cannot be told
apart by identity and are left out, and a derived value (``Path(cfg.out_dir) / "x"``) is a new object: these
views are a lower bound of "calls that use the config", closer to following it by hand than ``config``.

For each stage and each view (``config``, ``layout``, ``config_or_layout`` and the two above), from the
sequence of matching calls in call order:

* ``calls``: the calls (a generator counts once, not at every resume);
* ``files``: distinct files among them;
* ``returns``: times the sequence enters a file it had left earlier (A B A = 1; A A B = 0);
* ``functions``: distinct functions, and ``first_call_returns``: the returns of the sequence of functions at
  their first call only (loops over batches do not inflate it: closer to reading the code by hand).

``from_entry`` repeats the counts from the stage's ``run`` (the issue's "followed call by call from its run";
:func:`stage_entry`): the harness's temp-file cleanup before ``run`` is left out there. The JSON keeps, from the
entry, the collapsed file sequence (``[file, consecutive calls]``) and the functions in first-call order, so a
reader can check the counts.

Only the stage's main process and main thread are traced: forked workers (DataLoader, pools) stop tracing
at fork, spawned ones never start it; threads are not traced.

Before (the commit before the refactor, f7369bc; old section names; inputs of every stage present)::

    PYTHONPATH=$PWD python bench/trace_stages.py --repo /work/base --params /work/base/params.yaml \\
        --set 'train.experts.*.epochs=1' --set evaluate.bootstrap=0 --set 'evaluate.degradations=[]' \\
        --expert lite0_a --out reports/bench/trace_stages_before.json

After (new section names and a ``paths:`` section; same shortening)::

    PYTHONPATH=$PWD python bench/trace_stages.py --repo /path/to/after/checkout \\
        --set 'train_experts.experts.*.epochs=1' --set evaluate.bootstrap=0 \\
        --set 'evaluate.degradations=[]' --expert lite0_a --out reports/bench/trace_stages_after.json

``--params FILE`` (default ``<repo>/params.yaml``) is passed to every stage script as ``--params``; each
``--set key=value`` (dotted key, ``*`` = every key at that level, value read as YAML; the key must exist)
is applied to a temporary copy first. ``--expert NAME`` is passed to the 04 script;
``--stage-arg 4='--live-dir x'`` passes more arguments to one stage. Stage outputs are written into the
traced checkout, as ``dvc repro`` would: point ``--repo`` at a scratch clone.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfpipe import harness  # noqa: E402
from dfpipe.errors import ConfigError, DataError, InputError, did_you_mean  # noqa: E402
from dfpipe.io import write_json  # noqa: E402

log = logging.getLogger(__name__)

CONFIG_CLASSES = ("PrepareConfig", "AugmentConfig", "SplitConfig", "TrainConfig", "PredictConfig",
                  "EvaluateConfig")
LAYOUT_CLASS = "Layout"
CONFIG, LAYOUT, OTHER_CONFIG, CONFIG_VALUE, LAYOUT_VALUE = 1, 2, 4, 8, 16  # bits of a recorded call
VIEWS = {"config": CONFIG, "layout": LAYOUT, "config_or_layout": CONFIG | LAYOUT,
         "config_or_values": CONFIG | CONFIG_VALUE,
         "config_layout_or_values": CONFIG | LAYOUT | CONFIG_VALUE | LAYOUT_VALUE}
MAX_SEQUENCE = 5000  # collapsed runs kept per view in the JSON (the counts always use all of them)

# Runs inside the stage's subprocess: python -c TRACER SPEC_JSON. Kept import-light and defensive: it must
# never change what the stage does, only watch it.
TRACER = r'''
import dis, json, os, runpy, sys, time, traceback, types

spec = json.loads(sys.argv[1])
repo, script = spec["repo"], spec["script"]
pkg = os.path.join(repo, "dfpipe") + os.sep
CFG = frozenset(spec["config_classes"])
LAYOUT = spec["layout_class"]
GEN = 0x20 | 0x80 | 0x200  # CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR
SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, str, bytes)
state = {"cfg": None, "cfg_class": None, "layout": None, "dfpipe_calls": 0}
codes, code_idx, calls, starts = [], {}, [], {}
values = {}  # id -> bit of the config's / layout's field values (alive as long as state holds their owner)

def shared(x):  # objects CPython shares between unrelated uses: identity says nothing about them
    return x is None or type(x) is bool or (type(x) is int and -5 <= x <= 256) or \
        (type(x) in (str, bytes, tuple, frozenset) and len(x) <= 1)

def register(obj, bit):  # field values of obj and the items of list / tuple / dict fields, one level
    fields = getattr(obj, "__dataclass_fields__", None)
    d = {k: getattr(obj, k, None) for k in fields} if fields else dict(getattr(obj, "__dict__", {}))
    for x in d.values():
        items = list(x.values()) if type(x) is dict else list(x) if type(x) in (list, tuple) else []
        for y in [x] + items:
            if not shared(y):
                values.setdefault(id(y), bit)

def direct(v):
    name = type(v).__name__
    if name == LAYOUT:
        if state["layout"] is None:
            state["layout"] = v
            register(v, 16)
        return 2
    if name in CFG:
        if state["cfg"] is None:  # the first stage-config object seen is "the config"
            state["cfg"], state["cfg_class"] = v, type(v).__module__ + "." + name
            register(v, 8)
        return 1 if v is state["cfg"] else 4
    return values.get(id(v), 0)

def match(v):
    bits = direct(v)
    if bits or v is None or isinstance(v, SKIP):
        return bits
    t = type(v)
    if t in (list, tuple, set, frozenset):
        items = v if len(v) <= 64 else ()
    elif t is dict:
        items = v.values() if len(v) <= 64 else ()
    else:  # an object holding the config as an attribute, one level deep
        d = getattr(v, "__dict__", None)
        items = d.values() if type(d) is dict and len(d) <= 256 else ()
    for x in items:
        bits |= direct(x)
    return bits

def start_offset(code):  # f_lasti of a generator's first run (3.11+: its RESUME; older: -1)
    off = starts.get(code)
    if off is None:
        off = next((i.offset for i in dis.get_instructions(code) if i.opname == "RESUME"), -1)
        starts[code] = off
    return off

def prof(frame, event, arg):
    if event != "call":
        return
    code = frame.f_code
    if not code.co_filename.startswith(pkg):
        return
    state["dfpipe_calls"] += 1
    if code.co_flags & GEN and frame.f_lasti > start_offset(code):
        return  # a generator resumed: not a new call
    n = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 4) + bool(code.co_flags & 8)
    if not n:
        return
    try:
        loc = frame.f_locals
        bits = 0
        for name in code.co_varnames[:n]:
            bits |= match(loc.get(name))
    except Exception:  # an odd object's __dict__ raising: not worth breaking the stage for
        return
    if bits:
        i = code_idx.get(code)
        if i is None:
            i = code_idx[code] = len(codes)
            codes.append([os.path.relpath(code.co_filename, repo),
                          getattr(code, "co_qualname", code.co_name), code.co_firstlineno])
        back = frame.f_back
        calls.append([i, bits, int(back is not None and back.f_code.co_filename == script)])

os.register_at_fork(after_in_child=lambda: sys.setprofile(None))  # workers are not traced
sys.path.insert(0, repo)
sys.argv = [script] + spec["argv"]
exit_code, t0 = 0, time.perf_counter()
sys.setprofile(prof)
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
except BaseException:
    traceback.print_exc()
    exit_code = 1
finally:
    sys.setprofile(None)
    wall = time.perf_counter() - t0
    mod = sys.modules.get("dfpipe")
    out = {"exit_code": exit_code, "wall_s": round(wall, 2), "config_class": state["cfg_class"],
           "layout_seen": state["layout"] is not None, "dfpipe_calls": state["dfpipe_calls"],
           "dfpipe_imported_from": getattr(mod, "__file__", None), "codes": codes, "calls": calls}
    tmp = spec["result"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(out, fh)
    os.replace(tmp, spec["result"])
sys.exit(exit_code)
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=".", help="checkout whose stage scripts and dfpipe are traced (default: .)")
    p.add_argument("--params", help="params file passed to every stage as --params (default: <repo>/params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override in a temporary copy of --params: dotted key, * = every key, YAML value")
    p.add_argument("--stages", nargs="+", default=["all"],
                   help="stage numbers (1 04) or script stems (05_ensemble_predict), or all (default)")
    p.add_argument("--expert", default="", help="passed to the 04 script as --expert (one expert)")
    p.add_argument("--stage-arg", action="append", default=[], metavar="N=ARGS",
                   help="more arguments for stage N's script (shell-quoted), e.g. 4='--live-dir /tmp/live'")
    p.add_argument("--python", default=sys.executable, help="interpreter for the stages (default: this one)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per stage (default 3600)")
    p.add_argument("--out", required=True, help="JSON report (written atomically)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def find_scripts(repo: Path, wanted: list[str]) -> list[Path]:
    """The stage scripts ``NN_*.py`` of ``repo`` selected by number or stem, in stage order."""
    scripts = sorted(p for p in repo.glob("[0-9][0-9]_*.py"))
    if not scripts:
        raise InputError(f"{repo}: no stage scripts (NN_*.py) - is --repo a dfpipe checkout?")
    if wanted == ["all"]:
        return scripts
    chosen = []
    for w in wanted:
        hit = [s for s in scripts if w in (s.stem, s.stem[3:]) or (w.isdigit() and int(w) == int(s.stem[:2]))]
        if not hit:
            raise ConfigError(f"--stages: no stage script '{w}' in {repo}"
                              f"{did_you_mean(w, [s.stem for s in scripts])}")
        chosen += [s for s in hit if s not in chosen]
    return sorted(chosen)


def _set_key(node: Any, keys: list[str], value: Any, where: str) -> int:
    """Set the dotted ``keys`` under ``node`` (``*`` = every key); returns how many values were set."""
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: not a mapping, cannot set '{keys[0]}' in it")
    head, rest = keys[0], keys[1:]
    targets = list(node) if head == "*" else [head]
    for k in targets:
        if k not in node:
            raise ConfigError(f"{where}: no key '{k}'{did_you_mean(k, node)}")
    if not rest:
        for k in targets:
            node[k] = value
        return len(targets)
    return sum(_set_key(node[k], rest, value, f"{where}.{k}") for k in targets)


def derive_params(params: Path, sets: list[str], tmp_dir: Path) -> Path:
    """``params`` itself, or a copy in ``tmp_dir`` with the ``--set`` overrides applied."""
    if not params.is_file():
        raise InputError(f"{params}: params file not found")
    if not sets:
        return params
    data = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        if not _set_key(data, key.split("."), yaml.safe_load(raw), f"{params}: --set {key}"):
            raise ConfigError(f"{params}: --set {key}: matched no key")
    out = tmp_dir / "params.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out


def stage_args(scripts: list[Path], args: argparse.Namespace) -> dict[str, list[str]]:
    """Extra arguments per script stem: ``--expert`` for 04, then ``--stage-arg`` items."""
    extra = {s.stem: [] for s in scripts}
    for s in scripts:
        if args.expert and s.stem.startswith("04_"):
            extra[s.stem] += ["--expert", args.expert]
    for item in args.stage_arg:
        n, sep, rest = item.partition("=")
        hit = [s.stem for s in scripts if n in (s.stem, s.stem[3:]) or (n.isdigit() and int(n) == int(s.stem[:2]))]
        if not sep or not hit:
            raise ConfigError(f"--stage-arg {item!r}: expected N=ARGS with N a selected stage")
        extra[hit[0]] += shlex.split(rest)
    return extra


def summarize(files: list[str], funcs: list[int], code_files: list[str]) -> dict[str, int]:
    """calls / files / returns of a call sequence, and the same over functions at their first call."""
    first = list(dict.fromkeys(funcs))
    return {"calls": len(files), "files": len(set(files)), "returns": count_returns(files),
            "functions": len(first), "first_call_returns": count_returns([code_files[i] for i in first])}


def count_returns(files: list[str]) -> int:
    """Times the sequence enters a file it had left earlier: A B A -> 1, A A B -> 0."""
    seen: set[str] = set()
    returns = 0
    for f, _ in itertools.groupby(files):
        returns += f in seen
        seen.add(f)
    return returns


def stage_entry(calls: list, names: list[str]) -> int | None:
    """Index of the stage's entry call: the first call of a function named ``run`` (or ``run_<stage>``, the old
    code's names) that receives the config, as the issue counts "from its run"; else the first call made by the
    script itself that receives the config or layout. Since the harness (one entry point for every script) cleans
    a killed run's temp files before ``run``, that cleanup is not the stage's data flow and is left out here (the
    whole-process counts keep it)."""
    for k, (code, bits, _) in enumerate(calls):
        func = names[code].rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        if bits & CONFIG and (func == "run" or func.startswith("run_")):
            return k
    return next((k for k, (_, bits, from_script) in enumerate(calls) if from_script and bits & (CONFIG | LAYOUT)),
                None)


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    """The per-stage report from the tracer's raw calls."""
    code_files = [c[0] for c in raw["codes"]]
    names = [f"{c[0]}:{c[1]}" for c in raw["codes"]]
    calls = raw["calls"]
    entry = stage_entry(calls, names)
    res: dict[str, Any] = {k: raw[k] for k in ("exit_code", "wall_s", "config_class", "layout_seen",
                                               "dfpipe_calls", "dfpipe_imported_from")}
    res["other_config_calls"] = sum(1 for _, bits, _ in calls if bits & OTHER_CONFIG)
    res["entry"] = names[calls[entry][0]] if entry is not None else None
    res["from_entry"], res["sequence"], res["functions"] = {}, {}, {}
    for view, mask in VIEWS.items():
        everything = [i for i, bits, _ in calls if bits & mask]
        res[view] = summarize([code_files[i] for i in everything], everything, code_files)
        seq = [i for i, bits, _ in calls[entry or 0:] if bits & mask]  # the listings below start at the entry
        res["from_entry"][view] = summarize([code_files[i] for i in seq], seq, code_files)
        runs = [[f, len(list(g))] for f, g in itertools.groupby(code_files[i] for i in seq)]
        res["sequence"][view] = runs[:MAX_SEQUENCE]
        if len(runs) > MAX_SEQUENCE:
            res["sequence"][f"{view}_truncated_from"] = len(runs)
        counts: dict[str, int] = {}
        for i in seq:  # dict keeps first-call order
            counts[names[i]] = counts.get(names[i], 0) + 1
        res["functions"][view] = [[k, v] for k, v in counts.items()]
    return res


def trace_stage(repo: Path, script: Path, argv: list[str], python: str, timeout: float, tmp: Path) -> dict[str, Any]:
    """Run one stage script under the tracer in a subprocess (cwd = repo, its dfpipe first on the path)."""
    result = tmp / f"{script.stem}.trace.json"
    spec = {"repo": str(repo), "script": str(script), "argv": argv, "result": str(result),
            "config_classes": list(CONFIG_CLASSES), "layout_class": LAYOUT_CLASS}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log.info("tracing %s %s", script.name, shlex.join(argv))
    t0 = time.perf_counter()
    try:
        subprocess.run([python, "-c", TRACER, json.dumps(spec)], cwd=repo, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        log.error("%s: killed after %.0f s", script.name, timeout)
    if not result.is_file():
        raise DataError(f"{script}: the tracer wrote no result (killed or crashed before the end)")
    raw = json.loads(result.read_text(encoding="utf-8"))
    imported = raw.get("dfpipe_imported_from") or ""
    if not imported.startswith(str(repo / "dfpipe")):
        raise DataError(f"{script}: dfpipe was imported from {imported or 'nowhere'}, not from {repo}")
    res = {"script": script.name, "argv": argv, **analyse(raw), "subprocess_s": round(time.perf_counter() - t0, 1)}
    log.info("%s: exit %d, calls / files / returns: %s, %.0f s", script.name, res["exit_code"],
             "; ".join(f"{v} {res[v]['calls']} / {res[v]['files']} / {res[v]['returns']}" for v in VIEWS),
             res["subprocess_s"])
    return res


def git(repo: Path, *cmd: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True, check=False).stdout.strip()


def main(args: argparse.Namespace) -> None:
    repo = Path(args.repo).resolve()
    if not (repo / "dfpipe").is_dir():
        raise InputError(f"{repo}: no dfpipe/ package - --repo must be a dfpipe checkout")
    scripts = find_scripts(repo, args.stages)
    extra = stage_args(scripts, args)
    params = Path(args.params).resolve() if args.params else repo / "params.yaml"
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    report: dict[str, Any] = {
        "tool": "bench/trace_stages.py", "repo": str(repo), "commit": git(repo, "rev-parse", "HEAD"),
        # code changes on top of the commit would make "commit" a lie: listed (outputs are not code)
        "uncommitted_code": git(repo, "status", "--porcelain", "--", "dfpipe", "*.py").splitlines(),
        "python": args.python, "params": str(params), "overrides": args.set,
        "started_utc": started.isoformat(timespec="seconds"), "stages": {},
        "definitions": {
            "calls": "calls into <repo>/dfpipe/ receiving the object (or an argument holding it, one level deep), "
                     "main process and thread; a generator counts once",
            "files": "distinct files among those calls",
            "returns": "times the call sequence enters a file it had left earlier (A B A = 1)",
            "functions": "distinct functions among those calls",
            "first_call_returns": "returns over the functions in first-call order (loops do not count)",
            "config_or_values": "calls receiving the config or one of its field values (identity; not None, "
                                "bools, small ints, 1-character strings), or an object holding one",
            "from_entry": "the same, from the stage's run (stage_entry); sequence and functions list this part",
            "sequence": "[file, consecutive calls] runs of the call sequence",
        },
    }
    with tempfile.TemporaryDirectory(prefix="trace_stages_") as tmp_name:
        tmp = Path(tmp_name)
        stage_params = derive_params(params, args.set, tmp)
        report["params_sha256"] = hashlib.sha256(stage_params.read_bytes()).hexdigest()
        for script in scripts:
            argv = ["--params", str(stage_params), *extra[script.stem]]
            report["stages"][script.stem] = trace_stage(repo, script, argv, args.python, args.timeout, tmp)
            report["wall_s"] = round(time.perf_counter() - t0, 1)
            write_json(args.out, report)  # after every stage: a long run keeps what it measured
    failed = [k for k, v in report["stages"].items() if v["exit_code"]]
    if failed:
        raise DataError(f"{args.out}: stage(s) {', '.join(failed)} exited non-zero; counts stop where they failed")
    log.info("wrote %s (%.0f s)", args.out, report["wall_s"])


if __name__ == "__main__":
    harness.run(main, parse_args())
