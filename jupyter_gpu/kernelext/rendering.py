"""Showing what a remote cell produced as ordinary outputs of the local cell.

Streams become stream outputs, remote ``display()`` calls become display_data (updates and
``clear_output`` included), metrics from ``jupyter_gpu.report`` drive a live progress display, and
remote exceptions are rebuilt as real exceptions whose traceback shows the cell's own lines.
"""

from __future__ import annotations

import linecache
import os
import pickle
import sys
import types
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
    """A real traceback from the session's frames (``session/tracebacks.frames_dict``, the shape of
    tblib's ``Traceback.as_dict()``): one stub frame per remote frame, with the remote file name,
    function name, first line and line number, so IPython shows the cell's own lines from
    ``linecache``.

        Why stubs of our own: IPython reads a frame's source from its code's first line (IPython 9
        always for a cell's file, which does not exist on disk; IPython 8 when a frame's file is
        long). tblib's stubs are one-line codes starting at the frame's line, so a failure on line
        3 of a function showed the function's first line labelled 3; a stub starting at line 1
        showed nothing under ``Cell In[3], line 22`` for a function that starts on line 10 (the
        block read from line 1 was the cell's first statement). Here a function's stub starts
        where the function does and reaches the frame's line, as the real code does."""
    top = last = None
    node: Any = tb_dict
    while isinstance(node, dict):
        code = (node.get("tb_frame") or {}).get("f_code") or {}
        filename, name = (
            str(code.get("co_filename") or "<unknown>"),
            str(code.get("co_name") or "<module>"),
        )
        lineno = _line(node.get("tb_lineno"), 1)
        first = _line(code.get("co_firstlineno"), 1)
        made = _stub_frame(filename, name, first if first <= lineno else 1, lineno)
        if top is None:
            top = made
        if last is not None:
            last.tb_next = made
        last = made
        node = node.get("tb_next")
    return top


def _line(value: Any, default: int) -> int:
    return value if isinstance(value, int) and 0 < value <= 1_000_000 else default


def _stub_frame(filename: str, name: str, first: int, lineno: int) -> Any:
    """A traceback entry in a code object named ``name`` of ``filename`` that starts on line
    ``first`` and raised on line ``lineno`` (a function, so that its first line is ``first`` for
    any value; a module's code is one starting on line 1)."""
    body = (
        " raise __traceback_maker"
        if lineno == first
        else ("\n" * (lineno - first) + " raise __traceback_maker")
    )
    module = compile("\n" * (first - 1) + "def _stub():" + body, filename, "exec")
    code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    code = code.replace(co_name=name)
    if sys.version_info >= (3, 11):
        code = code.replace(co_qualname=name)
    stub = types.FunctionType(code, {"__traceback_maker": _TracebackMaker, "__name__": "__main__"})
    try:
        stub()
    except _TracebackMaker:
        caught = sys.exc_info()[2]
        assert caught is not None and caught.tb_next is not None  # this frame, then the stub's
        return caught.tb_next
    raise AssertionError("the stub frame did not raise")


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def without_our_tail(tb: Any) -> Any:
    """``tb`` without the frames of jupyter-gpu's own code it ends in (cut in place): an error that
    jupyter-gpu raises for the user's line (a ``RemoteObject`` used as a local value, a bad argument
    to one of its functions) is shown at that line, as a library's hidden frames are. IPython always
    shows the frame that raised, ``__tracebackhide__`` or not."""
    last_theirs = None
    t = tb
    while t is not None:
        if not os.path.abspath(t.tb_frame.f_code.co_filename).startswith(PACKAGE_DIR):
            last_theirs = t
        t = t.tb_next
    if last_theirs is None:
        return tb  # all of it is ours: an error of jupyter-gpu itself, shown whole
    last_theirs.tb_next = None
    return tb


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
