"""The shape of the house, checked: three wings with dependencies one way (lab → training → runtime), no import
cycle, one assembly point for the agent, and files small enough to read in one sitting. Unprivileged and fast:
static reads of the source, plus two imports in fresh interpreters."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("otel_ebpf_receiver", "model_export")
LAB = "model_export.lab"
MAX_LINES = 450
# A file may pass MAX_LINES when its module docstring says why, in a sentence starting with this.
LONG_FILE_REASON = "Longer than usual because"


def python_files(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in python_files(*PACKAGES)}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its body (top level or inside functions: a lazy import
    is still a dependency). ``from pkg import x`` counts as pkg.x when that is a module, else as pkg."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a project module, or an outside module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_finds_real_imports():
    """Guard for the checks below: the graph sees top-level, relative and lazy imports."""
    graph = import_graph()
    assert "otel_ebpf_receiver.agent" in graph["otel_ebpf_receiver.assembly"]
    assert "otel_ebpf_receiver.state.classifier" in graph["otel_ebpf_receiver.assembly"]  # imported lazily
    assert "otel_ebpf_receiver.model.runtime" in graph["model_export.train"] or \
        "otel_ebpf_receiver.model" in graph["model_export.train"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_anywhere():
    assert cycles(import_graph()) == []


def test_dependencies_run_one_way():
    """lab → training → runtime: the runtime imports neither, training never imports the lab."""
    wrong = []
    for name, deps in import_graph().items():
        for dep in deps:
            if name.startswith("otel_ebpf_receiver") and dep.startswith("model_export"):
                wrong.append((name, dep))
            if name.startswith("model_export") and not name.startswith(LAB) and dep.startswith(LAB):
                wrong.append((name, dep))
    assert wrong == []


def run_isolated(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# What the agent must never carry: our training and lab, and the libraries only they use (each costs the agent tens
# of MB resident; memory.py and bench/bench_memory.py say where the agent's memory goes).
TRAINING_PACKAGES = ("model_export", "sklearn", "skl2onnx", "matplotlib", "scipy", "pandas")


def test_importing_every_runtime_module_loads_no_training_or_lab_module():
    """Every runtime module — assembly, the CLI's `run` path, all of them — imported in one fresh interpreter loads
    neither our training/lab code nor scikit-learn, skl2onnx, matplotlib, scipy or pandas. (What `run` imports
    lazily while it builds the agent is checked on a real agent in test_memory.py.)"""
    names = sorted(n for n in project_modules() if n.startswith("otel_ebpf_receiver") and not n.endswith("__main__"))
    assert "otel_ebpf_receiver.assembly" in names and "otel_ebpf_receiver.cli.run" in names
    loaded = run_isolated(
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_PACKAGES!r})))\n")
    assert loaded == []


def test_training_imports_without_bcc():
    """Training runs on a laptop: no root, no bcc. A finder that refuses bcc proves nothing outside the lab needs it."""
    names = sorted(n for n in project_modules()
                   if n.startswith("model_export") and not n.startswith(LAB) and not n.endswith("__main__"))
    loaded = run_isolated(
        "import importlib, importlib.abc, json, sys\n"
        "class NoBcc(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'bcc' or name.startswith('bcc.'):\n"
        "            raise ImportError('bcc is not installed here')\n"
        "sys.meta_path.insert(0, NoBcc())\n"
        f"for name in {names!r}:\n    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('bcc', 'model_export') "
        "and (m == 'bcc' or m.startswith('model_export.lab')))))\n")
    assert loaded == []


def calls_to(tree: ast.AST, name: str) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Name) and node.func.id == name)
        or (isinstance(node.func, ast.Attribute) and node.func.attr == name))]


def test_the_agent_is_constructed_in_exactly_one_function():
    sites = []
    for path in python_files(*PACKAGES, "tests", "bench"):
        for line in calls_to(ast.parse(path.read_text()), "Agent"):
            sites.append(f"{path.relative_to(REPO)}:{line}")
    assert len(sites) == 1 and sites[0].startswith("otel_ebpf_receiver/assembly.py:"), sites


@pytest.mark.parametrize("path", python_files(*PACKAGES, "tests", "bench"), ids=lambda p: str(p.relative_to(REPO)))
def test_files_stay_readable(path):
    lines = path.read_text().count("\n")
    if lines > MAX_LINES:
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert LONG_FILE_REASON in docstring, (
            f"{path.relative_to(REPO)} has {lines} lines: split it, or say why at its top "
            f"('{LONG_FILE_REASON} ...')")
