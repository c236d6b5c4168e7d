"""The session's one link to the broker: lease state after each cell and a scale-out run's metrics.

Why a separate object: these notes are fire-and-forget (one-way messages, sent from the I/O thread's loop)
so the broker's bookkeeping never sits on a cell's path, and every rpc the session makes speaks its
worker's TLS. The session holds no other reference to the pool's control plane.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


class SchedulerLink:
    """Calls to the scheduler's broker handlers from a session, on the session's I/O loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connection_args: dict[str, Any]):
        self.loop = loop
        self.connection_args = connection_args
        self.address: str | None = None
        self.lease: str | None = None
        self._rpc: Any = None

    def bind(self, address: str | None, lease: str) -> None:
        """The broker to tell, and the lease this session holds (set once, at ``assign``)."""
        self.address, self.lease = address, lease

    def _scheduler(self) -> Any:
        if self._rpc is None:
            from distributed.core import rpc

            self._rpc = rpc(self.address, connection_args=self.connection_args)
        return self._rpc

    async def call(self, op: str, **kwargs: Any) -> Any:
        """Await one broker handler (on the I/O loop); None when the session has no broker."""
        if not self.address:
            return None
        return await getattr(self._scheduler(), op)(**kwargs)

    def tell_lease_state(self, **kwargs: Any) -> None:
        """Fire-and-forget ``gpu_lease_state`` (cell running/idle, peak memory), from any thread."""
        if not self.address or not self.lease:
            return

        async def send() -> None:
            try:
                # one-way: the broker's bookkeeping must never sit on a cell's path
                await self._scheduler().gpu_lease_state(lease=self.lease, reply=False, **kwargs)
            except Exception as exc:
                log.debug("could not tell the broker: %s", exc)

        asyncio.run_coroutine_threadsafe(send(), self.loop)
