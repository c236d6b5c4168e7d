"""The pool's plugins on an in-process Dask cluster (``distributed.utils_test.gen_cluster``), as a pool
installs them: helpers shared by the in-process broker tests."""

from __future__ import annotations

import asyncio

from distributed.core import rpc

from jupyter_gpu.broker.plugin import GpuBroker
from jupyter_gpu.worker.plugin import GpuWorkerPlugin

FAST_SESSIONS = {
    "jupyter-gpu.session.prewarm": False,
    "jupyter-gpu.session.preload-modules": [],
    "jupyter-gpu.session.standby-after": None,
    "jupyter-gpu.worker.sample-interval": "1s",
}


async def install_pool(
    s, w, gpus: str = "2x16GiB", broker: GpuBroker | None = None
) -> tuple[GpuBroker, GpuWorkerPlugin]:
    """Install the plugins as a pool does (broker first, then the worker's GPU plugin, which offers
    its GPUs)."""
    broker = broker or GpuBroker()
    s.add_plugin(broker)
    await broker.start(s)
    plugin = GpuWorkerPlugin(virtual_gpus=gpus)
    await w.plugin_add(plugin, name="jupyter-gpu-worker")
    for _ in range(200):
        if broker.ledger.gpus:
            break
        await asyncio.sleep(0.02)
    return broker, plugin


async def teardown(w, plugin: GpuWorkerPlugin) -> None:
    await plugin.teardown(w)
    for sp in list(plugin.manager.reaping):
        sp.wait()


async def granted(sched: rpc, **request) -> dict:
    status = await sched.gpu_request(**request)
    for _ in range(600):
        if status["state"] not in ("queued", "starting"):
            break
        status = await sched.gpu_wait(id=status["id"], timeout=0.5)
    return status


def tell(w, op: str, **fields) -> None:
    """A worker's report to the broker, on its own stream to the scheduler (how a GPU worker sends
    every report: the broker takes the worker from the stream)."""
    w.batched_stream.send({"op": op, **fields})


async def until(predicate, timeout: float = 20.0) -> bool:
    """Wait (polling) until ``predicate()`` holds; False if it never did."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
