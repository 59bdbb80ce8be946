"""The package's shape: imports only run down the layers, no import cycle (lazy imports inside functions count),
no private name imported across modules, no module over 450 lines."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dfpipe"
MAX_LINES = 450
# Lowest first: a module may import from its own layer's package and from the layers below it, never above.
LAYERS = [
    ("foundation", {"dfpipe", "dfpipe.errors", "dfpipe.io", "dfpipe.config", "dfpipe.layout", "dfpipe.registry",
                    "dfpipe.metrics", "dfpipe.device", "dfpipe.harness", "dfpipe.assets"}),
    ("data", {"dfpipe.data", "dfpipe.losses"}),
    ("models", {"dfpipe.models"}),
    ("stages", {"dfpipe.prepare_data", "dfpipe.augment_sd", "dfpipe.cluster_split", "dfpipe.train_experts",
                "dfpipe.ensemble_predict"}),
    ("evaluation", {"dfpipe.evaluate"}),  # stage 6 scores through stage 5's one scoring path
    ("clients", {"dfpipe.serve", "dfpipe.cli", "dfpipe.demo", "dfpipe.report", "dfpipe.docs"}),
]


def _name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import anywhere in the file, relative ones resolved."""
    here, is_pkg = _name(path), path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".") if is_pkg else here.split(".")[:-1]
                base = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            out.append((base, [a.name for a in node.names]))
    return out


def _edges(name: str) -> set[str]:
    """dfpipe modules ``name`` imports (a submodule importing its own parent package is not an edge)."""
    out = set()
    for base, names in _imports(MODULES[name]):
        for m in [base, *(f"{base}.{n}" for n in names)]:
            if m in MODULES and m != name and not name.startswith(m + "."):
                out.add(m)
    return out


GRAPH = {m: _edges(m) for m in MODULES}


def _layer(module: str) -> tuple[int, str]:
    hits = [(i, p) for i, (_, pkgs) in enumerate(LAYERS) for p in pkgs if module == p or module.startswith(p + ".")]
    assert hits, f"{module}: in no layer of {__file__}; add its package to LAYERS"
    return max(hits, key=lambda h: len(h[1]))


def test_no_import_cycle():
    seen, on_path, cycles = set(), [], []

    def visit(m: str) -> None:
        if m in on_path:
            cycles.append(on_path[on_path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.append(m)
        for d in sorted(GRAPH[m]):
            visit(d)
        on_path.pop()

    for m in sorted(GRAPH):
        visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_only_run_down_the_layers_and_stages_do_not_import_each_other():
    bad = []
    for m, deps in GRAPH.items():
        (lm, pm) = _layer(m)
        for d in deps:
            ld, pd_ = _layer(d)
            if ld > lm or (ld == lm and LAYERS[lm][0] == "stages" and pd_ != pm):
                bad.append(f"{m} -> {d}")
    assert not bad, "imports up a layer or across stages: " + "; ".join(sorted(bad))


def test_no_private_name_is_imported_across_modules():
    bad = [f"{m}: from {base} import {n}" for m, p in MODULES.items() for base, names in _imports(p)
           for n in names if base.startswith("dfpipe") and n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_the_line_limit(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module].relative_to(REPO)}: {n} lines (split it by concern)"
