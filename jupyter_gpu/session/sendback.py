"""What a cell sends back to its kernel: the names it assigned (values, or what stays remote and
why), its last expression, and a variable ``%gpu pull`` asks for.

Why checked here, in the session's main thread: serializing a value takes up to its size again in
host memory, and it runs the value's own code. A value too large to send is refused by its size
before it is serialized (a session that ran out of memory while answering would lose everything),
and one that cannot be serialized is reported for its name, not for the whole reply.
"""

from __future__ import annotations

from typing import Any

from jupyter_gpu.common.protocol import LastValue, OutputItem
from jupyter_gpu.common.refusals import NotFound, NotPossible


def outputs(
    ns: dict[str, Any], names: list[str], exact: bool, max_bytes: int, lease: str | None
) -> dict[str, OutputItem]:
    """Each of ``names`` the cell left in ``ns``: its value when it is plain data (or ``exact``:
    ``--out``, whatever it is, if it can travel), else where it stays and why."""
    from jupyter_gpu.common.datacontract import classify_output, to_cpu

    out: dict[str, OutputItem] = {}
    for name in names:
        if name not in ns:
            continue
        value = ns[name]
        kind, desc = classify_output(name, value, max_bytes)
        if kind == "skip":
            continue
        if exact:  # --out: bring it back whatever it is, if it can travel
            too_big = transfer_refusal(name, value)
            if too_big is not None:
                out[name] = {"kind": "remote", **desc, "reason": too_big, "lease": lease}  # type: ignore[typeddict-item]  # classify_output's description: OutputItem's fields
                continue
            value, kind = to_cpu(value), "value"
        if kind == "value":
            packed = pack(value)
            if packed is None:
                kind, desc = "remote", {**desc, "reason": "it cannot be serialized"}
            else:
                out[name] = {"kind": "value", "data": packed}
                continue
        out[name] = {"kind": "remote", **desc, "lease": lease}  # type: ignore[typeddict-item]  # as above
    return out


def last_value(hook: Any, max_bytes: int) -> LastValue | None:
    """The cell's last expression (``hook``: the shell's display hook): its display bundle, and its
    value when it is plain data."""
    from jupyter_gpu.common.datacontract import classify_output

    if hook.last_bundle is None:
        return None
    value = None
    kind, _ = classify_output("_", hook.last_value, max_bytes)
    if kind == "value":
        value = pack(hook.last_value)
    return {"bundle": hook.last_bundle, "value": value}


def pulled(ns: dict[str, Any], name: str) -> Any:
    """``%gpu pull NAME``: a CPU copy of one variable, serialized (refused with the reason the user
    reads)."""
    from jupyter_gpu.common.datacontract import to_cpu

    if name not in ns:
        raise NotFound(f"your GPU session has no variable named {name!r}")
    too_big = transfer_refusal(name, ns[name])
    if too_big is not None:
        raise NotPossible(too_big)
    packed = pack(to_cpu(ns[name]))
    if packed is None:
        raise NotPossible(
            f"{name!r} ({type(ns[name]).__name__}) cannot be serialized to bring it back"
        )
    return packed


def transfer_refusal(name: str, value: Any) -> str | None:
    """Why ``value`` is too large to send back to the kernel (None: it may go), checked before
    serializing: serializing a value takes up to its size again in host memory, and a session that
    runs out of it while answering ``--out`` or ``%gpu pull`` would lose everything."""
    import psutil
    from dask.sizeof import sizeof

    from jupyter_gpu.common import config
    from jupyter_gpu.common.units import format_bytes

    try:
        size = int(sizeof(value))
    except Exception:  # noqa: BLE001 - unknown size: let pickling find out
        return None
    limit = config.get_bytes("transfer-max-bytes")
    room = psutil.virtual_memory().available // 2
    if size <= min(limit, room):
        return None
    why = (
        f"more than a cell can send back ({format_bytes(limit)}: jupyter-gpu.transfer-max-bytes)"
        if size > limit
        else f"more than this machine has free to copy it ({format_bytes(room)})"
    )
    return (
        f"{name} is {format_bytes(size)}, {why}. Keep it in the GPU session and bring back what "
        "you need "
        f"(a slice or a summary, e.g. `small = {name}[:1000]` and --out small), or save it to "
        "storage the "
        "notebook can read."
    )


def pack(value: Any) -> Any:
    """Serialize now (in the main thread) so a failure is reported for this name, not for the
    reply."""
    from distributed.protocol import serialize
    from distributed.protocol.serialize import Serialized

    from jupyter_gpu.common.codenames import code_names_kept

    try:
        # functions made in cells keep their file names (tracebacks show their lines)
        with code_names_kept():
            header, frames = serialize(value, serializers=("dask", "pickle"), on_error="raise")
    except Exception:  # noqa: BLE001 - pickling runs the object's own code: the name is reported instead
        return None
    return Serialized(header, frames)
