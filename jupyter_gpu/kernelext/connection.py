"""A kernel's link to the pool: its Dask client, the broker's handlers, its leases and remote
session.

All network I/O runs on the Dask client's event loop thread; the kernel's main thread waits for it
(``call``), where interrupts land. A broker's refusal raises its ``CallError``
(``common/refusals.py``); a scheduler that does not answer raises ``PoolUnreachable``. The calls to
sessions themselves (running a cell, interrupting it, pulling a variable) are
``session_calls.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, cast

from distributed import Client
from distributed.comm import CommClosedError

from jupyter_gpu.common import config, rejoin
from jupyter_gpu.common.protocol import SCHEDULER_ENV
from jupyter_gpu.common.refusals import Refused
from jupyter_gpu.common.security import check_address, client_security, connection_args
from jupyter_gpu.common.units import format_bytes
from jupyter_gpu.errors import CellTimeout, GpuPoolError, PoolUnreachable, RequestRefused
from jupyter_gpu.pool.discovery import address_reachable, pool_token, user_name

if TYPE_CHECKING:
    from tornado.platform.asyncio import BaseAsyncIOLoop

log = logging.getLogger(__name__)

# the calls that act on or read one user's work: the user's name and token go with them
_TOKEN_OPS = frozenset(
    {
        "gpu_request",
        "gpu_wait",
        "gpu_cancel",
        "gpu_release",
        "gpu_lease_info",
        "gpu_scale",
        "gpu_run_update",
    }
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


class PoolClient(Client):
    """A kernel's Dask client, which finds a restarted scheduler within a second or so of it
    answering: while it reconnects, it knocks in short rounds (``common/rejoin.py``) before Dask's
    own connection attempt, whose backoff grows to minutes over a long restart."""

    _rejoining = False

    async def _reconnect(self) -> None:
        self._rejoining = True
        try:
            await super()._reconnect()
        finally:
            self._rejoining = False

    async def _ensure_connected(self, timeout: float | None = None) -> None:
        if self._rejoining and self.scheduler is not None and timeout is not None:
            await rejoin.until_answering(
                str(self.scheduler.address),
                timeout,
                self.connection_args,
                wanted=lambda: self.status == "connecting",
            )
        await super()._ensure_connected(timeout=timeout)


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
        connect_timeout = config.get_seconds("connect-timeout")
        if not embedded and not address_reachable(address, timeout=1.0):
            print(
                f"[jupyter-gpu] the pool's scheduler at {address} is not answering; waiting for it "
                f"(up to {connect_timeout:.0f} s, jupyter-gpu.connect-timeout) ...",
                flush=True,
            )
        self.client = PoolClient(
            address,
            set_as_default=False,
            name=f"jupyter-gpu {self.user}",
            timeout=connect_timeout,
            security=self.security,
        )
        # the client reconnects by itself when its scheduler goes away, for as long as its
        # ``timeout`` (then it closes for good); a restarting pool's workers keep their sessions
        # for ``worker.reconnect-timeout``, so this kernel, which owns some of them, waits as long
        self.client._timeout = max(connect_timeout, restart_wait())
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

    def scheduler_call(self, op: str, *, wait_for_restart: bool = True, **kwargs: Any) -> Any:
        """One broker handler, answered; a scheduler that does not answer is a ``PoolUnreachable``
        saying so (a cell's session lives on its worker and is not affected).

        While this kernel's client has lost the scheduler (it is restarting), the call first waits
        for it, saying so in the cell (:meth:`_await_scheduler`); ``wait_for_restart=False`` is
        for checks that must not hold the cell up: they get the ``PoolUnreachable`` at once."""
        if wait_for_restart:
            self._await_scheduler()
        elif self.scheduler_away():
            raise PoolUnreachable(f"The pool's scheduler at {self.address} is not answering.")
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

    def scheduler_away(self) -> bool:
        """Whether this kernel's client has lost its scheduler (it is reconnecting, or gave
        up)."""
        return self.client.status not in ("running", "newly-created")

    def _await_scheduler(self) -> None:
        """Return once this kernel's client is connected to its scheduler. While it is not (the
        pool's scheduler is restarting), say so in the cell at once and wait for it, up to
        ``worker.reconnect-timeout`` (what the pool's workers wait, keeping their sessions);
        interrupting stops the wait. Past that, or once the client gave up, a
        ``PoolUnreachable`` says what to do.

            Why: a call made while the scheduler is away blocks on Dask's connect timeout and
            fails, and a cell that needs the broker (a new session) showed nothing for minutes."""
        if not self.scheduler_away():
            return
        window = restart_wait()
        print(
            f"[jupyter-gpu] the pool's scheduler at {self.address} is not answering; waiting for "
            f"it (up to {window:.0f} s; interrupt to stop waiting). Sessions already on the pool "
            "keep running and keep their variables.",
            flush=True,
        )
        deadline = time.monotonic() + window
        while self.scheduler_away():
            if self.client.status in ("closing", "closed") or time.monotonic() > deadline:
                raise PoolUnreachable(
                    f"The pool's scheduler at {self.address} did not come back within "
                    f"{window:.0f} s. Ask the pool's administrator whether it is running; once it "
                    "is, run `%gpu connect` to join it again."
                )
            time.sleep(0.2)
        print("[jupyter-gpu] the pool's scheduler is back.", flush=True)

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
        extra: dict[str, Any] = {"restore": restore} if restore else {}

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

        try:
            status = submit()
        except Refused as exc:
            raise RequestRefused(f"The pool refused this %%gpu cell at once. {exc}") from None
        # the request's own secret withdraws it even once the pool stops accepting this kernel's
        # token while it waits (a revoked JupyterHub token): nothing is left granted to a cell
        # that will not run. A resubmission after a scheduler restart brings a new one.
        secret = status.get("secret")
        try:
            while status["state"] in ("queued", "starting"):
                on_wait(status)
                if deadline is not None and time.monotonic() > deadline:
                    self._withdraw(status["id"], secret)
                    raise CellTimeout(
                        f"the request {status['id']} was still waiting when --timeout ran out "
                        f"({status.get('reason')}); it was withdrawn from the queue"
                    )
                status = self._wait_through_restarts(status, submit)
                secret = status.get("secret", secret)
        except KeyboardInterrupt:
            if status.get("id"):
                self._withdraw(status["id"], secret)
            raise
        except Refused as exc:
            if status.get("id"):
                self._withdraw(status["id"], secret)
            raise RequestRefused(f"The pool refused this %%gpu cell at once. {exc}") from None
        if status["state"] == "refused":
            raise RequestRefused(f"The pool refused this %%gpu cell at once. {status['reason']}")
        if status["state"] != "granted":
            raise GpuPoolError(
                f"The GPU request {status['id']} ended without a grant: {status['reason']}"
            )
        on_wait(status)
        return status

    def _withdraw(self, request: str, secret: str | None) -> None:
        """Cancel a request this kernel stops waiting for (it may have left the queue meanwhile),
        with its secret as the proof of ownership."""
        extra: dict[str, Any] = {"secret": secret} if secret else {}
        with contextlib.suppress(Refused):
            self.scheduler_call("gpu_cancel", id=request, user=self.user, **extra)

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
        extra: dict[str, Any] = {"secret": session.secret} if session.secret else {}
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


def restart_wait() -> float:
    """How long a kernel waits for a pool's scheduler that went away (it is restarting): as long
    as the pool's workers keep their sessions for it (``worker.reconnect-timeout``)."""
    return config.get_seconds("worker.reconnect-timeout")


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
    from jupyter_gpu.pool.launcher import ensure_embedded_pool

    return ensure_embedded_pool(keep=keep), True
