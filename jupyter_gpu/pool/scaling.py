"""Growing and shrinking a pool that owns a cluster manager (the embedded pool's SpecCluster).

Manual scaling sets a worker count. Adaptive scaling keeps the count between a minimum and a maximum,
driven by the broker rather than by Dask's task load (GPU pools have no tasks): it adds a worker while
requests wait for capacity and retires a worker that has held no lease for ``idle`` seconds. Scaling down
always retires workers without leases first, so nobody's session is killed to shrink the pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


class PoolScaler:
    """The broker's ``scaler``: ``await scaler(n=...)`` or ``await scaler(minimum=..., maximum=...)``."""

    def __init__(self, cluster: Any, broker: Any, max_workers: int | None, idle: float = 60.0,
                 interval: float = 2.0):
        self.cluster, self.broker = cluster, broker
        self.max_workers = max_workers  # None: no hardware bound (virtual GPUs)
        self.idle, self.interval = idle, interval
        self.bounds: tuple[int, int] | None = None
        self._task: asyncio.Task | None = None
        self._idle_since: dict[str, float] = {}

    async def __call__(self, n: int | None = None, minimum: int | None = None,
                       maximum: int | None = None) -> dict:
        if n is None and (minimum is None or maximum is None):
            return {"error": "give a worker count (n), or adaptive bounds (minimum and maximum)"}
        top = n if n is not None else maximum
        low = n if n is not None else minimum
        if low < 1 or top < low:
            return {"error": f"worker counts must satisfy 1 <= minimum <= maximum (got {low}..{top})"}
        if self.max_workers is not None and top > self.max_workers:
            return {"error": f"this machine has {self.max_workers} GPU(s); the embedded pool cannot grow past "
                             "that. Add machines with `jupyter-gpu worker ADDRESS`."}
        if n is not None:
            self.stop_adaptive()
            await self.scale_to(n)
            return {"workers": len(self.cluster.worker_spec), "adaptive": None}
        self.bounds = (minimum, maximum)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._adapt_forever())
        await self.scale_to(min(max(len(self.cluster.worker_spec), minimum), maximum))
        return {"workers": len(self.cluster.worker_spec), "adaptive": {"minimum": minimum, "maximum": maximum}}

    def stop_adaptive(self) -> None:
        self.bounds = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _names_by_address(self) -> dict[str, str]:
        sched = self.cluster.scheduler
        return {addr: str(ws.name) for addr, ws in sched.workers.items()}

    def _idle_workers(self) -> list[str]:
        """Names of workers whose GPUs hold no lease, the longest idle first."""
        busy = {ls.worker for ls in self.broker.leases.values()}
        names = self._names_by_address()
        now = time.monotonic()
        for addr in names:
            if addr in busy:
                self._idle_since.pop(addr, None)
            else:
                self._idle_since.setdefault(addr, now)
        idle = sorted((since, addr) for addr, since in self._idle_since.items() if addr in names)
        return [names[addr] for _, addr in idle]

    async def scale_to(self, target: int) -> None:
        current = len(self.cluster.worker_spec)
        if target > current:
            self.cluster.scale(target)
            await self.cluster
        elif target < current:
            idle = [w for w in self._idle_workers() if w in self.cluster.worker_spec]
            retire = idle[: current - target]
            if len(retire) < current - target:
                log.info("scale to %d: only %d idle worker(s) can be retired now", target, len(retire))
            if retire:
                await self.cluster.scale_down(retire)
        self.broker.scheduler.log_event("jupyter-gpu-audit", {"action": "scaled", "workers": target})

    async def _adapt_forever(self) -> None:
        while self.bounds is not None:
            await asyncio.sleep(self.interval)
            low, high = self.bounds
            current = len(self.cluster.worker_spec)
            waiting = [r for r in self.broker.queue if r.state == "queued"]
            if waiting and current < high:
                await self.scale_to(current + 1)
                continue
            now = time.monotonic()
            long_idle = [w for w in self._idle_workers()
                         if now - self._idle_since.get(self._address(w), now) > self.idle]
            if not waiting and long_idle and current > low:
                await self.scale_to(current - 1)

    def _address(self, name: str) -> str:
        return next((addr for addr, n in self._names_by_address().items() if n == name), "")
