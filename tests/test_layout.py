"""The layout the README describes holds: layers import only downwards (relay <- overlay <- signaling),
no module imports itself back through others, and the production server loads no test tool."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"relay": 0, "overlay": 1, "signaling": 2}  # a layer may import only layers below it
TEST_TOOLS = ("relay.linkemu", "relay.synthetic", "relay.client", "benchmarks", "tests")


def _modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports at load time (imports under ``if TYPE_CHECKING`` do not run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    out.add(full if full in known else base)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):  # module-level blocks run at import too
                visit(node.body)
                for block in ("orelse", "handlers", "finalbody"):
                    for child in getattr(node, block, []) or []:
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(ast.parse(path.read_text()).body)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_layers_import_only_downwards() -> None:
    upward = sorted(
        f"{module} -> {dep}"
        for module, deps in _graph().items()
        for dep in deps
        if LAYERS[dep.split(".")[0]] > LAYERS[module.split(".")[0]]
    )
    assert upward == []


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                walk(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert cycles == []


def test_the_checker_sees_relative_and_guarded_imports() -> None:
    """The two checks above would pass vacuously if the parser missed imports."""
    graph = _graph()
    assert "relay.frames" in graph["relay.pipeline"]  # from .frames import ...
    assert "overlay.stock.config" in graph["overlay.stock.service"]
    assert "signaling.rooms" not in graph["signaling.keys"]  # only under TYPE_CHECKING


def test_the_server_loads_no_test_tool() -> None:
    code = (
        "import sys, signaling.cli, signaling.app\n"
        f"print(sorted(m for m in sys.modules if m.startswith({TEST_TOOLS!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
