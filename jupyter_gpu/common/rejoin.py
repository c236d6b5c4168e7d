"""Waiting for a pool's scheduler that is restarting: noticing within a second or so that it is back.

Why: Dask's ``connect`` retries a refused connection with an exponential backoff bounded only by its
timeout (``distributed/comm/core.py``: a random wait of up to 0.01 s x 2^attempt). That suits a
connection attempt of seconds; for a scheduler that is down for minutes (an upgrade) and a timeout
of ten minutes (``worker.reconnect-timeout``), the waits grow to minutes, so workers and kernels
found the restarted scheduler up to minutes after it answered (11 s after a 6 s restart on the
test machine). So they knock in short rounds instead, and register once a round gets through.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

ROUND = 1.0  # seconds: one connection attempt with Dask's backoff inside it, then a fresh one


async def until_answering(
    address: str,
    timeout: float,
    connection_args: dict[str, Any],
    wanted: Callable[[], bool] = lambda: True,
) -> None:
    """Return once ``address`` accepts a Dask connection (the probe is closed at once); raise
    ``OSError`` when it has not within ``timeout`` seconds, or once ``wanted()`` is false (the
    worker or client that waits is closing)."""
    from distributed.comm import connect

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not wanted():
            raise OSError(f"{address} did not answer within {timeout:.0f} s")
        try:
            comm = await connect(address, timeout=min(ROUND, left), **connection_args)
        except OSError as exc:
            log.debug("%s does not answer yet: %s", address, exc)
            continue
        await comm.close()
        return
