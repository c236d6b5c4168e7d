"""What crosses between a notebook kernel and its remote session.

Inputs: the cell's free names that exist in the kernel, found from the cell's syntax tree (modules
travel as their import name and are re-imported remotely). Outputs: the names the cell assigns;
those holding plain data come back as real objects, the rest stay remote behind a ``RemoteObject``
placeholder that says so (``common/remote_value.py``). Both sides import this module, so the rules are the same everywhere.
"""

from __future__ import annotations

import ast
import builtins
import types
from dataclasses import dataclass
from typing import Any

_BUILTINS = set(dir(builtins)) | {"get_ipython", "In", "Out", "exit", "quit"}


# ---------------------------------------------------------------------------------------------- syntax
def _parse(code: str) -> ast.Module | None:
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        code = TransformerManager().transform_cell(code)  # %magics and !shell lines to Python
    except Exception:  # noqa: BLE001 - IPython missing or its transform failing: parse the cell as plain Python
        pass
    try:
        return ast.parse(code)
    except SyntaxError:
        return None


class _Names(ast.NodeVisitor):
    """Collects, in source order, loads and stores of names at cell level and free names in nested
    scopes."""

    def __init__(self) -> None:
        # name -> "load" | "store" (first occurrence at cell level)
        self.first_use: dict[str, str] = {}
        self.loaded: set[str] = set()
        self.stored: list[str] = []  # cell-level assignments, in order

    def _use(self, name: str, kind: str) -> None:
        self.first_use.setdefault(name, kind)
        if kind == "load":
            self.loaded.add(name)
        elif name not in self.stored:
            self.stored.append(name)

    def visit_Name(self, node: ast.Name) -> None:
        self._use(node.id, "load" if isinstance(node.ctx, ast.Load) else "store")

    # Python evaluates the right-hand side first: `x = x + 1` reads the old x.
    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.visit(node.target)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    visit_AsyncFor = visit_For

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._use(node.target.id, "load")  # x += 1 reads x first
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._use(alias.asname or alias.name.split(".")[0], "store")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._use(alias.asname or alias.name, "store")

    def _scope(
        self,
        node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda,
        args: ast.arguments | None,
        name: str | None,
    ) -> None:
        if name is not None:
            for deco in getattr(node, "decorator_list", []):
                self.visit(deco)
            if args is not None:
                for default in args.defaults + [d for d in args.kw_defaults if d is not None]:
                    self.visit(default)
            self._use(name, "store")
        inner = _Names()
        body = node.body if isinstance(node.body, list) else [node.body]
        for stmt in body:
            inner.visit(stmt)
        bound = set(inner.stored)
        if args is not None:
            bound |= {a.arg for a in args.args + args.kwonlyargs + args.posonlyargs}
            bound |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        for free in inner.loaded - bound:
            if free not in self.first_use:
                self._use(free, "load")
            else:
                self.loaded.add(free)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._scope(node, node.args, node.name)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._scope(node, node.args, None)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for base in node.bases + [k.value for k in node.keywords] + node.decorator_list:
            self.visit(base)
        self._use(node.name, "store")
        inner = _Names()
        for stmt in node.body:
            inner.visit(stmt)
        for free in inner.loaded - set(inner.stored):
            self.first_use.setdefault(free, "load")
            self.loaded.add(free)

    def visit_comprehension_scope(
        self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp
    ) -> None:
        inner = _Names()
        for gen in node.generators:
            inner.visit(gen.target)
        bound = set(inner.stored)
        self.visit(node.generators[0].iter)
        inner2 = _Names()
        for gen in node.generators:
            for cond in gen.ifs:
                inner2.visit(cond)
            if gen is not node.generators[0]:
                inner2.visit(gen.iter)
        for part in ("elt", "key", "value"):
            if hasattr(node, part):
                inner2.visit(getattr(node, part))
        for free in inner2.loaded - bound:
            self.first_use.setdefault(free, "load")
            self.loaded.add(free)

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = visit_comprehension_scope


def cell_names(code: str) -> tuple[list[str], list[str]]:
    """``(free, assigned)``: names the cell reads before assigning them, and names it assigns at top
    level."""
    tree = _parse(code)
    if tree is None:
        return [], []
    names = _Names()
    for stmt in tree.body:
        names.visit(stmt)
    free = sorted(n for n, kind in names.first_use.items() if kind == "load" and n not in _BUILTINS)
    return free, names.stored


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class ModuleRef:
    """An input that is a module: re-imported in the session instead of pickled."""

    name: str


def input_item(value: Any) -> Any:
    """What to send for one input value: a ModuleRef for modules, else the value itself."""
    if isinstance(value, types.ModuleType):
        return ModuleRef(value.__name__)
    return value


