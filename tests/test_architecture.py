"""The package tree is the architecture: these rules keep it so.

Layers, lowest first; a module may import its own layer and the ones below, never one
above (imports inside functions count too):

0. ``edgekd.core``, ``edgekd.wire``: torch-free numpy core that devices import;
1. ``edgekd.learn`` (torch), ``edgekd.fidelity`` (scores; torch only in ``attacks``);
2. ``edgekd.continual``, ``edgekd.deploy``, ``edgekd.reporting``;
3. ``edgekd.inspection``;
4. ``edgekd.client``, ``edgekd.server`` (the Flower adapters);
5. ``edgekd.fleet`` (processes and certificates of a real federation);
6. ``edgekd.cli``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "edgekd"
LAYERS = [
    ("edgekd.core", "edgekd.wire"),
    ("edgekd.learn", "edgekd.fidelity"),
    ("edgekd.continual", "edgekd.deploy", "edgekd.reporting"),
    ("edgekd.inspection",),
    ("edgekd.client", "edgekd.server"),
    ("edgekd.fleet",),
    ("edgekd.cli",),
]
TORCH_FREE = ("edgekd.core", "edgekd.wire")  # no torch import anywhere inside them
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> set[str]:
    """Every edgekd module ``module`` imports, at top level or inside functions."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(_resolve(a.name) for a in node.names if a.name.startswith("edgekd"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.startswith("edgekd"):
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in MODULES else _resolve(base))
    found.discard(module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> int:
    for rank, packages in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in packages):
            return rank
    return 0  # the root package (`edgekd.__version__`)


def test_every_module_is_in_a_layer() -> None:
    loose = [
        m for m in MODULES if m != "edgekd" and _layer(m) == 0 and not m.startswith(TORCH_FREE)
    ]
    assert loose == [], f"modules outside every layer package: {loose}"


def test_no_import_goes_up_a_layer() -> None:
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in GRAPH.items()
        for d in deps
        if _layer(d) > _layer(m)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    # Depth-first search for a back edge; report the cycle it closes.
    colour: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        colour[module] = 1
        stack.append(module)
        for dep in sorted(GRAPH.get(module, ())):
            if colour[dep] == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif colour[dep] == 0:
                visit(dep)
        stack.pop()
        colour[module] = 2

    for module in sorted(GRAPH):
        if colour[module] == 0:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("package", TORCH_FREE)
def test_torch_free_packages_never_import_torch(package: str) -> None:
    offenders = []
    for module, path in MODULES.items():
        if not module.startswith(package):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            offenders += [f"{module}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert offenders == []


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for module, path in MODULES.items():
        text = path.read_text()
        if (lines := text.count("\n")) > MAX_MODULE_LINES:
            too_long.append(f"{module}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {length} lines")
    assert too_long == []


def test_the_rules_see_an_upward_import() -> None:
    # The graph is real: the CLI imports the server, and the server the core.
    assert "edgekd.server.app" in GRAPH["edgekd.cli.main"] or any(
        d.startswith("edgekd.server") for d in GRAPH["edgekd.cli.main"]
    )
    assert _layer("edgekd.cli.main") > _layer("edgekd.server.app") > _layer("edgekd.core.config")
