"""Showing what a remote cell produced as ordinary outputs of the local cell.

Streams become stream outputs, remote ``display()`` calls become display_data (updates and
``clear_output`` included), metrics from ``jupyter_gpu.report`` drive a live progress display, and
remote exceptions are rebuilt as real exceptions whose traceback shows the cell's own lines.
"""

from __future__ import annotations

import linecache
import pickle
import sys
from collections.abc import Mapping
from typing import Any

from IPython.display import clear_output, publish_display_data

from jupyter_gpu.errors import RemoteError
from jupyter_gpu.kernelext.progress_bar import ProgressDisplay


class CellRenderer:
    """Renders one cell's message stream in the kernel (main thread, or a job's display for
    --async)."""

    def __init__(self) -> None:
        self.progress: ProgressDisplay | None = None

    def handle(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "stream":
            stream = sys.stdout if msg.get("name") == "stdout" else sys.stderr
            stream.write(msg["text"])
            stream.flush()
        elif op == "display":
            publish_display_data(
                dict(msg["data"]),
                dict(msg.get("metadata") or {}),
                transient=dict(msg.get("transient") or {}),
                update=bool(msg.get("update")),
            )
        elif op == "clear":
            clear_output(wait=bool(msg.get("wait")))
        elif op == "metrics":
            if self.progress is None:
                self.progress = ProgressDisplay()
            self.progress.add(msg)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.render(final=True)


def register_cell_source(cell_name: str, code: str) -> None:
    """Make the remote cell's file name resolve to its source in this kernel, for tracebacks."""
    lines = code.splitlines(keepends=True)
    linecache.cache[cell_name] = (len(code), None, lines, cell_name)


def rebuild_exception(error: Mapping[str, Any]) -> BaseException:
    """The remote exception as a real exception (original type where importable) with the remote
    traceback attached, so the kernel's traceback shows the cell's own lines."""
    exc: BaseException | None = None
    if error.get("pickled"):
        try:
            exc = pickle.loads(error["pickled"])
        except Exception:  # noqa: BLE001 - unpickling runs the exception's own code: fall back to its type name
            exc = None
    if exc is None:
        if error.get("type") == "jupyter_gpu.errors.GpuPoolError":
            from jupyter_gpu.errors import GpuPoolError

            exc = GpuPoolError(error.get("message", ""))
        elif error.get("type") == "builtins.KeyboardInterrupt":
            exc = KeyboardInterrupt()
        else:
            exc = RemoteError(error.get("type", "Exception"), error.get("message", ""))
    tb_dict = error.get("traceback")
    if tb_dict:
        try:
            remote_tb = traceback_from_dict(_lists(tb_dict))
            exc = exc.with_traceback(remote_tb)
            # where the cell's own frames start (see remote_part)
            setattr(exc, REMOTE_TB, remote_tb)
        except Exception:  # noqa: BLE001 - a traceback that cannot be rebuilt: the exception without it
            pass
    return exc


REMOTE_TB = "_jupyter_gpu_remote_tb"


class _TracebackMaker(Exception):
    """Raised by each stub frame of :func:`traceback_from_dict`, never seen outside it."""


def traceback_from_dict(tb_dict: dict) -> Any:
    """A real traceback from tblib's ``Traceback.as_dict()``: one stub frame per remote frame, with
    the remote file name, function name and line number, so IPython shows the cell's own lines from
    ``linecache``.

        Why not ``tblib.Traceback.as_traceback``: tblib 3 makes each stub a one-line code object
        whose first line is the frame's line, and IPython 9 reads a frame's source from its code's
        first line: a failure on line 3 of a function showed the function's first line labelled 3.
        Here the stub's code starts at line 1 and reaches the frame's line, as a real module's code
        does, which IPython 8 and 9 both show right."""
    top = last = None
    node: Any = tb_dict
    while isinstance(node, dict):
        code = (node.get("tb_frame") or {}).get("f_code") or {}
        filename, name = (
            str(code.get("co_filename") or "<unknown>"),
            str(code.get("co_name") or "<module>"),
        )
        lineno = node.get("tb_lineno")
        lineno = lineno if isinstance(lineno, int) and 0 < lineno <= 1_000_000 else 1
        stub = compile("\n" * (lineno - 1) + "raise __traceback_maker", filename, "exec").replace(
            co_name=name
        )
        try:
            exec(stub, {"__traceback_maker": _TracebackMaker, "__name__": "__main__"})
        except _TracebackMaker:
            caught = sys.exc_info()[2]
            assert caught is not None  # in the except clause: its traceback
            made = caught.tb_next  # the stub's own frame
            if top is None:
                top = made
            if last is not None:
                last.tb_next = made
            last = made
        node = node.get("tb_next")
    return top


def remote_part(value: BaseException, tb: Any) -> Any:
    """The part of ``tb`` that ran remotely, for an exception a ``%%gpu`` cell raised (None
    otherwise).

        Raising the rebuilt exception in the kernel puts the kernel's frames in front of the remote
        ones (the notebook's ``get_ipython().run_cell_magic(...)`` line and IPython's own call):
        locally the user would see only their cell's lines, so the traceback shown starts where the
        remote frames do."""
    start = getattr(value, REMOTE_TB, None)
    t = tb
    while start is not None and t is not None:
        if t is start:
            return t
        t = t.tb_next
    return None


def _lists(obj: Any) -> Any:
    """msgpack gives tuples; tblib wants its dicts as it made them."""
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_lists(v) for v in obj]
    return obj
