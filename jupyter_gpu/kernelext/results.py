"""The last step of every ``%%gpu`` cell: what the session sent back becomes local names, a value,
or the cell's exception.

Plain data lands in the namespace as real objects; what stayed on the GPU (or could not be rebuilt
here) lands as a ``RemoteObject`` placeholder that says so; the remote exception is raised with the
cell's own lines. A ``--workers`` run finishes through here with rank 0's reply.
"""

from __future__ import annotations

from typing import Any, cast

from jupyter_gpu.common import local_transfer
from jupyter_gpu.common.protocol import ErrorPayload, ExecuteReply, LastValue
from jupyter_gpu.common.remote_value import RemoteObject
from jupyter_gpu.errors import CellTimeout
from jupyter_gpu.kernelext.connection import RemoteSession
from jupyter_gpu.kernelext.options import CellOptions
from jupyter_gpu.kernelext.rendering import rebuild_exception


class RemoteDisplay:
    """A cell's last value that stayed remote: shown with the representation computed remotely."""

    def __init__(self, bundle: dict):
        self.bundle = bundle

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        return dict(self.bundle.get("data") or {}), dict(self.bundle.get("metadata") or {})


def land_outputs(ns: dict, done: ExecuteReply, session: RemoteSession) -> None:
    """Put the names the cell assigned into the kernel's namespace: real objects where they could be
    rebuilt, placeholders (naming the session that holds them) otherwise."""
    from distributed.protocol import deserialize

    for name, item in (done.get("outputs") or {}).items():
        if item.get("kind") == "value":
            try:
                ns[name] = deserialize(*local_transfer.unpack(item["data"]))
                continue
            except Exception as exc:  # noqa: BLE001 - unpickling runs the object's own code: a placeholder then
                item = {
                    "kind": "remote",
                    "type_name": "object",
                    "summary": "",
                    "reason": f"it could not be rebuilt in this kernel ({type(exc).__name__}: "
                    f"{exc})",
                    "lease": session.id,
                }
        ns[name] = RemoteObject(
            name=name,
            type_name=item.get("type_name", "object"),
            summary=item.get("summary", ""),
            nbytes=item.get("nbytes"),
            device=item.get("device"),
            reason=item.get("reason", ""),
            lease=item.get("lease"),
        )


def finish_cell(shell: Any, done: ExecuteReply, session: RemoteSession, opts: CellOptions) -> Any:
    """Land the outputs, then raise the cell's error or return its last value (the cell's
    ``Out[n]``)."""
    __tracebackhide__ = True
    from distributed.protocol import deserialize

    land_outputs(shell.user_ns, done, session)
    if done.get("status") == "error":
        exc = rebuild_exception(done.get("error", cast(ErrorPayload, {})))
        if done.get("timed_out"):
            raise CellTimeout(
                f"--timeout {opts.timeout:g} s was reached: the cell was interrupted (its "
                "session and its variables are kept)."
            ) from exc
        raise exc
    result: LastValue | None = done.get("result")
    if not result:
        return None
    if result.get("value") is not None:
        try:
            return deserialize(*local_transfer.unpack(result["value"]))
        except Exception:  # noqa: BLE001 - unpickling runs the object's own code: its display instead
            pass
    return RemoteDisplay(result["bundle"])
