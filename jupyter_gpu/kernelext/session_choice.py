"""Which session a single-GPU ``%%gpu`` cell runs in: the kernel's own (checked to be big enough for
the cell), or a new one (queueing with a live badge), and whether the remote objects it uses still
live there.
"""

from __future__ import annotations

from IPython.core.error import UsageError

from jupyter_gpu.common.protocol import RequestSpec
from jupyter_gpu.common.remote_value import RemoteObject
from jupyter_gpu.common.units import format_bytes
from jupyter_gpu.errors import GpuPoolError
from jupyter_gpu.kernelext.badge import StatusLine, host_share
from jupyter_gpu.kernelext.connection import PoolConnection, RemoteSession
from jupyter_gpu.kernelext.options import CellOptions
from jupyter_gpu.kernelext.pipeline import notebook_name


def fits_lease(spec: RequestSpec, lease: dict) -> bool:
    """Whether a lease already holds what ``spec`` asks for: its GPU share, and the host memory
    and cores it asks for (``--host-memory``, ``--cpus``) booked on its machine."""
    if spec.host_memory is not None and (lease.get("host_memory") or 0) < spec.host_memory:
        return False
    if spec.cpus is not None and (lease.get("cpus") or 0) + 1e-9 < spec.cpus:
        return False
    if spec.gpus is not None:
        return (
            len(lease.get("gpu_indices") or ()) >= spec.gpus
            and lease["fraction"] >= spec.gpus - 1e-9
        )
    if spec.memory is not None:
        return lease["bytes"] >= spec.memory
    return lease["fraction"] + 1e-9 >= spec.fraction


def acquire_session(
    conn: PoolConnection,
    opts: CellOptions,
    label: str,
    deadline: float | None,
    badge: StatusLine,
    restore: str | None = None,
) -> RemoteSession:
    """This kernel's session (or a fresh one), checking that it is big enough for this cell.
    ``restore`` names an ended lease whose variables the new session starts with."""
    spec = opts.spec
    if conn.session is not None and not opts.fresh and opts.explicit_request:
        have = conn.session.lease
        if not fits_lease(spec, have):
            raise UsageError(
                f"%%gpu: your GPU session holds {have['fraction']:g} of a GPU "
                f"({format_bytes(have['bytes'])}{host_share(have)}, "
                f"lease {have['id']}) and this cell asks for {spec.describe()}. A session keeps "
                "its lease for "
                "its life: run `%gpu release` and rerun this cell to start a bigger session (the "
                "session's "
                "variables are lost), or add --fresh to run only this cell in a separate session."
            )
    new = conn.session is None or opts.fresh
    session = conn.ensure_session(
        spec.__dict__,
        notebook_name(),
        label,
        badge.waiting,
        deadline,
        fresh=opts.fresh,
        restore=restore,
    )
    if new:
        badge.started(session)
    return session


def check_remote_refs(
    conn: PoolConnection, session: RemoteSession, remote_refs: dict[str, RemoteObject]
) -> None:
    """Refuse a cell whose inputs include a placeholder of an object that lived in an ended session
    (the session would not find it), naming the object, why it is gone and what to do."""
    alive = conn.lineage(session.id)
    stale = {n: r for n, r in remote_refs.items() if r.lease and r.lease not in alive}
    if stale:
        name, ref = next(iter(stale.items()))
        assert ref.lease is not None  # stale: it names its lease
        reason = conn.ended_sessions.get(ref.lease) or "that session has ended"
        raise GpuPoolError(
            f"{name!r} lived in an earlier GPU session (lease {ref.lease}) and is gone: {reason}. "
            "Rerun the "
            "cell that created it (in a %%gpu cell), or bring such objects back first with --out / "
            "%gpu pull."
        )
