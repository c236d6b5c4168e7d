"""The Jupyter server's one link to the GPU pool: snapshot reads, scheduler calls, and the shared
poller.

Why one object per server: the panel may be open in many browser tabs (and many users behind one
JupyterHub-spawned server see only their own server), and each open panel holds a websocket. If
every socket polled the scheduler on its own, N tabs would cost N snapshots a second. Instead a
single asyncio task polls while at least one socket listens and fans the same JSON text out to all
of them; it stops when the last socket closes. NVML is never touched here: utilisation samples come
from the scheduler's broker, which gets them from the workers that own the GPUs.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from traitlets import Float, Unicode
from traitlets.config import Configurable

from jupyter_gpu.common.refusals import CallError

log = logging.getLogger(__name__)

Listener = Callable[[str], Any]


class GpuPanelConfig(Configurable):
    """Settings of the panel's server extension (``c.GpuPanelConfig.update_interval = 2`` in
    ``jupyter_server_config.py``)."""

    update_interval = Float(
        1.0,
        config=True,
        help="Seconds between two snapshots pushed to the panel's websocket (one poll shared by "
        "all sockets).",
    )
    snapshot_timeout = Float(
        5.0,
        config=True,
        help="Seconds to wait for the scheduler's gpu_snapshot before reporting the pool "
        "unreachable.",
    )
    start_timeout = Float(
        120.0,
        config=True,
        help="Seconds the Start button waits for the embedded pool, and Scale for workers to start "
        "or retire.",
    )
    hub_activity_interval = Float(
        60.0,
        config=True,
        help="Behind JupyterHub: seconds between two looks at the pool; when a kernel of this "
        "server runs a %%gpu cell (also --async and --workers) or waits for a GPU, its activity "
        "is posted to the Hub, so jupyterhub-idle-culler does not stop it. 0: never.",
    )
    user = Unicode(
        "",
        config=True,
        help="User name shown to the broker for cancel/scale; default: JUPYTER_GPU_USER, else "
        "JUPYTERHUB_USER (a server JupyterHub started), else the login name.",
    )
    token = Unicode(
        "",
        config=True,
        help="The user's pool token, sent with cancels to a pool that checks tokens (Dask config "
        "jupyter-gpu.token-file) or behind JupyterHub; default: JUPYTER_GPU_TOKEN from the "
        "server's environment, else the Hub's own JUPYTERHUB_API_TOKEN for a pool named by "
        "JUPYTER_GPU_SCHEDULER.",
    )


def server_user(config: GpuPanelConfig | None = None) -> str:
    """The pool user this Jupyter server acts for.

    It must be the same name the notebook kernels of this server use (the kernel extension reads
    ``JUPYTER_GPU_USER`` or the login name too), or the panel's "my sessions" and Cancel would
    not match.
    """
    if config is not None and config.user:
        return config.user
    try:
        from jupyter_gpu.pool.discovery import user_name
    except ImportError:  # pragma: no cover - the cluster package ships with this one
        return os.environ.get("JUPYTER_GPU_USER") or getpass.getuser()
    return user_name()


def server_token(config: GpuPanelConfig | None = None) -> str | None:
    """The pool token of ``server_user``, or None when this server has none.

    The server acts for its user as the user's kernels do, so it sends the same
    ``JUPYTER_GPU_TOKEN`` (the kernels inherit it from this server's environment), or behind
    JupyterHub the Hub's token of this server (``discovery.pool_token``). It goes to
    the scheduler only, never to the browser: the snapshot says just whether there is one
    (``token_set``).
    """
    if config is not None and config.token:
        return config.token
    from jupyter_gpu.pool.discovery import pool_token

    return pool_token()


def _discover_address() -> str | None:
    """Where the pool's scheduler is, per the project's discovery rules (env var, then embedded
    runtime file).

        Blocking: the embedded pool's liveness check is a TCP connect, so callers run it in a
        thread.
    """
    from jupyter_gpu.pool.discovery import pool_address

    return pool_address()


def _connection_args(address: str) -> dict:
    """The pool's TLS for this server's comm to the scheduler at ``address`` (client role, see
    ``jupyter_gpu.common.security.client_security``).

        This user's embedded pool is found with the certificate it made for itself, with nothing
        configured. Any other pool is read with the Jupyter server's own Dask config
        (``distributed.comm.tls.*``, e.g. the ``DASK_DISTRIBUTED__COMM__TLS__...`` variables it was
        started with), like the kernels it starts, so a server whose notebooks can use a TLS pool
        shows that pool in its panel too. A server without the certificate sees a TLS pool as
        unreachable, with Dask's TLS error as the reason.
    """
    from jupyter_gpu.common.security import client_security, connection_args

    return connection_args("client", client_security(address))


class PoolUnavailable(RuntimeError):
    """No pool is known to this server (no ``JUPYTER_GPU_SCHEDULER``, no live embedded pool)."""


class PoolLink:
    """Calls the pool's scheduler handlers and runs the one shared snapshot poller (see module
    docstring)."""

    def __init__(self, config: GpuPanelConfig):
        self.config = config
        self._rpc: Any = None
        self._rpc_address: str | None = None
        self._listeners: set[Listener] = set()
        self._poller: asyncio.Task | None = None
        self._last: tuple[float, str] | None = None  # (monotonic time, snapshot JSON text)
        # (monotonic time found, address) while it answers
        self._address: tuple[float, str] | None = None
        self.polls = 0  # how many snapshots the shared poller has fetched (tests read it)

    # ------------------------------------------------------------------ scheduler calls
    ADDRESS_RECHECK_S = 10.0

    async def address(self) -> str | None:
        """The pool's address, rediscovered at most every ``ADDRESS_RECHECK_S`` while it keeps
        answering.

                Discovery probes the embedded pool with a TCP connect; doing that on every 1 s poll
                would fill the scheduler's log with half-open connections. A failed call forgets the
                address (``_forget_address``), so a restarted or replaced pool is found at the next
                poll.
        """
        now = time.monotonic()
        if self._address is not None and now - self._address[0] < self.ADDRESS_RECHECK_S:
            return self._address[1]
        address = await asyncio.to_thread(_discover_address)
        self._address = (now, address) if address else None
        return address

    def _forget_address(self) -> None:
        self._address = None
        self._drop_rpc()

    def _scheduler(self, address: str) -> Any:
        """A Dask ``rpc`` to the scheduler, kept across calls so its comm is reused (one TCP
        connection)."""
        from distributed.core import rpc

        if self._rpc is None or self._rpc_address != address:
            self._drop_rpc()
            self._rpc = rpc(
                address,
                connection_args=_connection_args(address),
                timeout=self.config.snapshot_timeout,
            )
            self._rpc_address = address
        return self._rpc

    def _drop_rpc(self) -> None:
        if self._rpc is not None:
            old = self._rpc
            self._rpc = None
            self._rpc_address = None
            try:
                task = asyncio.get_running_loop().create_task(old.close_rpc())
                # never "never retrieved"
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
            except RuntimeError:  # no running loop (interpreter shutdown): drop the comms outright
                for comm in list(old.comms):
                    comm.abort()

    async def call(self, handler: str, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call a scheduler handler (``gpu_scale``, ``gpu_cancel``...); raise ``PoolUnavailable`` if
        no pool, and the broker's refusal as its ``CallError`` (``common/refusals.py``).

                ``timeout`` defaults to twice the snapshot timeout; scaling passes a longer one,
                since the broker answers only once workers have started or retired.
        """
        address = await self.address()
        if not address:
            raise PoolUnavailable("no GPU pool is running for this server")
        method: Callable[..., Awaitable[Any]] = getattr(self._scheduler(address), handler)
        try:
            return await asyncio.wait_for(
                method(**kwargs), timeout or self.config.snapshot_timeout * 2
            )
        except CallError:  # the broker's refusal: the pool and its comm are fine
            raise
        except Exception:
            self._forget_address()  # a dead comm or a gone pool must not poison the next call
            raise

    async def snapshot(self) -> dict:
        """The pool snapshot with ``state: "ok"``, or a state the panel can show instead.

        ``state`` is ``"no-pool"`` when nothing is running (the panel offers Start),
        ``"unreachable"`` with the error when an address is known but the scheduler does not
        answer. ``me`` is this server's user, so the panel can pick out "my sessions"
        without a second request; ``token_set`` whether this server has a pool token to send
        with cancels.
        """
        me = server_user(self.config)
        try:
            address = await self.address()
        except Exception as exc:  # noqa: BLE001 - a broken runtime file is shown, not raised
            log.warning("could not read the pool address: %s", exc)
            return {
                "state": "unreachable",
                "error": f"cannot read the pool address: {exc}",
                "me": me,
            }
        if not address:
            return {"state": "no-pool", "me": me}
        token = server_token(self.config)
        try:
            # with this server's user and token: the broker says whether they may see and cancel
            # everyone's work (``viewer``: a JupyterHub admin), for the panel's Cancel buttons
            snap = await asyncio.wait_for(
                self._scheduler(address).gpu_snapshot(
                    user=me, **({"token": token} if token else {})
                ),
                self.config.snapshot_timeout,
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes the "unreachable" state
            self._forget_address()
            error = str(exc) or type(exc).__name__
            log.info("pool at %s unreachable: %s", address, error)
            return {"state": "unreachable", "address": address, "error": error, "me": me}
        snap = dict(snap)
        snap["state"] = "ok"
        snap["me"] = me
        # a pool that checks tokens refuses this server's cancels without one: the panel says so up
        # front
        snap["token_set"] = server_token(self.config) is not None
        # the Scale button is shown only to users the pool lets scale (Dask config
        # jupyter-gpu.scale-users)
        pool = snap["pool"] = dict(snap.get("pool") or {})
        allowed = pool.get("scale_users")
        pool["can_scale"] = bool(pool.get("scalable")) and (allowed is None or me in allowed)
        return snap

    async def snapshot_text(self, max_age: float | None = None) -> str:
        """Snapshot as JSON text, reusing the poller's last one when it is younger than ``max_age``
        s."""
        if (
            max_age is not None
            and self._last is not None
            and time.monotonic() - self._last[0] <= max_age
        ):
            return self._last[1]
        text = json.dumps(await self.snapshot())
        self._last = (time.monotonic(), text)
        return text

    # ------------------------------------------------------------------ shared poller
    def subscribe(self, listener: Listener) -> None:
        """Add a websocket's send function; starts the shared poller if it is the first."""
        self._listeners.add(listener)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
        elif self._last is not None:
            # a new tab sees data at once, not one interval later
            self._send(listener, self._last[1])

    def unsubscribe(self, listener: Listener) -> None:
        """Remove a socket; the poller notices no listeners and ends after its current sleep."""
        self._listeners.discard(listener)

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    @property
    def polling(self) -> bool:
        return self._poller is not None and not self._poller.done()

    async def _poll_forever(self) -> None:
        log.debug("snapshot poller started")
        try:
            while self._listeners:
                started = time.monotonic()
                try:
                    text = await self.snapshot_text()
                    self.polls += 1
                except Exception:
                    log.exception("snapshot poll failed")
                    text = None
                if text is not None:
                    for listener in list(self._listeners):
                        self._send(listener, text)
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(0.05, self.config.update_interval - elapsed))
        finally:
            log.debug("snapshot poller stopped")

    def _send(self, listener: Listener, text: str) -> None:
        try:
            listener(text)
        except Exception:
            log.debug("dropping a snapshot listener that failed", exc_info=True)
            self._listeners.discard(listener)

    async def close(self) -> None:
        """Stop the poller and close the scheduler comm (server shutdown)."""
        self._listeners.clear()
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._rpc is not None:
            old, self._rpc, self._rpc_address = self._rpc, None, None
            await old.close_rpc()
