"""Draining workers (``broker/draining.py``) on an in-process cluster of two GPU workers with real
session processes: the drained worker takes no new lease, its idle session moves to the other
worker, and its kernel's next request for it (``restore``) is given the moved session."""

from __future__ import annotations

import asyncio

import pytest
from distributed import Client
from distributed.core import rpc
from distributed.utils_test import gen_cluster

from jupyter_gpu.common import poolkey
from jupyter_gpu.common.refusals import NotAuthorized
from jupyter_gpu.worker.dask_worker import GpuDaskWorker
from jupyter_gpu.worker.plugin import GpuWorkerPlugin
from tests.broker.inprocess import FAST_SESSIONS, granted, install_pool, teardown

pytestmark = [pytest.mark.inprocess, pytest.mark.timeout(180)]


@gen_cluster(
    nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)], Worker=GpuDaskWorker, config=FAST_SESSIONS
)
async def test_a_drained_workers_idle_session_moves_and_its_kernel_is_given_it(s, a, b):
    broker, plugin_a = await install_pool(s, a, gpus="1x16GiB")
    plugin_b = None
    try:
        async with Client(s.address, asynchronous=True) as kernel, rpc(s.address) as sched:
            mine = {"user": "alice", "kernel": "k1", "client": kernel.id}
            status = await granted(sched, spec={"fraction": 0.25}, **mine)
            old = status["leases"][0]
            assert old["worker"] == a.address
            plugin_b = GpuWorkerPlugin(virtual_gpus="1x16GiB")
            await b.plugin_add(plugin_b, name="jupyter-gpu-worker")
            while len(broker.ledger.gpus) < 2:
                await asyncio.sleep(0.05)
            while broker.ledger.leases[old["id"]].state != "idle":
                await asyncio.sleep(0.05)

            # only the pool's own (workers, with the pool key) may drain
            with pytest.raises(NotAuthorized):
                await sched.gpu_drain(workers=[a.address], timeout=30)
            proof = poolkey.proof(broker.pool_key, "drain", a.address)
            with pytest.raises(NotAuthorized):  # a proof is for the workers it names
                await sched.gpu_drain(workers=[b.address], timeout=30, proof=proof)
            report = await sched.gpu_drain(workers=[a.address], timeout=30, proof=proof)
            assert list(report["moved"]) == [old["id"]] and not report["ended"], report

            info = await sched.gpu_lease_info(lease=old["id"], user="alice")
            assert info["state"] == "ended" and info["moved_to"], info
            assert f"moved from worker {a.address.split('://')[1]} to worker " in info["end_reason"]
            # the kernel's next cell asks to restore its old session: it is given the moved one
            again = await granted(sched, spec={"fraction": 0.25}, restore=old["id"], **mine)
            assert again["id"] == info["moved_to"], again
            new = again["leases"][0]
            assert new["worker"] == b.address and again["restored"] is not None, again
            assert [ls.id for ls in broker.ledger.leases.values()] == [new["id"]]

            with pytest.raises(NotAuthorized):  # ... and for one call
                await sched.gpu_drain(workers=[a.address], timeout=30, proof=proof)
            # the drained worker takes no new lease: a new request goes to the other one
            other = await granted(sched, spec={"fraction": 0.25}, user="bob", kernel="k2")
            assert other["leases"][0]["worker"] == b.address, other
    finally:
        if plugin_b is not None:
            await teardown(b, plugin_b)
        await teardown(a, plugin_a)
