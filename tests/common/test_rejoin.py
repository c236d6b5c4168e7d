"""Waiting for a restarting scheduler (``common/rejoin.py``), against a real Dask listener."""

from __future__ import annotations

import asyncio
import socket

import pytest
from distributed.comm import listen

from jupyter_gpu.common.rejoin import until_answering


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def handle(comm) -> None:
    await comm.close()


def test_it_returns_once_the_address_answers_and_gives_up_at_its_timeout():
    async def go() -> None:
        address = f"tcp://127.0.0.1:{free_port()}"
        with pytest.raises(OSError, match="did not answer within 1 s"):
            await until_answering(address, 1.0, {})
        waiting = asyncio.ensure_future(until_answering(address, 60.0, {}))
        await asyncio.sleep(2.5)  # a restart: nothing listens for a while
        assert not waiting.done()
        listener = listen(address, handle)
        await listener.start()
        try:
            await asyncio.wait_for(waiting, 30)
        finally:
            listener.stop()

    asyncio.run(go())


def test_it_stops_when_whoever_waits_no_longer_wants_to():
    async def go() -> None:
        address = f"tcp://127.0.0.1:{free_port()}"
        closing = False
        waiting = asyncio.ensure_future(until_answering(address, 600.0, {}, lambda: not closing))
        await asyncio.sleep(0.5)
        closing = True
        with pytest.raises(OSError):
            await asyncio.wait_for(waiting, 30)

    asyncio.run(go())
