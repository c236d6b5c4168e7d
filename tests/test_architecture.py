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


def _modules_loaded(code: str, prefixes: tuple[str, ...] = ("jupyter_gpu",)) -> list[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code + "\nimport sys, json\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))",
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


LAUNCHER = (
    "jupyter_gpu.launcher.server",
    "jupyter_gpu.launcher.confine",
    "jupyter_gpu.launcher.cgroups",
    "jupyter_gpu.launcher.hostfiles",
)


def test_the_launcher_loads_no_dask_and_no_pool_process_code():
    """The launcher keeps root: it must not carry Dask's network code (which reads pickles), nor
    the broker's, the worker's or a pool process's (``launcher/zygote.py``, which forks sessions,
    is a process of its own)."""
    loaded = _modules_loaded(
        "import " + ", ".join(LAUNCHER),
        prefixes=("jupyter_gpu", "dask", "distributed", "tornado", "cloudpickle"),
    )
    assert "jupyter_gpu.launcher.server" in loaded
    leaked = [
        m
        for m in loaded
        if m.startswith(("dask", "distributed", "tornado", "cloudpickle", *NOT_IN_A_SESSION))
    ]
    assert not leaked, f"the launcher imports {leaked}"


def test_the_launcher_imports_only_common_code_statically():
    graph = import_graph()
    for module, deps in graph.items():
        if module in LAUNCHER:
            bad = sorted(
                d
                for d in deps
                if not d.startswith(
                    ("jupyter_gpu.common", "jupyter_gpu.launcher", "jupyter_gpu.errors")
                )
            )
            assert not bad, f"{module} imports {bad}"


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


# ---------------------------------------------------------------------- the kernel side's walls
# what a kernel, the Jupyter server and a headless run may not load: the processes they only start
# or talk to (the broker, the GPU worker, the pool's own processes and what they listen on)
POOL_PROCESSES = (
    "jupyter_gpu.broker",
    "jupyter_gpu.worker",
    "jupyter_gpu.pool.listeners",
    "jupyter_gpu.pool.embedded",
    "jupyter_gpu.pool.services",
    "jupyter_gpu.pool.cluster_manager",
    "jupyter_gpu.session.server",
    "jupyter_gpu.session.executor",
)
USER_SIDE = ("jupyter_gpu.kernelext", "jupyter_gpu.labext", "jupyter_gpu.headless")


def test_kernel_jupyter_server_and_headless_entry_points_load_no_pool_process_code():
    """A kernel (``%load_ext jupyter_gpu`` and a cell's whole path), the Jupyter server's extension
    and a headless run start pools and talk to them; importing the scheduler, the broker or the
    workers to do so (as ``ensure_embedded_pool`` once did) carries the control plane into
    processes users control."""
    loaded = _modules_loaded(
        "import jupyter_gpu\n"
        "import jupyter_gpu.kernelext.magics, jupyter_gpu.kernelext.single_gpu_cells\n"
        "import jupyter_gpu.kernelext.scaleout, jupyter_gpu.kernelext.session_calls\n"
        "import jupyter_gpu.kernelext.status_view\n"
        "import jupyter_gpu.labext, jupyter_gpu.labext.app, jupyter_gpu.labext.handlers\n"
        "import jupyter_gpu.headless, jupyter_gpu.headless.runner, jupyter_gpu.headless.pool\n"
        "import jupyter_gpu.headless.pytest_plugin, jupyter_gpu.pool.launcher\n"
    )
    assert "jupyter_gpu.kernelext.magics" in loaded and "jupyter_gpu.pool.launcher" in loaded
    leaked = [m for m in loaded if m.startswith(POOL_PROCESSES)]
    assert not leaked, f"the kernel side imports {leaked}"


def test_the_user_side_never_imports_pool_process_code_statically():
    """The same, over every import of ``kernelext/``, ``labext/``, ``headless/`` and the launcher,
    function-level ones included (a lazy import is loaded the first time it runs)."""
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith(USER_SIDE) or module == "jupyter_gpu.pool.launcher":
            bad = sorted(d for d in deps if d.startswith(POOL_PROCESSES))
            assert not bad, f"{module} imports {bad}"


# ---------------------------------------------------------------------- sizes
MAX_FUNCTION_LINES = 100
MAX_CLASS_LINES = 350
# other work splits these (issue 19's other items); the lead removes this list when merging
TOO_LONG_FOR_NOW: set[str] = set()  # path:name of what is still too long (none now)


def too_long(root: Path = PACKAGE) -> list[str]:
    """``path:name (lines)`` of every function over MAX_FUNCTION_LINES and every class over
    MAX_CLASS_LINES lines under ``root``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = MAX_FUNCTION_LINES
            else:
                continue
            assert node.end_lineno is not None  # parsed from source
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{path.relative_to(root).as_posix()}:{node.name} ({lines})")
    return found


def test_no_function_over_100_lines_and_no_class_over_350():
    """Long procedures and classes are where a newcomer gets lost: split them by what they do."""
    over = [f for f in too_long() if f.rsplit(" ", 1)[0] not in TOO_LONG_FOR_NOW]
    assert not over, f"too long: {over}"


def test_the_size_check_finds_a_long_function(tmp_path):
    """The check above must be able to fail."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n\n\nclass Short:\n    pass\n")
    assert too_long(tmp_path) == [f"long.py:long ({MAX_FUNCTION_LINES + 1})"]
