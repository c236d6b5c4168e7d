"""A running cell's progress, reported to the broker for the queue's estimates: checked at every
hop.

Sessions report ``step``/``total`` through their worker (``worker/relay.py`` checks every field of
what a session sends), the worker forwards it on its own stream to the scheduler
(``gpu_lease_state``, checked against its annotations; the worker is the stream's), and the
broker's policy keeps the progress of the lease's running cell (``fair_share.py``).
"""

from __future__ import annotations

import pytest
from distributed.core import rpc
from distributed.utils_test import gen_cluster

from jupyter_gpu.common.refusals import NotAuthorized
from jupyter_gpu.worker.relay import checked
from tests.broker.inprocess import FAST_SESSIONS, granted, install_pool, teardown, tell, until

pytestmark = [pytest.mark.inprocess, pytest.mark.timeout(120)]


def test_the_worker_passes_on_only_well_formed_progress():
    ok = checked({"op": "lease_state", "state": "running", "cell": "train", "step": 5, "total": 10})
    assert ok == ("lease_state", {"state": "running", "cell": "train", "step": 5, "total": 10})
    for bad in (
        {"step": -1},
        {"step": "5"},
        {"total": 2**60},
        {"step": 1.5},
        {"step": True},
        {"eta": 3},
    ):
        assert checked({"op": "lease_state", "state": "running", **bad}) is None, bad


@gen_cluster(nthreads=[("127.0.0.1", 1)], config=FAST_SESSIONS)
async def test_the_broker_keeps_a_running_cells_progress_from_its_worker_only(s, w):
    broker, plugin = await install_pool(s, w)
    try:
        async with rpc(s.address) as sched:
            lease = (await granted(sched, user="alice", kernel="k1", spec={"fraction": 0.5}))[
                "leases"
            ][0]["id"]
            record = broker.policy.leases[lease]
            # as a call (not on a worker's stream): nothing happens
            try:
                await sched.gpu_lease_state(lease=lease, state="running", step=3, total=10)
            except NotAuthorized:
                pass
            # on the worker's stream, fields of the wrong kind are dropped
            tell(w, "gpu_lease_state", lease=lease, state="running", step=-3, total=10)
            tell(w, "gpu_lease_state", lease=lease, state="running", step="3", total=10)
            tell(w, "gpu_lease_state", lease=lease, state="running", cell="train")
            assert await until(lambda: broker.ledger.leases[lease].cell == "train")
            assert record.progress is None
            tell(w, "gpu_lease_state", lease=lease, state="running", step=3, total=10)
            tell(w, "gpu_lease_state", lease=lease, state="running", step=5, total=10)
            assert await until(lambda: record.progress is not None and record.progress.step == 5)
            assert (record.progress.step0, record.progress.step, record.progress.total) == (
                3,
                5,
                10,
            )
            # a progress report is not a new cell: the cell keeps its name and when it started
            assert (
                broker.ledger.leases[lease].cell == "train"
                and broker.ledger.leases[lease].cell_started is not None
            )
            tell(w, "gpu_lease_state", lease=lease, state="idle")
            # the cell ended: its progress says nothing any more
            assert await until(lambda: record.progress is None)
    finally:
        await teardown(w, plugin)
