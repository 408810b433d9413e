"""The package's imports point one way and never circle (docs/design.md, "Layout").

Every ``import`` in every module is counted, including those inside functions: a lazy
import that would be a circle at module level is still a circle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "hadacore"

# Lowest first. A module may import its own layer's package and any lower layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("hadacore.hadamard", "hadacore.formats"),  # data: the matrices, the tensor layouts
    ("hadacore.kernels",),  # leaves: Triton kernels, launch tables, native CPU kernels, their checks
    ("hadacore.ops",),  # every hadacore::* custom op
    ("hadacore.options", "hadacore.quant", "hadacore.data"),  # quantization algorithms and layers
    ("hadacore.fxpasses", "hadacore.distributed"),  # compiler passes (lowering last); TP layers
    ("hadacore.backend", "hadacore.checkpoint", "hadacore.generate"),
    ("hadacore.convert",),
    ("hadacore",),  # the public API
    ("hadacore.demo",),  # the main job, a user of the public API
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """hadacore modules that ``name`` imports anywhere in its file."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _layer(module: str) -> tuple[int, str]:
    """(layer index, the entry of LAYERS that holds ``module``), longest prefix first."""
    best = None
    for i, entries in enumerate(LAYERS):
        for e in entries:
            if module == e or module.startswith(e + "."):
                if best is None or len(e) > len(best[1]):
                    best = (i, e)
    assert best is not None, f"{module} is in no layer of tests/test_layering.py: place it"
    return best


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    modules = _modules()
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        for target in _imports(name, path, set(modules)):
            g.add_edge(name, target)
    return g


def test_every_module_has_a_layer(graph):
    for module in graph.nodes:
        _layer(module)


def test_no_import_circles(graph):
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_imports_point_down(graph):
    upward = []
    for a, b in graph.edges:
        (la, ea), (lb, eb) = _layer(a), _layer(b)
        if lb > la or (lb == la and ea != eb):
            upward.append(f"{a} (layer {la}) imports {b} (layer {lb})")
    assert not upward, "\n".join(upward)


def test_kernels_import_nothing_above_them(graph):
    """Kernels are leaves: the matrices, the layouts and other kernels only."""
    allowed = ("hadacore.kernels", "hadacore.hadamard", "hadacore.formats")
    bad = [(a, b) for a, b in graph.edges if a.startswith("hadacore.kernels")
           and not any(b == p or b.startswith(p + ".") for p in allowed)]
    assert not bad, bad


def test_the_check_catches_a_circle_and_an_upward_import(tmp_path):
    """The checks above can fail: a planted circle and an upward import are found."""
    g = nx.DiGraph([("hadacore.kernels.cpu.w4a16", "hadacore.ops"), ("hadacore.ops", "hadacore.kernels.cpu.w4a16")])
    assert list(nx.simple_cycles(g))
    assert _layer("hadacore.ops")[0] > _layer("hadacore.kernels.cpu.w4a16")[0]
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from hadacore.ops import hadamard\n")
    assert _imports("hadacore.kernels.x", mod, {"hadacore.ops", "hadacore.kernels.x"}) == {"hadacore.ops"}
