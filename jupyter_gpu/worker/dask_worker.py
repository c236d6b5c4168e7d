"""The Dask worker of a GPU pool: a ``distributed.Worker`` that outlives a restart of its scheduler.

Why: a plain Dask worker closes when its connection to the scheduler breaks (it cannot keep task
state across schedulers), and its session processes, which die with it, would take every user's
variables along. A GPU worker runs no Dask tasks: its state is its sessions and their host-memory
copies, which stay valid when the scheduler comes back. So this worker waits for the scheduler
instead, registers again at the same address when it answers, and tells its GPU plugin
(``reconnected``), which reports its live sessions and copies so the restarted broker adopts them.
It gives up after ``worker.reconnect-timeout`` and closes as a plain worker would (``jupyter-gpu
worker`` then exits non-zero so a supervisor restarts it).

A scheduler that stops cleanly (SIGTERM from systemd or a supervisor, Ctrl-C) is the same event
as one that was killed: an administrator restarting the pool. Dask's ``Scheduler.close`` tells every
worker ``{"op": "close", "reason": "scheduler-close"}`` first, which would end every session; so
that one order is read as "the scheduler is going away" and the worker waits for it as above. An
order to close this worker in particular (``close_worker``, ``retire_workers``, removal) still
closes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from distributed import Worker
from distributed.batched import BatchedSend
from distributed.core import Status

if TYPE_CHECKING:
    from distributed.core import ErrorMessage

from jupyter_gpu.common import config, poolkey, rejoin
from jupyter_gpu.common.handlers import closed, is_closed, is_declared
from jupyter_gpu.common.protocol import NANNY_KEY_ENV, STARTUP_PROOF

log = logging.getLogger(__name__)

# the reason Dask's ``Scheduler.close`` gives every worker it tells to close as it stops
SCHEDULER_STOPPING = "scheduler-close"


class GpuDaskWorker(Worker):
    """See the module docstring. Start it with ``Nanny(..., worker_class=GpuDaskWorker)``.

    It also keeps Dask's generic worker API closed (``run``, ``run_coroutine``, ``plugin-add``,
    task data, inbound streams...): a GPU worker runs no tasks, and in a pool shared by several
    people each of those would run code as the pool's account. What stays open is ``identity``
    and the GPU plugin's handlers, which ask for the pool key. It proves it holds the pool key
    when it registers (its start-up information) and with each heartbeat, without sending the key
    (``poolkey.proof``), and asks its nanny to close with the nanny's key.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self._nanny_key = os.environ.pop(NANNY_KEY_ENV, None)
        super().__init__(*args, **kwargs)
        self._close_generic_api()

    def _close_generic_api(self) -> None:
        """Everything but ``identity`` and the handlers jupyter-gpu declares (``@handler``)."""
        for op, fn in list(self.handlers.items()):
            if op != "identity" and not is_closed(fn) and not is_declared(fn):
                self.handlers[op] = _refused(op)
        self.stream_handlers["close"] = self._close_ordered

    async def plugin_add(self, *args: Any, **kwargs: Any) -> Any:
        """As Dask's, and the handlers a plugin adds are closed too, but for jupyter-gpu's own: the
        scheduler hands every worker Dask's shuffle plugin when it registers, which opened
        ``shuffle_receive`` and ``shuffle_inputs_done`` to anyone (a GPU worker runs no shuffle)."""
        result = await super().plugin_add(*args, **kwargs)
        self._close_generic_api()
        return result

    def _pool_key(self) -> str | None:
        return poolkey.read_key(poolkey.key_path(self.scheduler.address))

    async def get_startup_information(self) -> dict:
        info = await super().get_startup_information()
        info[STARTUP_PROOF] = poolkey.proof(self._pool_key(), "register", str(self.contact_address))
        return info

    async def close(  # type: ignore[override]  # Dask's Worker.close differs from its bases' too
        self,
        timeout: float = 30,
        executor_wait: bool = True,
        nanny: bool = True,
        reason: str = "worker-close",
    ) -> str | None:
        """As Dask's, but a ``GpuNanny`` is asked with its key (it answers nobody else)."""
        if self._nanny_key is None:  # a plain Dask nanny (the embedded pool's): Dask's own way
            return await super().close(
                timeout=timeout, executor_wait=executor_wait, nanny=nanny, reason=reason
            )
        if (
            nanny
            and self.nanny
            and self.status not in (Status.closed, Status.closing, Status.failed, Status.init)
        ):
            try:
                # Dask types Worker.nanny as a Nanny; it holds the nanny's address
                async with self.rpc(self.nanny) as r:  # type: ignore[arg-type]
                    await r.close_gracefully(reason=reason, key=self._nanny_key)
            except Exception as exc:  # noqa: BLE001 - the nanny is gone already: close anyway
                log.debug("could not ask the nanny to close: %s", exc)
        return await super().close(
            timeout=timeout, executor_wait=executor_wait, nanny=False, reason=reason
        )

    async def _close_ordered(self, reason: str = "scheduler-close", **kwargs: Any) -> None:
        """The scheduler's ``close`` order on its stream. ``scheduler-close`` is what Dask's
        ``Scheduler.close`` sends every worker as it stops: a restart, which this worker waits for
        (the stream ends next, and ``handle_scheduler`` reconnects) unless it cannot reconnect at
        all. Any other reason is an order to close this worker: it closes."""
        if reason == SCHEDULER_STOPPING and self._can_reconnect():
            log.warning(
                "the scheduler at %s is stopping: keeping this worker's sessions and waiting for it "
                "to come back",
                self.scheduler.address,
            )
            return
        await self.close(reason=reason, **kwargs)

    def _can_reconnect(self) -> bool:
        """Whether this worker outlives its scheduler: it is up, holds no Dask task state, and
        ``worker.reconnect-timeout`` allows it."""
        return (
            self.status in (Status.running, Status.paused)
            and not self.data
            and not self.state.tasks
            and config.get_seconds("worker.reconnect-timeout") > 0
        )

    async def handle_scheduler(self, comm) -> None:  # noqa: ANN001 - Dask's own signature
        try:
            await self.handle_stream(comm)
        finally:
            try:
                again = await self._reconnect()
            except Exception:
                log.exception("reconnecting to the scheduler failed")
                again = False
            if not again:
                await self.close(reason="worker-handle-scheduler-connection-broken")

    async def heartbeat(self) -> None:
        """As Dask's, except that a scheduler that does not know this worker (it restarted) is
        joined again instead of being left."""
        if self.status not in (Status.running, Status.paused):
            return
        try:
            response = await self.scheduler.heartbeat_worker(
                address=self.contact_address,
                now=time.time(),
                metrics=await self.get_metrics(),
                executing={},
                extensions={},
                proof=poolkey.proof(self._pool_key(), "heartbeat", str(self.contact_address)),
            )
        except OSError:
            log.info("heartbeat: the scheduler at %s does not answer", self.scheduler.address)
            return
        if response.get("status") == "missing":
            log.warning("the scheduler does not know this worker (it restarted): registering again")
            self.batched_stream.close()  # handle_scheduler's reconnect takes over
            return
        self.scheduler_delay = response["time"] - time.time()
        self.periodic_callbacks["heartbeat"].callback_time = response["heartbeat-interval"] * 1000

    async def _reconnect(self) -> bool:
        """Wait for the scheduler (up to ``worker.reconnect-timeout``) and register again; True on
        success."""
        if not self._can_reconnect():
            return False
        timeout = config.get_seconds("worker.reconnect-timeout")
        log.warning(
            "lost the scheduler at %s; keeping this worker's sessions and reconnecting for up to "
            "%.0f s",
            self.scheduler.address,
            timeout,
        )
        self.batched_stream = BatchedSend(interval="2ms", loop=self.loop)
        started = time.monotonic()
        try:
            # knock in short rounds (Dask's own retries back off to minutes): registers within a
            # second or so of the scheduler answering
            await rejoin.until_answering(
                self.scheduler.address,
                timeout,
                self.connection_args,
                wanted=lambda: self.status in (Status.running, Status.paused),
            )
            left = max(1.0, timeout - (time.monotonic() - started))
            await asyncio.wait_for(self._register_with_scheduler(), left)
        except Exception as exc:  # noqa: BLE001 - gone for good, or refused: close as a plain worker would
            log.error(
                "could not reconnect to the scheduler at %s within %.0f s (%s): closing",
                self.scheduler.address,
                timeout,
                exc,
            )
            return False
        for plugin in list(self.plugins.values()):
            reconnected = getattr(plugin, "reconnected", None)
            if reconnected is not None:
                await reconnected()
        log.warning("reconnected to the scheduler at %s", self.scheduler.address)
        return True


def _refused(op: str) -> Any:
    def refused(**kwargs: Any) -> ErrorMessage:
        from distributed.core import error_message

        log.warning("refused %r on a GPU worker (it runs no Dask tasks)", op)
        return error_message(
            PermissionError(
                f"{op!r} is not available on a jupyter-gpu worker: it runs no Dask "
                "tasks (see docs/security.md)"
            )
        )

    return closed(refused)