# ---------------------------------------------------------------------------------------------- outputs
# : the attribute a session on a virtual GPU puts on tensors and modules that are on
# ``jupyter_gpu.device()`` : (``session/virtual_device.py``): they stay remote, as CUDA tensors do
# on a real GPU
DEVICE_MARK = "_jupyter_gpu_on_device"
VIRTUAL_DEVICE = "the virtual GPU"


def is_marked(value: Any) -> bool:
    """Whether ``value`` is on a virtual GPU's ``jupyter_gpu.device()`` (see ``DEVICE_MARK``)."""
    try:
        return bool(value.__dict__.get(DEVICE_MARK))
    except AttributeError:
        return False


def unmark(value: Any) -> Any:
    """``value`` without the device marks (a module's parameters and buffers too): a CPU copy that
    comes back to the kernel must not say it lives on a GPU."""
    for item in [value, *_module_tensors(value)]:
        try:
            item.__dict__.pop(DEVICE_MARK, None)
        except AttributeError:
            pass
    return value


def _module_tensors(value: Any) -> list[Any]:
    try:
        import torch

        if isinstance(value, torch.nn.Module):
            return [*value.parameters(), *value.buffers()]
    except ImportError:
        pass
    return []


def _tensor_device(value: Any) -> str | None:
    dev = getattr(value, "device", None)
    if dev is not None and type(dev).__module__.startswith("torch"):
        return VIRTUAL_DEVICE if is_marked(value) else str(dev)
    return None


def _module_device(value: Any) -> str | None:
    try:
        import torch

        if isinstance(value, torch.nn.Module):
            if is_marked(value):
                return VIRTUAL_DEVICE
            for p in value.parameters():
                return _tensor_device(p)
            return "cpu"
    except ImportError:
        pass
    return None


def _is_plain(value: Any, depth: int = 0) -> bool:
    """Plain data: numbers, text, arrays, CPU tensors, data frames, figures and containers of
    them."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return True
    mod = type(value).__module__ or ""
    if mod.startswith("numpy"):
        return True
    if mod.startswith("pandas") and type(value).__name__ in (
        "DataFrame",
        "Series",
        "Index",
        "Timestamp",
    ):
        return True
    if mod.startswith("matplotlib") and type(value).__name__ == "Figure":
        return True
    if mod.startswith("torch") and type(value).__name__ in ("Tensor", "Parameter"):
        return _tensor_device(value) == "cpu"
    if depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
        return len(value) <= 10_000 and all(_is_plain(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return len(value) <= 10_000 and all(
            _is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in value.items()
        )
    return False


def _summary(value: Any) -> str:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"shape {tuple(shape)}, {dtype}"
    try:
        import torch

        if isinstance(value, torch.nn.Module):
            n = sum(p.numel() for p in value.parameters())
            return f"{n:,} parameters"
    except ImportError:
        pass
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def classify_output(name: str, value: Any, max_bytes: int) -> tuple[str, dict[str, Any]]:
    """Decide whether ``value`` comes back (``("value", {...})``) or stays (``("remote",
    description)``)."""
    from dask.sizeof import sizeof

    if isinstance(value, types.ModuleType):
        return "skip", {}
    device = _tensor_device(value) or _module_device(value)
    try:
        nbytes = int(sizeof(value))
    except Exception:  # noqa: BLE001 - sizeof runs the object's own code: unknown size
        nbytes = None
    desc = {
        "name": name,
        "type_name": f"{type(value).__module__}.{type(value).__qualname__}",
        "summary": _summary(value),
        "nbytes": nbytes,
        "device": device,
    }
    if device == VIRTUAL_DEVICE:
        return "remote", {
            **desc,
            "reason": "it lives on the session's jupyter_gpu.device() (a virtual GPU here: "
            "on a real GPU it is a CUDA object, which stays remote too)",
        }
    if device is not None and device != "cpu":
        return "remote", {**desc, "reason": f"it lives on {device}"}
    if not _is_plain(value):
        return "remote", {
            **desc,
            "reason": "it is not plain data (models, functions and handles stay "
            "where they were made)",
        }
    if nbytes is not None and nbytes > max_bytes:
        from jupyter_gpu.common.units import format_bytes

        return "remote", {
            **desc,
            "reason": f"it is large ({format_bytes(nbytes)} > the "
            f"{format_bytes(max_bytes)} limit for automatic return)",
        }
    return "value", desc


def to_cpu(value: Any) -> Any:
    """A CPU copy of a remote value for ``%gpu pull`` / ``--out`` (tensors and modules moved off the
    GPU)."""
    try:
        import torch
    except ImportError:
        return value
    if isinstance(value, torch.Tensor):
        return unmark(value.detach().cpu())
    if isinstance(value, torch.nn.Module):
        import copy

        return unmark(copy.deepcopy(value).cpu())
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    return value
