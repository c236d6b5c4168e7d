"""Errors as the session sends them to the kernel: the user's exception, or a message about the
pool.

The kernel rebuilds an exception from this payload (``kernelext/rendering.py``): its type where it
can be imported there, its traceback from the frames sent here, and the text as a fallback. The
frames are the user's only, as the cell would show them had it run in the kernel: from the cell's
own frame on, through their cells, their modules and the libraries they called, without
jupyter-gpu's own frames (the session's machinery before the cell, and what the cell called of
ours: ``jupyter_gpu.report()``, the virtual GPU's torch hooks). Those are left out of what the user
reads and written to the session's log instead (``JUPYTER_GPU_SESSION_LOG=INFO``), and the
payload's ``text`` keeps the whole traceback. A CUDA out-of-memory error gets the lease and the fix
added to it.
"""

from __future__ import annotations

import logging
import os
import traceback
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

# jupyter-gpu's own code: frames in here are the project's, never the user's
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
MAX_FRAMES = 200  # a RecursionError's thousands of frames: the first and last hundred are sent

from jupyter_gpu.common.protocol import ErrorPayload, LeaseView, pool_error

__all__ = ["error_payload", "explain_oom", "pool_error"]


def is_internal(filename: str) -> bool:
    """Whether a frame's file is jupyter-gpu's own code (not a cell, a user's module or a library)."""
    return os.path.abspath(filename).startswith(PACKAGE_DIR) if filename[:1] != "<" else False


def user_frames(
    tb: TracebackType | None, cell_name: str | None
) -> tuple[list[TracebackType], list[TracebackType]]:
    """The frames of ``tb`` the user reads, and jupyter-gpu's own that are left out.

    With a ``cell_name``, the user's frames start at the cell's own frame (the session's machinery
    that ran it comes before); from there on, every frame is the user's except jupyter-gpu's own.
    """
    kept: list[TracebackType] = []
    left_out: list[TracebackType] = []
    started = cell_name is None
    t = tb
    while t is not None:
        filename = t.tb_frame.f_code.co_filename
        started = started or filename == cell_name
        (kept if started and not is_internal(filename) else left_out).append(t)
        t = t.tb_next
    return kept, left_out


def frames_dict(frames: list[TracebackType]) -> dict[str, Any] | None:
    """``frames`` in the shape ``kernelext/rendering.traceback_from_dict`` rebuilds (tblib's
    ``Traceback.as_dict()``, plus each code's first line, which tells the kernel where a function's
    source starts: a function in an earlier cell is shown from its own lines, not from the cell's
    first line)."""
    if len(frames) > MAX_FRAMES:
        frames = frames[: MAX_FRAMES // 2] + frames[-MAX_FRAMES // 2 :]
    node: dict[str, Any] | None = None
    for t in reversed(frames):
        code = t.tb_frame.f_code
        node = {
            "tb_frame": {
                "f_code": {
                    "co_filename": code.co_filename,
                    "co_name": code.co_name,
                    "co_firstlineno": code.co_firstlineno,
                },
                "f_lineno": t.tb_lineno,
                "f_globals": {},
                "f_locals": {},
            },
            "tb_lineno": t.tb_lineno,
            "tb_next": node,
        }
    return node


def error_payload(
    exc: BaseException, cell_name: str | None, lease: LeaseView | dict | None = None
) -> ErrorPayload:
    """An exception as the kernel rebuilds it: pickled if possible, the user's frames (see the
    module docstring), and the whole traceback as text."""
    import pickle

    import cloudpickle

    explain_oom(exc, lease)
    tb = exc.__traceback__
    kept, left_out = user_frames(tb, cell_name)
    if left_out and kept:
        log.info(
            "%s: jupyter-gpu's own frames left out of the traceback the user sees:\n%s",
            type(exc).__name__,
            "".join(traceback.format_list(traceback.extract_tb(tb))),
        )
    try:
        tb_dict = frames_dict(kept)
    except Exception:  # noqa: BLE001 - the user's exception may carry anything: no traceback then
        tb_dict = None
    try:
        pickled = _dumps(cloudpickle, exc.with_traceback(None))
        pickle.loads(pickled)
    except Exception:  # noqa: BLE001 - the user's exception may not pickle: its type and message go
        pickled = None
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:  # noqa: BLE001 - formatting runs the exception's own __str__: its repr then
        text = repr(exc)
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "pickled": pickled,
        "traceback": tb_dict,
        "text": text,
        "cell": cell_name,
    }


def _dumps(cloudpickle: Any, exc: BaseException) -> bytes:
    """``exc`` pickled so that the kernel gets it whole.

    A SyntaxError (and IndentationError) is pickled by its arguments: distributed installs
    tblib's exception reducers, which rebuild it without calling its ``__init__``, so its
    ``msg`` (what IPython shows) arrived as None: ``SyntaxError: None``."""
    if not isinstance(exc, SyntaxError):
        return bytes(cloudpickle.dumps(exc))
    import collections
    import io

    class ByArguments(cloudpickle.Pickler):
        # a class attribute: the C pickler reads its dispatch table when it is made
        dispatch_table = collections.ChainMap(
            {type(exc): lambda e: (type(e), e.args)}, cloudpickle.Pickler.dispatch_table
        )

    buffer = io.BytesIO()
    ByArguments(buffer).dump(exc)
    return buffer.getvalue()


def explain_oom(exc: BaseException, lease: LeaseView | dict | None) -> None:
    """Add the lease and the fix to a CUDA out-of-memory error."""
    if lease is None or "out of memory" not in str(exc).lower():
        return
    from jupyter_gpu.common.units import format_bytes

    note = (
        f"[jupyter-gpu] This session holds lease {lease['id']}: {format_bytes(lease.get('bytes'))} "
        f"({lease.get('fraction')} of a GPU), which caps its GPU memory. Ask for more with "
        "`%%gpu --gpus 0.5` or `--memory 20GiB`, or free memory (del tensors, "
        "torch.cuda.empty_cache())."
    )
    try:
        if hasattr(exc, "add_note"):  # Python 3.11+; on 3.10 the message below carries it
            exc.add_note(note)
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]}\n{note}",) + exc.args[1:]
    except Exception:  # noqa: BLE001 - a note is a nicety: the user's exception goes as it is
        pass
