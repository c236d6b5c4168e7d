"""A kernel's link to the pool: its Dask client, its lease and remote session, and running cells
there.

All network I/O runs on the Dask client's event loop thread: ``start_execute`` sends a cell to a
session there and hands every message it answers with to a callback; ``runner.RankRunner`` waits for
them on the kernel's main thread (where interrupts land).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, cast

from distributed import Client
from distributed.comm import CommClosedError, connect
from distributed.core import rpc

from jupyter_gpu.common import config, local_transfer
from jupyter_gpu.common.protocol import SCHEDULER_ENV
from jupyter_gpu.common.security import check_address, client_security, connection_args
from jupyter_gpu.common.units import format_bytes
from jupyter_gpu.errors import CellTimeout, GpuPoolError, PoolUnreachable, RequestRefused
from jupyter_gpu.pool.discovery import pool_token, user_name

if TYPE_CHECKING:
    from tornado.platform.asyncio import BaseAsyncIOLoop

log = logging.getLogger(__name__)

# the calls that act on or read one user's work: the user's name and token go with them
_TOKEN_OPS = frozenset(
    {"gpu_request", "gpu_wait", "gpu_cancel", "gpu_release", "gpu_lease_info", "gpu_scale"}
)


def kernel_identity() -> str:
    """This kernel's id (from its connection file) so the panel can tell kernels apart."""
    try:
        from ipykernel.connect import get_connection_file

        match = re.search(r"kernel-(.+)\.json$", get_connection_file())
        if match:
            return match.group(1)
    except Exception:  # noqa: BLE001 - not in a kernel, or no connection file: a made-up id
        pass
    return f"proc-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass
class RemoteSession:
    """The remote process this kernel's cells run in, and the lease it holds."""

    lease: dict
    comm: Any = None
    fresh: bool = False
    restored: dict | None = None  # what came back from an offloaded session, when it continues one
    # can it and this kernel read each other's pipes (None: not asked yet)
    local: bool | None = None

    @property
    def id(self) -> str:
        return self.lease["id"]

    @property
    def address(self) -> str:
        return self.lease["address"]

    @property
    def secret(self) -> str | None:
        """What the session asks of every call (only this kernel got it, with the grant)."""
        return self.lease.get("secret")

    def describe(self) -> str:
        names = self.lease.get("gpu_names") or [
            f"GPU {i}" for i in self.lease.get("gpu_indices", ())
        ]
        iso = self.lease.get("isolation", "none")
        note = {
            "none": "not enforced: virtual GPU"
            if self.lease.get("virtual", True)
            else "not enforced",
            "torch-cap": "enforced by the PyTorch allocator cap",
            "mps": "enforced by MPS",
            "mig": "a MIG slice",
        }.get(iso, iso)
        return (
            f"{self.lease['fraction']:g} of {', '.join(names)} "
            f"({format_bytes(self.lease['bytes'])}, {note}) "
            f"on {self.lease['worker']}, lease {self.id}"
        )


