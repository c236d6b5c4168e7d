"""What the pool's processes listen on: one comm port each, on the host they were given, and no
HTTP server unless it is configured.

Why: Dask's ``Scheduler`` and ``Worker`` always start an HTTP server next to their comm port
(health, Prometheus metrics, info pages that list workers, addresses, logs and call stacks; the
scheduler's on port 8787), outside Dask's TLS and without authentication, and ``dashboard=False``
turns off only the bokeh dashboard. A ``Nanny`` or ``Worker`` given no host listens on every
interface. Neither is what someone who runs ``jupyter-gpu pool up --host H`` asked for, and on an
embedded pool the HTTP pages would let any local account read what the pool is doing. So:

- :class:`PoolScheduler` and :class:`PoolWorker` start Dask's HTTP server only when ``jupyter-gpu.http`` is
  true (``--http`` on ``jupyter-gpu pool up`` and ``jupyter-gpu worker``); it then listens on the process's
  own host, as Dask does by default;
- :func:`worker_host`: the host a ``jupyter-gpu worker`` listens on when not given ``--host``: the local
  address through which this machine reaches its scheduler (the one the scheduler will call back on),
  rather than every interface;
- :func:`quiet_reachability_probes`: kernels and the panel check that a pool is up with a bare TCP connect
  (``discovery.address_reachable``); on a TLS scheduler each would be logged as a failed handshake, so
  those (and only those: a peer that closes before sending anything) go to the debug level.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from distributed import Scheduler

from jupyter_gpu.common import config, no_pickle
from jupyter_gpu.worker.dask_worker import GpuDaskWorker

log = logging.getLogger(__name__)


def http_enabled() -> bool:
    """Whether this pool's scheduler and workers serve Dask's HTTP routes (``jupyter-gpu.http``)."""
    return bool(config.get("http", False))


if TYPE_CHECKING:
    from distributed.node import ServerNode as _HttpBase  # what the mixin is mixed into
else:
    _HttpBase = object


class _HttpWhenConfigured(_HttpBase):
    """Replaces ``Node.start_http_server``: a no-op unless :func:`http_enabled` (see the module
    docstring)."""

    def start_http_server(
        self, routes: Any, dashboard_address: Any, default_port: int = 0, ssl_options: Any = None
    ) -> None:
        if http_enabled():
            super().start_http_server(
                routes,
                dashboard_address,
                default_port=default_port,
                ssl_options=ssl_options,
            )
            log.info(
                "%s serves Dask's HTTP routes on port %s (jupyter-gpu.http)",
                type(self).__name__,
                self.http_server.port,  # type: ignore[attr-defined]  # Dask sets it on tornado's server
            )
        else:
            log.debug("%s: no HTTP server (jupyter-gpu.http is off)", type(self).__name__)


class PoolScheduler(_HttpWhenConfigured, Scheduler):
    """The pool's Dask scheduler: its comm port only (plus Dask's HTTP routes when configured).

    ``in_process_listener``: also listen on an ``inproc://`` address, which only code in this
    process can reach, and give it as the scheduler's ``external_address``: what a
    ``SpecCluster`` that owns this scheduler (``pool/cluster_manager.py``) connects its own comm
    to. In a pool that checks tokens the gate (``broker/gate.py``) lets that comm use Dask's
    cluster API (worker status, retiring workers), which it closes to everyone else.

    ``leave_workers``: when it stops, leave its workers running instead of telling each to close
    (:meth:`close`): a team pool's scheduler that stops is being restarted (systemd, a supervisor,
    Ctrl-C), and its workers keep their sessions and wait for it (``worker/dask_worker.py``). A
    pool that owns its workers (the embedded pool, a cluster manager) closes them itself first.
    """

    def __init__(
        self,
        *args: Any,
        in_process_listener: bool = False,
        leave_workers: bool = False,
        **kwargs: Any,
    ):
        no_pickle.install()  # before it listens: nothing it reads runs code (common/no_pickle.py)
        self.leave_workers = leave_workers
        if in_process_listener:
            protocol = (kwargs.get("protocol") or "tcp").replace("://", "")
            kwargs.update(
                host=[kwargs.get("host"), None],
                port=[kwargs.get("port", 0), None],
                protocol=[protocol, "inproc"],
            )
            kwargs.pop("interface", None)
        super().__init__(*args, **kwargs)
        # checked four times per ttl, not once: a lost machine is given up within 1.25 ttl
        if self.worker_ttl:
            from tornado.ioloop import PeriodicCallback

            self.periodic_callbacks["worker-ttl"] = PeriodicCallback(
                self.check_worker_ttl, self.worker_ttl * 250
            )

    async def check_worker_ttl(self) -> None:
        """As Dask's (``distributed.scheduler.worker-ttl``), except that a worker that missed its
        heartbeats is removed instead of restarted through its nanny.

                Why: a GPU nanny answers nobody but its own worker (``worker/nanny.py``), so Dask's
                restart fails (and raises in this periodic callback, leaving the worker in place);
                and the nanny of a machine cut off from the network does not answer either, so the
                pool would wait ``distributed.comm.timeouts.connect`` before giving the worker up.
                Its sessions are lost either way; removing it at once ends their leases, which
                kernels then treat as lost (a ``--workers`` run resumes elsewhere)."""
        from time import time

        from distributed.scheduler import heartbeat_interval

        now = time()
        assert self.worker_ttl is not None  # the callback runs only with a ttl (see __init__)
        ttl = max(self.worker_ttl, 10 * heartbeat_interval(len(self.workers)))
        for ws in list(self.workers.values()):
            if now - ws.last_seen > ttl:
                log.warning(
                    "worker %s (%s) sent no heartbeat for %.0f s: giving it up",
                    ws.address,
                    ws.name,
                    now - ws.last_seen,
                )
                await self.remove_worker(ws.address, stimulus_id=f"check-worker-ttl-{now}")

    async def close(self, timeout: float | None = None, reason: str = "unknown") -> None:
        """As Dask's, except that with ``leave_workers`` the workers are let go rather than told to
        close: Dask's ``close`` sends each ``{"op": "close"}`` (ending their sessions).

        First nothing new connects (a worker that notices must not register with a scheduler that
        is going away), then each worker's stream is dropped without a word, which the worker reads
        as its scheduler restarting; they are not removed either (removing ends their leases in the
        audit store as lost, which they are not: the next scheduler adopts them)."""
        from distributed.core import Status

        if self.leave_workers and self.status not in (Status.closing, Status.closed):
            self._stop_listeners()
            streams = list(self.stream_comms.values())
            self.stream_comms.clear()
            for stream in streams:
                stream.abort()
            if streams:
                log.warning(
                    "the pool's scheduler is stopping (%s): its %d worker(s) keep their sessions "
                    "and wait for a scheduler at %s (worker.reconnect-timeout)",
                    reason,
                    len(streams),
                    self.address,
                )
        await super().close(timeout=timeout, reason=reason)

    def remove_client(self, client: str, stimulus_id: str | None = None) -> None:
        """As Dask's, except while a ``leave_workers`` scheduler stops: its kernels' connections
        drop because it is going away, not because the kernels went (the broker would end their
        leases and kill their sessions); they reconnect to the next scheduler, which adopts
        them."""
        from distributed.core import Status

        if self.leave_workers and self.status in (Status.closing, Status.closed):
            return
        super().remove_client(client, stimulus_id=stimulus_id)

    async def start_unsafe(self) -> PoolScheduler:
        await super().start_unsafe()
        local = [
            li.contact_address
            for li in self.listeners
            if li.contact_address.startswith("inproc://")
        ]
        if local:
            # the first listener (tcp/tls) stays the scheduler's address
            self.external_address = local[0]
        return self


class PoolWorker(_HttpWhenConfigured, GpuDaskWorker):
    """The pool's GPU worker (``GpuDaskWorker``): its comm port only (plus HTTP routes when
    configured), reading no pickles (``common/no_pickle.py``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        no_pickle.install()
        super().__init__(*args, **kwargs)


class _ProbeFilter(logging.Filter):
    """Drops Dask's "TLS handshake failed ... UNEXPECTED_EOF" warnings: a connect-and-close probe,
    not an attack; every other handshake failure (no certificate, another CA, plain TCP) is still a
    warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and "TLS handshake failed" in str(record.msg):
            text = record.getMessage()
            if (
                "UNEXPECTED_EOF_WHILE_READING" in text
                or "EOF occurred in violation of protocol" in text
            ):
                log.debug("%s", text)
                return False
        return True


def quiet_reachability_probes() -> None:
    """Install :class:`_ProbeFilter` on Dask's TCP/TLS comm logger (once per process)."""
    logger = logging.getLogger("distributed.comm.tcp")
    if not any(isinstance(f, _ProbeFilter) for f in logger.filters):
        logger.addFilter(_ProbeFilter())


def worker_host(scheduler_address: str) -> str:
    """The local IP address this machine uses to reach ``scheduler_address`` (127.0.0.1 for a local
    scheduler): where a worker listens when it is not told, so that it is reachable by its scheduler
    and by nothing on the machine's other interfaces."""
    from distributed.comm import get_address_host_port
    from distributed.utils import get_ip

    host, port = get_address_host_port(scheduler_address)
    return get_ip(host, port)
