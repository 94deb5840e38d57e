"""The code's shape: one package whose layers import one way (model <- engine <- chat <- server;
client and the shared top-level modules beside them, torch-free), no cycle, short files and
functions, root faces that package code never imports, and ruff clean."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "csm_streaming"
FACES = {"generator", "models", "streaming_generator", "watermarking", "test_streaming",
         "deploy_vast"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Everything a file imports anywhere in it (top level or inside functions), as written."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (imports are absolute)"
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def package_imports(path: Path) -> set[str]:
    return {m for m in imports_of(path) if m in MODULES and MODULES[m] != path}


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
    graph = {name: package_imports(path) - {"csm_streaming"} for name, path in MODULES.items()}
    graph = {k: {m for m in v if not MODULES[m].name == "__init__.py"} for k, v in graph.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # it finds one


COMMANDS = ("csm_streaming.cli", "csm_streaming.verify_watermark", "csm_streaming.options")
FORBIDDEN = {  # a layer and what it must never import
    "csm_streaming.model": ("csm_streaming.engine", "csm_streaming.chat", "csm_streaming.server",
                            "csm_streaming.client", *COMMANDS),
    "csm_streaming.engine": ("csm_streaming.chat", "csm_streaming.server", "csm_streaming.client",
                             *COMMANDS),
    "csm_streaming.chat": ("csm_streaming.server", "csm_streaming.cli"),
    "csm_streaming.client": ("csm_streaming.model", "csm_streaming.engine", "csm_streaming.chat",
                             "csm_streaming.server", "csm_streaming.cli"),
}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_layers_import_one_way():
    wrong = []
    for name, path in MODULES.items():
        for layer, banned in FORBIDDEN.items():
            if within(name, layer):
                wrong += [f"{name} imports {m}" for m in imports_of(path)
                          if any(within(m, b) for b in banned)]
        wrong += [f"{name} imports the root face {m}" for m in imports_of(path)
                  if m.split(".")[0] in FACES]
    assert not wrong, wrong


def test_the_model_imports_nothing_above_it():
    """model/ is the bottom layer: besides itself, only the shared audio helpers."""
    allowed = ("csm_streaming.model", "csm_streaming.audio")
    wrong = [f"{name} imports {m}" for name, path in MODULES.items()
             if within(name, "csm_streaming.model")
             for m in package_imports(path) if not any(within(m, a) for a in allowed)]
    assert not wrong, wrong


# Upstream's signatures (text, speaker, context, max_audio_length_ms, temperature, topk) plus
# seed: the upstream API stays, so these take more than 6 parameters; they build the request
# object at once and nothing else takes the settings one by one.
UPSTREAM_FACES = {"generate", "generate_codes", "generate_streaming", "upstream_request"}


def parameters(node) -> list[str]:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def test_no_function_takes_more_than_six_parameters():
    """Settings travel as one object (SamplingParams, LoadOptions...), not as long lists."""
    wide = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and len(parameters(node)) > 6 and node.name not in UPSTREAM_FACES:
                wide.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not wide, wide
    seven = ast.parse("def f(a, b, c, d, e, f, g): pass").body[0]
    assert len(parameters(seven)) == 7  # the count sees them all


def test_names_do_not_repeat_their_folder():
    assert not [p for p in PACKAGE.rglob("*.py") if p.stem == p.parent.name]


TORCH_FREE = ["csm_streaming", "csm_streaming.cli", "csm_streaming.model.hub"] + sorted(
    n for n, p in MODULES.items()
    if n.startswith(("csm_streaming.client", "csm_streaming.deploy"))
    or p.parent == PACKAGE and p.stem != "__init__")


def test_client_and_shared_modules_import_no_torch():
    """Imported for real, in a process where `import torch` fails."""
    code = ("import sys, importlib; sys.modules['torch'] = None\n"
            f"for m in {TORCH_FREE!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('numpy', 'csm_streaming'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "csm_streaming.client.remote" in r.stdout and "csm_streaming.audio" in r.stdout


def test_importing_the_package_loads_nothing():
    r = subprocess.run([sys.executable, "-c", "import sys, csm_streaming; "
                        "print(csm_streaming.__version__, 'torch' in sys.modules, "
                        "'numpy' in sys.modules)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    version, torch_loaded, numpy_loaded = r.stdout.split()
    assert version[0].isdigit() and torch_loaded == numpy_loaded == "False"


def test_files_and_functions_stay_short():
    long_files, long_functions = [], []
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "benchmarks").glob("*.py")):
        lines = path.read_text().splitlines()
        if path.is_relative_to(PACKAGE) and len(lines) > 450:
            long_files.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 65:
                    long_functions.append(f"{path.name}:{node.lineno} {node.name}: {n} lines")
    assert not long_files and not long_functions, long_files + long_functions


def test_root_faces_are_only_faces():
    """A few lines that re-export; the upstream import works in a clone."""
    for face in FACES:
        tree = ast.parse((ROOT / f"{face}.py").read_text())
        logic = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not logic and len((ROOT / f"{face}.py").read_text().splitlines()) <= 20, face
    r = subprocess.run([sys.executable, "-c", "from generator import load_csm_1b, Segment, "
                        "Generator; print(Segment(speaker=1, text='hi').speaker)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "1", r.stderr


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: bash setup.sh --dev installs it")
    r = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
