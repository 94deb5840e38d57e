"""The code's shape: imports flow one way (no cycle, function-level imports included), files and
functions stay short, and ruff is clean."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Project modules a file imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return {m for m in found if m in MODULES and m != path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # it finds one


def test_the_layers():
    """models <- checkpoints <- generator <- engine <- streaming_generator <- scheduler <- server;
    the pieces a laptop client needs import no torch and no model code."""
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    assert "generator" not in imports_of(MODULES["models"]) | imports_of(MODULES["checkpoints"])
    assert graph["watermarking"].isdisjoint({"generator", "engine", "streaming_generator"})
    for light in ("audio", "playback", "dashboard", "metrics", "request", "client", "options"):
        heavy = {"torch", "models", "generator", "engine", "streaming_generator"}
        tree = ast.parse(MODULES[light].read_text())
        top = {
            a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names
        }
        top |= {
            n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module
        }
        assert top.isdisjoint(heavy), f"{light} imports {top & heavy} at module level"


def test_files_and_functions_stay_short():
    long_files, long_functions = [], []
    for path in list(ROOT.glob("*.py")) + list((ROOT / "benchmarks").glob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > 520:
            long_files.append(f"{path.name}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 65:
                    long_functions.append(f"{path.name}:{node.lineno} {node.name}: {n} lines")
    assert not long_files and not long_functions, long_files + long_functions


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: bash setup.sh --dev installs it")
    r = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
