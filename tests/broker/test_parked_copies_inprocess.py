"""Idle sessions' copies in host memory booked on their machine (``broker/hosts.py``), on an
in-process cluster with real session processes: a reclaimed session's copy is booked in its
machine's memory and in its owner's quota view; a new lease that needs that memory has the copy
spilled to the worker's disk folder; its owner's next request restores her variables from there."""

from __future__ import annotations

import asyncio
import os

import pytest
from distributed import Client
from distributed.core import rpc
from distributed.utils_test import gen_cluster

from tests.broker.inprocess import FAST_SESSIONS, granted, install_pool, teardown, until

pytestmark = [pytest.mark.inprocess, pytest.mark.timeout(180)]

MiB = 2**20


@gen_cluster(nthreads=[("127.0.0.1", 1)], config=FAST_SESSIONS)
async def test_a_parked_copy_is_booked_spilled_for_a_new_lease_and_restored_from_disk(s, w):
    broker, plugin = await install_pool(s, w, gpus="2x16GiB")
    ledger, copies = broker.ledger, plugin.manager.copies
    ledger.set_host(w.address, memory=512 * MiB, cpus=4)  # what the worker's machine leaves
    try:
        async with Client(s.address, asynchronous=True) as kernel, rpc(s.address) as sched:
            mine = {"user": "alice", "kernel": "k1", "client": kernel.id}
            status = await granted(sched, spec={"fraction": 0.5, "host_memory": 64 * MiB}, **mine)
            old = status["leases"][0]
            async with rpc(old["address"]) as session:
                reply = await session.execute(
                    code="x = list(range(200_000))", inputs={}, secret=old["secret"]
                )
                assert reply["status"] == "ok", reply
            assert await until(lambda: ledger.leases[old["id"]].state == "idle")

            # reclaimed while idle: its variables go to host memory, booked on its machine
            broker.keeper.preempt(old["id"], "reclaimed by the test")
            assert await until(
                lambda: (
                    getattr(ledger.ended[old["id"]].offload, "state", None) == "saved"
                    and old["id"] in ledger.hosts[w.address].parked
                )
            )
            nbytes = ledger.ended[old["id"]].offload.bytes
            host = ledger.hosts[w.address]
            assert host.parked_memory == nbytes > 0 and host.leased_memory == 0
            ledger.check()
            in_memory = copies.store(old["id"]).offload_path(old["id"])
            assert os.path.isfile(in_memory)
            [machine] = (await sched.gpu_snapshot())["hosts"]
            assert (machine["host_memory"], machine["host_memory_parked"]) == (512 * MiB, nbytes)
            assert (machine["cpus"], machine["cpus_leased"]) == (4.0, 0.0)
            assert ledger.parking.bytes_by_user() == {
                "alice": nbytes
            }  # her quota view's parked_bytes

            # bob's lease needs all the memory left to sessions: alice's copy goes to disk
            bob = await granted(
                sched,
                spec={"fraction": 0.5, "host_memory": 512 * MiB - nbytes // 2},
                user="bob",
                kernel="k2",
            )
            assert bob["state"] == "granted", bob
            assert ledger.ended[old["id"]].offload.spilled and not host.parked
            ledger.check()
            assert await until(lambda: old["id"] in copies.store(old["id"]).spilled)
            on_disk = copies.store(old["id"]).spill_path(old["id"])
            assert os.path.isfile(on_disk) and not os.path.exists(in_memory)
            assert os.stat(on_disk).st_mode & 0o777 == 0o600
            snap = await sched.gpu_snapshot()
            assert [(p["id"], p["spilled"]) for p in snap["in_host_memory"]] == [(old["id"], True)]
            assert snap["hosts"][0]["host_memory_spilled"] == nbytes
            assert snap["hosts"][0]["host_memory_parked"] == 0

            # her next request restores her variables from the disk folder
            assert (await sched.gpu_release(lease=bob["leases"][0]["id"], user="bob"))["released"]
            again = await granted(sched, spec={"fraction": 0.5}, restore=old["id"], **mine)
            assert again["state"] == "granted", again
            assert list(again["restored"]["restored"]) == ["x"], again["restored"]
            new = again["leases"][0]
            async with rpc(new["address"]) as session:
                reply = await session.execute(
                    code="assert x[-1] == 199_999 and len(x) == 200_000",
                    inputs={},
                    secret=new["secret"],
                )
            assert reply["status"] == "ok", reply
            assert not os.path.exists(on_disk) and old["id"] not in copies.parked
            assert not ledger.hosts[w.address].parked
            ledger.check()
    finally:
        await teardown(w, plugin)
    await asyncio.sleep(0)
