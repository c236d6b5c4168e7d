"""Errors as the session sends them to the kernel: the user's exception, or a message about the
pool.

The kernel rebuilds an exception from this payload (``kernelext/rendering.py``): its type where it
can be imported there, its traceback via tblib starting at the cell's own frames (the session's
machinery is dropped), and the text as a fallback. A CUDA out-of-memory error gets the lease and the
fix added to it.
"""

from __future__ import annotations

import traceback

from jupyter_gpu.common.protocol import ErrorPayload, LeaseView, pool_error

__all__ = ["error_payload", "explain_oom", "pool_error"]


def error_payload(
    exc: BaseException, cell_name: str | None, lease: LeaseView | dict | None = None
) -> ErrorPayload:
    """An exception as the kernel rebuilds it: pickled if possible, its traceback via tblib, and
    text."""
    import pickle

    import cloudpickle
    from tblib import Traceback

    explain_oom(exc, lease)
    tb = exc.__traceback__
    if cell_name is not None:  # drop the session's own frames: start at the cell
        t = tb
        while t is not None and t.tb_frame.f_code.co_filename != cell_name:
            t = t.tb_next
        tb = t or tb
    try:
        tb_dict = Traceback(tb).as_dict() if tb is not None else None
    except Exception:  # noqa: BLE001 - the user's exception may carry anything: no traceback then
        tb_dict = None
    try:
        pickled = cloudpickle.dumps(exc.with_traceback(None))
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
