"""The kernel's calls to its sessions, on direct comms: running a cell (its output streamed back),
interrupting it, pulling a variable, asking whether large values can go through pipes.

Why direct: a cell's messages never pass the scheduler (no hop, no task bookkeeping). Every call
carries the lease's secret, which only this kernel and the session's worker hold. The comms do not
deserialize: values stay Dask frames until the kernel rebuilds them where they land, so a refusal
comes back as Dask's plain ``Exception`` with the refusal's text, which
``common/refusals.reraised`` turns back into the typed refusal (by name, nothing is unpickled).
All network I/O runs on the Dask client's event loop thread; these functions are called from the
kernel's main thread and wait for it there (interruptible).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from distributed.comm import CommClosedError, connect
from distributed.core import rpc

from jupyter_gpu.common import config, local_transfer
from jupyter_gpu.common.protocol import CellPayload
from jupyter_gpu.common.refusals import CallError, reraised
from jupyter_gpu.errors import GpuPoolError
from jupyter_gpu.kernelext.connection import PoolConnection, RemoteSession
from jupyter_gpu.pool.discovery import pool_token

log = logging.getLogger(__name__)


def session_call(
    conn: PoolConnection,
    session: RemoteSession,
    op: str,
    timeout: float | None = 10,
    **kwargs: Any,
) -> Any:
    """One call to the session (with its secret), waited for on the client loop; a refusal raises
    its ``CallError``."""

    async def go() -> Any:
        async with rpc(
            session.address,
            deserializers=None,
            deserialize=False,
            connection_args=conn.connection_args,
        ) as r:
            try:
                return await asyncio.wait_for(
                    getattr(r, op)(secret=session.secret, **kwargs), timeout
                )
            except Exception as exc:  # noqa: BLE001 - a refusal arrives as a plain Exception: typed again, or as it came
                raise reraised(exc) from None

    return conn.call(go, timeout=None if timeout is None else timeout + 5)


def local_transfer_ok(conn: PoolConnection, session: RemoteSession) -> bool:
    """Whether this kernel and ``session`` pass large values through pipes
    (``common/local_transfer.py``): asked once per session, by each side reading a small probe of
    the other's (same machine, same account, ``/proc`` readable), so a setting that would fail
    mid-cell is found before it matters."""
    if session.local is None:
        session.local = False
        if config.get("local-transfer", True) and local_transfer.available():
            sending = local_transfer.Sending()
            try:
                reply = session_call(conn, session, "ping", probe=local_transfer.probe(sending))
                session.local = bool(reply.get("probe_ok")) and local_transfer.check_probe(
                    reply.get("probe")
                )
            except Exception as exc:  # noqa: BLE001 - the comm always works
                log.debug("same-host transfer probe of %s failed: %s", session.address, exc)
            finally:
                sending.close()
    return session.local


def start_execute(
    conn: PoolConnection, session: RemoteSession, payload: CellPayload, sink: Callable[[Any], None]
) -> Any:
    """Start the cell on the client loop; every message (and finally the done reply) goes to
    ``sink``. Large inputs go through pipes when the session can read them; this returns once the
    session has read them (or the cell ended), so the kernel's objects may change again (``--async``
    cells)."""
    sending = local_transfer.Sending()
    if local_transfer_ok(conn, session):
        payload = {
            **payload,
            "local": True,
            "inputs": {
                name: local_transfer.pack(v, sending)
                for name, v in (payload.get("inputs") or {}).items()
            },
        }
    request = {"op": "execute", "reply": True, "secret": session.secret, **payload}

    async def run() -> None:
        started = False
        try:
            comm = session.comm
            try:
                if comm is None or comm.closed():
                    raise CommClosedError("not connected")
                await comm.write(request)
            except (CommClosedError, OSError):
                # a fresh connection; failing that, the session is gone and the cell never started.
                # Ask the broker first: a session whose lease ended (moved to host memory, timed
                # out) listens no more, and connecting would retry its closed port for the whole
                # connect timeout
                ended = await lease_ended(conn, session.id)
                if ended is not None:
                    session.comm = None
                    sink({"op": "lost", "error": ended, "started": False})
                    return
                try:
                    session.comm = comm = await connect(
                        session.address, deserialize=False, timeout=5, **conn.connection_args
                    )
                except (CommClosedError, OSError) as exc:
                    session.comm = None
                    sink({"op": "lost", "error": str(exc), "started": False})
                    return
                await comm.write(request)
            started = True
            while True:
                msg = await comm.read()
                sink(msg)
                if isinstance(msg, dict):
                    return
        except (CommClosedError, OSError) as exc:
            session.comm = None
            sink({"op": "lost", "error": str(exc), "started": started})
        except Exception as exc:  # noqa: BLE001 - never leave the main thread waiting
            session.comm = None
            sink({"op": "lost", "error": f"{type(exc).__name__}: {exc}", "started": started})
        finally:
            sending.close()

    future = asyncio.run_coroutine_threadsafe(run(), conn.loop)
    try:
        sending.wait()
    # stop sending: the session refuses the cell (its inputs are incomplete)
    except KeyboardInterrupt:
        sending.close()
    return future


async def lease_ended(conn: PoolConnection, lease: str) -> str | None:
    """Why the broker ended ``lease``, or None while it stands (or when the broker does not
    answer)."""
    if conn.scheduler_away():  # restarting: it could not say (the connection will)
        return None
    token = pool_token(conn.embedded)
    kwargs = {"token": token} if token else {}
    try:
        scheduler = conn.client.scheduler
        assert scheduler is not None  # connected
        info = await asyncio.wait_for(
            scheduler.gpu_lease_info(lease=lease, user=conn.user, **kwargs), 5
        )
    except Exception:  # noqa: BLE001 - then the connection attempt says what happened
        return None
    return (info.get("end_reason") or "its lease ended") if info.get("state") == "ended" else None


def interrupt(conn: PoolConnection, session: RemoteSession) -> None:
    """SIGINT to the session's running cell (best effort: the kill after the grace period
    follows)."""
    try:
        session_call(conn, session, "interrupt", timeout=2)
    except Exception as exc:  # noqa: BLE001 - an interrupt is best effort: the kill after the grace period follows
        log.debug("interrupt did not reach %s: %s", session.address, exc)


def pull(conn: PoolConnection, name: str) -> Any:
    """``%gpu pull NAME``: a local copy of one variable of this kernel's session."""
    from distributed.protocol import deserialize

    if conn.session is None:
        raise GpuPoolError("This kernel has no GPU session yet: run a %%gpu cell first.")
    session = conn.session
    try:
        reply = session_call(
            conn, session, "pull", timeout=None, name=name, local=local_transfer_ok(conn, session)
        )
    except CallError as exc:
        raise GpuPoolError(f"%gpu pull {name}: {exc}") from None
    return deserialize(*local_transfer.unpack(reply["data"]))
