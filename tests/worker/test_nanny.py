"""The GPU nanny answers only its own worker (``worker/nanny.py``)."""

from __future__ import annotations

import asyncio

from distributed.core import Status

from jupyter_gpu.worker.nanny import GpuNanny


def test_its_own_worker_closes_it_gracefully_without_a_type_error():
    """Bug fixed: the keyed wrapper awaited Dask's ``Nanny.close_gracefully``, a plain function
    that returns None, so every graceful close raised ``TypeError: object NoneType can't be used
    in 'await' expression`` in the nanny (and the worker that asked logged the failure)."""

    async def go() -> None:
        nanny = GpuNanny("tcp://127.0.0.1:1", nthreads=1)
        handler = nanny.handlers["close_gracefully"]
        refused = await handler(reason="someone else", key="not the key")
        assert refused["status"] == "error" and "own worker" in str(refused["exception"])
        assert nanny.status != Status.closing_gracefully
        assert await handler(reason="scheduler-close", key=nanny._key) is None
        assert nanny.status == Status.closing_gracefully

    asyncio.run(go())


def test_it_answers_nothing_else():
    async def go() -> None:
        nanny = GpuNanny("tcp://127.0.0.1:1", nthreads=1)
        for op in ("run", "kill", "restart", "terminate", "plugin_add", "instantiate"):
            reply = nanny.handlers[op](reason="x")
            assert reply["status"] == "error" and "not available" in str(reply["exception"])
        assert set(nanny.handlers) >= {"identity", "close_gracefully"}

    asyncio.run(go())
