"""A GPU machine's service stops without ending its users' sessions: it drains first.

Why: ``jupyter-gpu worker`` is stopped for upgrades and restarts (``systemctl stop`` and
``restart`` send SIGTERM; so does a supervisor). Closing its workers at once would end every
session on them with its variables. Instead the service asks the broker to drain its workers
(``gpu_drain``, ``broker/draining.py``: no new leases, running cells finish within
``jupyter-gpu.worker.drain-timeout``, idle sessions move to other workers with their variables),
and closes them when the broker answers. A second SIGTERM (or SIGINT) stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

from jupyter_gpu.common import config, poolkey
from jupyter_gpu.common.protocol import DrainReport
from jupyter_gpu.common.security import pool_rpc

if TYPE_CHECKING:
    from distributed.security import Security

log = logging.getLogger(__name__)


async def ask_broker(
    address: str, workers: list[str], security: Security | None, timeout: float
) -> DrainReport:
    """Have the broker at ``address`` drain ``workers`` (with a proof of the pool key, which
    never leaves this machine); its report."""
    from jupyter_gpu.broker.draining import drain_subject

    key = poolkey.read_key(poolkey.key_path(address))
    proof = poolkey.proof(key, "drain", drain_subject(workers))
    # the broker answers when the drain is done: running cells (timeout), then the last moves
    bound = timeout + config.get_seconds("offload-timeout") + 180.0
    async with pool_rpc(address, role="worker", security=security, timeout=10) as scheduler:
        report: DrainReport = await asyncio.wait_for(
            scheduler.gpu_drain(workers=workers, timeout=timeout, proof=proof), bound
        )
    return report


async def drain_before_stopping(
    address: str, workers: list[str], security: Security | None
) -> DrainReport | None:
    """Drain ``workers`` (this machine's), saying what happened; None when it could not be done
    (the scheduler is away, a second signal): the sessions then end with the workers."""
    if not workers:
        return None
    timeout = config.get_seconds("worker.drain-timeout")
    print(
        f"jupyter-gpu worker: draining {len(workers)} GPU worker(s) before stopping: no new "
        f"sessions here, running cells finish (up to {timeout:g} s), idle sessions move to other "
        "workers with their variables (SIGTERM again to stop now)",
        flush=True,
    )
    task = asyncio.ensure_future(ask_broker(address, workers, security, timeout))
    again = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, again.set)
    interrupted = asyncio.ensure_future(again.wait())
    try:
        await asyncio.wait({task, interrupted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupted.cancel()
    if not task.done():
        task.cancel()
        print("jupyter-gpu worker: stopping now, without finishing the drain", flush=True)
        return None
    try:
        report = task.result()
    except Exception as exc:  # noqa: BLE001 - the scheduler away or refusing: stop all the same
        print(
            f"jupyter-gpu worker: could not drain ({type(exc).__name__}: {exc}); stopping: the "
            "sessions here end",
            flush=True,
        )
        return None
    print(
        f"jupyter-gpu worker: drained in {report['waited']:.1f} s: {len(report['moved'])} "
        f"session(s) moved to other workers with their variables, {len(report['ended'])} ended"
        + (f" ({', '.join(report['ended'])})" if report["ended"] else ""),
        flush=True,
    )
    return report
