"""The package's shape: imports only go down the layer order, never in a circle, never into the CLI.

Layer order, lowest first (a module may import only from its own unit or a lower layer):

 0. base        errors, fileio, runtime, progress, figures, texts (the one disclaimer)
 1. data/       records, manifest and folder readers, DICOM, video, HC18 manifest, transforms
 2. splits      grouped folds, inner splits, leakage audit, rare-class policy
 3. models/     registry, SonoNet-16, heads, segmenters, checkpoint files
 4. quality/    the standard-plane gate (below inference: the one prediction path runs it)
 5. inference/  THE prediction path: checkpoint + records -> image and patient tables
 6. evaluation/ metrics, bootstrap, calibration, screening, subgroups, shortcut, compare, run loading
 7. training/   training loops and the study runner (uses inference for out-of-fold predictions and
                evaluation for the final model's calibration and screening thresholds)
 8. explain/    CAM maps, faithfulness, gallery
 9. biometry/   geometry, gestational age, segmenter, training, scoring
10. report/     one Jinja environment, templates, the run report
11. reader/     reader studies
12. api         the Python API (``fetalscan.api``, re-exported by ``fetalscan``)
13. serve/      the web service
14. cli/        ``fetalscan <command>``; thin

This refines ``shared/design.md``'s six layers into a total order; where the design puts two
packages on one level, the order here says which may use the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "fetalscan"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "fileio", "runtime", "progress", "figures", "texts"),
    ("data",),
    ("privacy",),
    ("splits",),
    ("models",),
    ("quality",),
    ("inference",),
    ("evaluation",),
    ("training",),
    ("explain",),
    ("biometry",),
    ("report",),
    ("pacs",),
    ("reader",),
    ("api",),
    ("serve",),
    ("cli", "__main__"),
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["fetalscan", *parts])] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute fetalscan modules an ``ImportFrom`` node refers to (names may be modules)."""
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("fetalscan"):
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def imports_of(module: str) -> set[str]:
    """Every fetalscan module ``module`` imports, at the top or inside a function."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.update(_resolve(module, path.name == "__init__.py", node))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fetalscan"))
    found.discard(module)
    return {m for m in found if m in MODULES}


def unit_of(module: str) -> str | None:
    """The layer unit of a module: its first component under ``fetalscan``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # the package root itself has no unit


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_belongs_to_a_layer():
    unknown = sorted(m for m in MODULES if unit_of(m) is not None and unit_of(m) not in RANK)
    assert not unknown, f"modules outside the layer order (add them to LAYERS): {unknown}"


def test_imports_only_go_down_the_layers():
    bad = []
    for module, targets in GRAPH.items():
        src = unit_of(module)
        if src is None:
            continue  # fetalscan/__init__.py: the public API, re-exports lazily from the top
        for target in targets:
            dst = unit_of(target)
            if dst is None:
                continue  # ``from fetalscan import __version__``
            if RANK[dst] > RANK[src]:
                bad.append(f"{module} -> {target} ({src} is layer {RANK[src]}, {dst} is layer {RANK[dst]})")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_no_module_outside_the_cli_imports_the_cli():
    bad = [f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts
           if unit_of(t) == "cli" and unit_of(m) not in ("cli", "__main__")]
    assert not bad, bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    # a package's __init__ importing its own submodules is not a cycle of logic
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in GRAPH.items()}
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycles(graph) == expected
