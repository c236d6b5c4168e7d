"""The house's walls: which code each process may load, and no import cycles anywhere.

The session process runs users' code; the broker and the worker are the control plane. A session
that imported broker or worker code would carry the control plane's secrets and handlers into the
process that user code controls, so the session side must never import them. These tests check that
in a fresh interpreter (what ``python -m jupyter_gpu.session`` really loads) and statically, over
every import in the package, function-level ones included.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import jupyter_gpu

PACKAGE = Path(jupyter_gpu.__file__).parent
CONTROL_PLANE = ("jupyter_gpu.broker", "jupyter_gpu.worker", "jupyter_gpu.pool")
NOT_IN_A_SESSION = CONTROL_PLANE + (
    "jupyter_gpu.kernelext",
    "jupyter_gpu.labext",
    "jupyter_gpu.headless",
    "jupyter_gpu.hubservice",
)


def _modules_loaded(code: str) -> list[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code + "\nimport sys, json\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('jupyter_gpu'))))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_session_entry_point_loads_no_control_plane_code():
    """Everything a session process imports before and while it serves: its entry point, its server
    and executor, and what a cell reaches through ``jupyter_gpu`` (report, checkpoint, offload,
    standby)."""
    loaded = _modules_loaded(
        "import jupyter_gpu.session.main, jupyter_gpu.session.server, "
        "jupyter_gpu.session.executor\n"
        "import jupyter_gpu.session.offload, jupyter_gpu.session.standby, "
        "jupyter_gpu.session.distributed_rank\n"
        "import jupyter_gpu.session.isolation, jupyter_gpu.session.memory_meter\n"
        "import jupyter_gpu"
    )
    assert "jupyter_gpu.session.server" in loaded
    leaked = [m for m in loaded if m.startswith(NOT_IN_A_SESSION)]
    assert not leaked, f"the session process imports {leaked}"


def test_importing_the_package_in_a_cell_loads_only_the_cell_api():
    """``import jupyter_gpu`` in a session's cell (or anywhere) must stay light: the cell API
    only."""
    loaded = _modules_loaded("import jupyter_gpu")
    assert set(loaded) <= {
        "jupyter_gpu",
        "jupyter_gpu._version",
        "jupyter_gpu.session",
        "jupyter_gpu.session.api",
    }


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at any depth of its code (functions included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [
                    f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names
                ]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("jupyter_gpu"):
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
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
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_anywhere_in_the_package():
    # the package's __init__ re-exports the cell API; it is imported first by every submodule anyway
    graph = {m: {t for t in deps if t != "jupyter_gpu"} for m, deps in import_graph().items()}
    assert _cycles(graph) == []


def test_the_session_side_never_imports_the_broker_side_statically():
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("jupyter_gpu.session"):
            bad = sorted(d for d in deps if d.startswith(NOT_IN_A_SESSION))
            assert not bad, f"{module} imports {bad}"


def test_common_modules_import_no_process_code():
    """``common/`` is what every process shares: it must not pull any one process's code in."""
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("jupyter_gpu.common"):
            bad = sorted(
                d for d in deps if not d.startswith(("jupyter_gpu.common", "jupyter_gpu.errors"))
            )
            assert not bad, f"{module} imports {bad}"


def test_the_cycle_finder_finds_a_cycle():
    """The check above must be able to fail."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
