"""A GPU worker outlives its scheduler's restart (``worker/dask_worker.py``), on an in-process
scheduler and worker."""

from __future__ import annotations

import asyncio
import socket

import dask
import pytest
from distributed import Scheduler
from distributed.core import Status

from jupyter_gpu.worker.dask_worker import GpuDaskWorker

pytestmark = pytest.mark.inprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def until(predicate, timeout: float = 60.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def scheduler(port: int) -> Scheduler:
    # a plain Dask scheduler: its close() tells every worker {"op": "close", "reason":
    # "scheduler-close"}
    return Scheduler(host="127.0.0.1", port=port, dashboard_address="127.0.0.1:0")


def test_a_scheduler_that_stops_is_waited_for_and_an_order_to_close_this_worker_is_obeyed():
    """Bug fixed: a scheduler stopped with SIGTERM (Dask's ``Scheduler.close``) sent every worker
    "close", and the GPU worker closed with every session of its users. Now that order, given to
    all workers as the scheduler goes, is read as a restart; an order for this worker alone
    (``close_worker``, retiring) still closes it."""

    async def go() -> None:
        port = free_port()
        with dask.config.set({"jupyter-gpu.worker.reconnect-timeout": "60s"}):
            first = await scheduler(port)
            worker = await GpuDaskWorker(first.address, nthreads=1, host="127.0.0.1")
            try:
                assert await until(lambda: worker.address in first.workers)
                await first.close()
                await asyncio.sleep(1.0)
                assert worker.status == Status.running
                second = await scheduler(port)
                try:
                    assert await until(lambda: worker.address in second.workers)
                    second.close_worker(worker.address)
                    assert await until(lambda: worker.status == Status.closed)
                finally:
                    await second.close()
            finally:
                await worker.close()

    asyncio.run(go())


def test_without_a_reconnect_window_it_closes_with_its_scheduler():
    async def go() -> None:
        port = free_port()
        with dask.config.set({"jupyter-gpu.worker.reconnect-timeout": "0s"}):
            first = await scheduler(port)
            worker = await GpuDaskWorker(first.address, nthreads=1, host="127.0.0.1")
            try:
                assert await until(lambda: worker.address in first.workers)
                await first.close()
                assert await until(lambda: worker.status == Status.closed)
            finally:
                await worker.close()

    asyncio.run(go())