class PoolConnection:
    """One per kernel: the Dask client to the pool's scheduler and this kernel's remote session."""

    def __init__(self, address: str, embedded: bool):
        self.address = address
        self.embedded = embedded
        self.user = user_name()
        self.kernel = kernel_identity()
        # the pool's TLS (client role): the scheduler, and the direct comms to sessions below, use
        # the same
        self.security = client_security(address)
        check_address(address, "client", self.security)
        self.connection_args = connection_args("client", self.security)
        self.client = Client(
            address,
            set_as_default=False,
            name=f"jupyter-gpu {self.user}",
            timeout=config.get_seconds("connect-timeout"),
            security=self.security,
        )
        # an AsyncIOLoop (Dask's client loop), which tornado's IOLoop type does not say
        self.loop = cast("BaseAsyncIOLoop", self.client.loop).asyncio_loop
        # what goes wrong on the client loop after nobody waits for it any more is ours to log, not
        # the cell's
        self.loop.call_soon_threadsafe(self.loop.set_exception_handler, log_loop_error)
        self.session: RemoteSession | None = None
        self.ended_sessions: dict[str, str] = {}
        # new lease id -> the offloaded lease whose variables it restored
        self.continues: dict[str, str] = {}

    def lineage(self, lease: str) -> set[str]:
        """``lease`` and the earlier leases it continues (remote objects of those live on in it)."""
        seen = {lease}
        while lease in self.continues and self.continues[lease] not in seen:
            lease = self.continues[lease]
            seen.add(lease)
        return seen

    # ------------------------------------------------------------------ plumbing
    def call(
        self, coro_fn: Callable, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Run a coroutine on the client's loop and wait for it (interruptible)."""
        future = asyncio.run_coroutine_threadsafe(coro_fn(*args, **kwargs), self.loop)
        try:
            return future.result(timeout)
        except KeyboardInterrupt:
            future.cancel()
            raise

    def scheduler_call(self, op: str, **kwargs: Any) -> Any:
        """One broker handler, answered; a scheduler that does not answer is a ``PoolUnreachable``
        saying so (a cell's session lives on its worker and is not affected)."""
        token = pool_token(self.embedded)
        if token and (op in _TOKEN_OPS or (op == "gpu_snapshot" and "user" in kwargs)):
            # a pool with a token file (or behind JupyterHub) accepts requests, cancels and
            # releases only with the user's token
            kwargs.setdefault("token", token)

        async def go() -> Any:
            return await getattr(self.client.scheduler, op)(**kwargs)

        try:
            return self.call(go)
        except (OSError, CommClosedError, asyncio.TimeoutError) as exc:
            raise PoolUnreachable(
                f"The pool's scheduler at {self.address} did not answer ({type(exc).__name__}: "
                f"{exc}). If it is "
                "restarting, running sessions carry on and this kernel reconnects by itself: run "
                "the cell again "
                "in a moment (`%gpu status` shows when the pool is back)."
            ) from None

    def close(self) -> None:
        try:
            if self.session is not None and self.session.comm is not None:
                comm = self.session.comm
                self.call(comm.close, timeout=2)
        except Exception:  # noqa: BLE001 - closing a comm to a session that may be gone: the client still closes
            pass
        self.client.close(timeout=5)

    # ------------------------------------------------------------------ leases
    def request_lease(
        self,
        spec: dict,
        notebook: str | None,
        cell: str | None,
        on_wait: Callable[[dict], None],
        deadline: float | None,
        restore: str | None = None,
    ) -> dict:
        """Ask the broker for a lease and wait for it, reporting queue status through ``on_wait``.

        ``restore`` names an ended lease of this kernel whose variables were offloaded: the
        new session starts with them. A KeyboardInterrupt while queued cancels the request
        at once.
        """
        extra = {"restore": restore} if restore else {}

        def submit() -> dict:
            return self.scheduler_call(
                "gpu_request",
                user=self.user,
                kernel=self.kernel,
                spec=spec,
                client=self.client.id,
                notebook=notebook,
                cell=cell,
                **extra,
            )

        status = submit()
        try:
            while status["state"] in ("queued", "starting"):
                on_wait(status)
                if deadline is not None and time.monotonic() > deadline:
                    self.scheduler_call("gpu_cancel", id=status["id"], user=self.user)
                    raise CellTimeout(
                        f"the request {status['id']} was still waiting when --timeout ran out "
                        f"({status.get('reason')}); it was withdrawn from the queue"
                    )
                status = self._wait_through_restarts(status, submit)
        except KeyboardInterrupt:
            if status.get("id"):
                self.scheduler_call("gpu_cancel", id=status["id"], user=self.user)
            raise
        if status["state"] == "refused":
            raise RequestRefused(f"The pool refused this %%gpu cell at once. {status['reason']}")
        if status["state"] != "granted":
            raise GpuPoolError(
                f"The GPU request {status['id']} ended without a grant: {status['reason']}"
            )
        on_wait(status)
        return status

    def _wait_through_restarts(self, status: dict, submit: Callable[[], dict]) -> dict:
        """``gpu_wait`` for a queued request; when the scheduler restarts meanwhile, wait for it (up
        to ``connect-timeout``) and ask again: the new broker does not know requests made to the old
        one."""
        try:
            reply = self.scheduler_call("gpu_wait", id=status["id"], timeout=0.5, user=self.user)
        except PoolUnreachable:
            reply = None
            give_up = time.monotonic() + config.get_seconds("connect-timeout")
            print(
                f"[jupyter-gpu] the pool's scheduler at {self.address} stopped answering while "
                "this cell "
                "waited; waiting for it to come back.",
                flush=True,
            )
            while reply is None:
                time.sleep(1.0)
                try:
                    reply = self.scheduler_call(
                        "gpu_wait", id=status["id"], timeout=0.5, user=self.user
                    )
                except PoolUnreachable:
                    if time.monotonic() > give_up:
                        raise
        if reply.get("state") == "unknown":
            print(
                "[jupyter-gpu] the pool's scheduler restarted and forgot this cell's request; "
                "asking again.",
                flush=True,
            )
            return submit()
        return reply

    def ensure_session(
        self,
        spec: dict,
        notebook: str | None,
        cell: str | None,
        on_wait: Callable[[dict], None],
        deadline: float | None,
        fresh: bool = False,
        restore: str | None = None,
    ) -> RemoteSession:
        if not fresh and self.session is not None:
            return self.session
        status = self.request_lease(spec, notebook, cell, on_wait, deadline, restore=restore)
        session = RemoteSession(lease=dict(status["leases"][0]), fresh=fresh)
        session.restored = status.get("restored")
        if restore and session.restored is not None:
            self.continues[session.id] = restore  # objects of the old session live on in this one
        if not fresh:
            self.session = session
        return session

    def release(
        self, session: RemoteSession | None = None, reason: str = "released by its owner"
    ) -> bool:
        session = session or self.session
        if session is None:
            return False
        if session is self.session:
            self.session = None
        self.ended_sessions[session.id] = (
            f"it was a throwaway session ({reason})" if session.fresh else f"it was {reason}"
        )
        if session.comm is not None:
            try:
                self.call(session.comm.close, timeout=2)
            except Exception:  # noqa: BLE001 - the session may be gone already: the lease is released anyway
                pass
        # with the lease's secret: the proof of ownership even when the pool no longer accepts this
        # kernel's token (a revoked JupyterHub token, the Hub down)
        extra = {"secret": session.secret} if session.secret else {}
        reply = self.scheduler_call(
            "gpu_release", lease=session.id, user=self.user, reason=reason, **extra
        )
        return bool(reply.get("released"))

    def lease_end_reason(self, lease: str, wait: float = 3.0) -> str:
        """Why a lease ended, waiting briefly for the worker's report to reach the broker."""
        deadline = time.monotonic() + wait
        while True:
            info = self.scheduler_call("gpu_lease_info", lease=lease, user=self.user)
            if info.get("state") == "ended" or time.monotonic() > deadline:
                return info.get("end_reason") or "the session process stopped answering"
            time.sleep(0.1)

    def ended_lease(self, lease: str, wait: float = 3.0) -> dict:
        """The broker's record of a lease that just ended, waiting up to ``wait`` s for the worker's
        report (and, while the session's variables are being saved to host memory, until that is
        done)."""
        deadline = time.monotonic() + wait
        offload_deadline = time.monotonic() + config.get_seconds("offload-timeout") + 5
        while True:
            info = self.scheduler_call("gpu_lease_info", lease=lease, user=self.user)
            # its variables are being saved
            pending = (info.get("offload") or {}).get("state") == "pending"
            if (info.get("state") == "ended" and not pending) or time.monotonic() > (
                offload_deadline if pending else deadline
            ):
                return info
            time.sleep(0.1)

    # ------------------------------------------------------------------ running a cell
    def local_transfer(self, session: RemoteSession) -> bool:
        """Whether this kernel and ``session`` pass large values through pipes
        (``common/local_transfer.py``): asked once per session, by each side reading a small probe
        of the other's (same machine, same account, ``/proc`` readable), so a setting that would
        fail mid-cell is found before it matters."""
        if session.local is None:
            session.local = False
            if config.get("local-transfer", True) and local_transfer.available():
                sending = local_transfer.Sending()
                try:
                    reply = self.session_call(session, "ping", probe=local_transfer.probe(sending))
                    session.local = bool(reply.get("probe_ok")) and local_transfer.check_probe(
                        reply.get("probe")
                    )
                except Exception as exc:  # noqa: BLE001 - the comm always works
                    log.debug("same-host transfer probe of %s failed: %s", session.address, exc)
                finally:
                    sending.close()
        return session.local

    def session_call(
        self, session: RemoteSession, op: str, timeout: float | None = 10, **kwargs: Any
    ) -> dict:
        """One call to the session (with its secret), waited for on the client loop."""

        async def go() -> dict:
            r = rpc(
                session.address,
                deserializers=None,
                deserialize=False,
                connection_args=self.connection_args,
            )
            try:
                return await asyncio.wait_for(
                    getattr(r, op)(secret=session.secret, **kwargs), timeout
                )
            finally:
                await r.close_rpc()

        return self.call(go, timeout=None if timeout is None else timeout + 5)

    def start_execute(
        self, session: RemoteSession, payload: dict, sink: Callable[[Any], None]
    ) -> Any:
        """Start the cell on the client loop; every message (and finally the done reply) goes to
        ``sink``. Large inputs go through pipes when the session can read them; this returns once
        the session has read them (or the cell ended), so the kernel's objects may change again
        (``--async`` cells)."""
        sending = local_transfer.Sending()
        if self.local_transfer(session):
            payload = {
                **payload,
                "local": True,
                "inputs": {
                    name: local_transfer.pack(v, sending)
                    for name, v in (payload.get("inputs") or {}).items()
                },
            }

        async def run() -> None:
            started = False
            try:
                comm = session.comm
                try:
                    if comm is None or comm.closed():
                        raise CommClosedError("not connected")
                    await comm.write(
                        {"op": "execute", "reply": True, "secret": session.secret, **payload}
                    )
                except (CommClosedError, OSError):
                    # a fresh connection; failing that, the session is gone and the cell never
                    # started. Ask the broker first: a session whose lease ended (moved to host
                    # memory, timed out) listens no more, and connecting would retry its closed port
                    # for the whole connect timeout
                    ended = await self._lease_ended(session.id)
                    if ended is not None:
                        session.comm = None
                        sink({"op": "lost", "error": ended, "started": False})
                        return
                    try:
                        session.comm = comm = await connect(
                            session.address, deserialize=False, timeout=5, **self.connection_args
                        )
                    except (CommClosedError, OSError) as exc:
                        session.comm = None
                        sink({"op": "lost", "error": str(exc), "started": False})
                        return
                    await comm.write(
                        {"op": "execute", "reply": True, "secret": session.secret, **payload}
                    )
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

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            sending.wait()
        # stop sending: the session refuses the cell (its inputs are incomplete)
        except KeyboardInterrupt:
            sending.close()
        return future

    async def _lease_ended(self, lease: str) -> str | None:
        """Why the broker ended ``lease``, or None while it stands (or when the broker does not
        answer)."""
        token = pool_token(self.embedded)
        kwargs = {"token": token} if token else {}
        try:
            scheduler = self.client.scheduler
            assert scheduler is not None  # connected
            info = await asyncio.wait_for(
                scheduler.gpu_lease_info(lease=lease, user=self.user, **kwargs), 5
            )
        except Exception:  # noqa: BLE001 - then the connection attempt says what happened
            return None
        return (
            (info.get("end_reason") or "its lease ended") if info.get("state") == "ended" else None
        )

    def interrupt(self, session: RemoteSession) -> None:
        async def go() -> None:
            r = rpc(session.address, connection_args=self.connection_args)
            try:
                await asyncio.wait_for(r.interrupt(secret=session.secret), 2)
            finally:
                await r.close_rpc()

        try:
            self.call(go, timeout=3)
        except Exception as exc:  # noqa: BLE001 - an interrupt is best effort: the kill after the grace period follows
            log.debug("interrupt did not reach %s: %s", session.address, exc)

    def pull(self, name: str) -> Any:
        from distributed.protocol import deserialize

        if self.session is None:
            raise GpuPoolError("This kernel has no GPU session yet: run a %%gpu cell first.")
        session = self.session
        reply = self.session_call(
            session, "pull", timeout=None, name=name, local=self.local_transfer(session)
        )
        if reply.get("error"):
            raise GpuPoolError(f"%gpu pull {name}: {reply['error']}")
        return deserialize(*local_transfer.unpack(reply["data"]))


def log_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The client loop's unhandled errors, in jupyter-gpu's log (at debug) instead of stderr.

    Why: the loop runs in the kernel, whose stderr is the running cell's output. A future
    abandoned by an interrupt or a timeout (a call the main thread stopped waiting for), whose
    comm then failed, made asyncio print ``Future exception was never retrieved ...
    KeyError(71)`` into whatever cell ran next."""
    exc = context.get("exception")
    log.debug(
        "client loop: %s",
        context.get("message"),
        exc_info=(type(exc), exc, exc.__traceback__) if exc else None,
    )


def resolve_address(address: str | None, keep: bool = False) -> tuple[str, bool]:
    """The pool to join: the given address, ``JUPYTER_GPU_SCHEDULER``, or this user's embedded
    pool."""
    if address:
        return address, False
    explicit = os.environ.get(SCHEDULER_ENV)
    if explicit:
        return explicit, False
    from jupyter_gpu.pool.embedded import ensure_embedded_pool

    return ensure_embedded_pool(keep=keep), True
