"""Suspension in a real pool (2 virtual 16 GiB GPUs, real kernels of three users): an interactive
cell that finds no room moves an idle session of another user to host memory and runs; a running
session is never touched and batch work waits; the suspended owner's next cell says why and gets the
variables back. A session idle for ``session.standby-after`` (6 s here) has copied its variables
already, so suspending it hands that copy over; a cell makes the copy stale, and a session suspended
before its next copy is written moves its variables as they are."""

from __future__ import annotations

import glob
import os
import tempfile
import time

import pytest

from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.common import poolkey
from jupyter_gpu.common.security import client_security, pool_rpc
from tests.broker.test_fair_pool import QuotaPool, call, connected_client
from tests.support.harness import leases, snapshot, wait_until

pytestmark = pytest.mark.integration

QUOTAS = """
suspend-idle-after: 2s
min-run-time: 0s
"""


@pytest.fixture(scope="module")
def spool(tmp_path_factory):
    pool = QuotaPool(
        tmp_path_factory.mktemp("suspend-pool"),
        quotas=QUOTAS,
        env={"DASK_JUPYTER_GPU__SESSION__STANDBY_AFTER": "6s"},
    )
    pool.start()
    yield pool
    pool.stop()


def by_user(address: str) -> dict:
    return {ls["user"]: ls for ls in leases(address)}


def standby_copy(lease_id: str, pool: QuotaPool) -> list[str]:
    """The session's standby copy in its worker's host-memory folder (``offload_dir``:
    ``jupyter-gpu-<worker pid>-...``), if it has one; only this pool's workers' folders count (other
    pools, earlier or running at the same time, use the same lease ids)."""
    return [
        p
        for base in ("/dev/shm", tempfile.gettempdir())
        for p in glob.glob(os.path.join(base, "jupyter-gpu-*", lease_id, "standby"))
        if _worker_pid(os.path.basename(os.path.dirname(os.path.dirname(p)))) in _pool_pids(pool)
    ]


def copy_files(lease_id: str, pool: QuotaPool) -> tuple[list[str], list[str]]:
    """``lease_id``'s parked copy in this pool's host-memory folders, and in its disk folders
    (spilled: ``worker.spill-dir``, ``/var/tmp`` by default); the worker's own folders name it
    ``<lease>``, the launcher's ``<lease>-<random>``."""
    pids = _pool_pids(pool)

    def found(*patterns: str) -> list[str]:
        paths = [p for pattern in patterns for p in glob.glob(pattern)]
        return [p for p in paths if _worker_pid(p.split("/")[3]) in pids]

    return (
        found(
            f"/dev/shm/jupyter-gpu-*/{lease_id}/offload.pkl",
            f"/dev/shm/jupyter-gpu-*/{lease_id}-*/offload.pkl",
        ),
        found(
            f"/var/tmp/jupyter-gpu-*-spill-*/{lease_id}.pkl",
            f"/var/tmp/jupyter-gpu-*-spill-*/{lease_id}-*",
        ),
    )


def spill(pool: QuotaPool, worker: str, lease_id: str) -> int:
    """What the broker asks of a worker when a lease needs its machine's memory
    (``broker/parking.py``): the copy moved to its disk folder (with the pool key)."""
    import asyncio

    key = poolkey.read_key(poolkey.key_path(pool.address))

    async def go() -> int:
        async with pool_rpc(worker, security=client_security(pool.address)) as w:
            return await w.gpu_offload_spill(lease=lease_id, key=key)

    return asyncio.run(go())


def _worker_pid(folder: str) -> int | None:
    pid = folder.split("-")[2]
    return int(pid) if pid.isdigit() else None


def _pool_pids(pool: QuotaPool) -> set[int]:
    """The pool process and everything it started (its workers among them)."""
    import psutil

    from jupyter_gpu.pool.discovery import read_record

    try:
        root = psutil.Process(read_record(pool.path).pid)
        return {root.pid, *(p.pid for p in root.children(recursive=True))}
    except (psutil.NoSuchProcess, AttributeError, OSError):
        return set()


def test_an_idle_session_is_suspended_for_a_waiting_cell_and_comes_back(spool):
    alice, bob, carol = spool.kernel("alice"), spool.kernel("bob"), spool.kernel("carol")
    a = spool.address
    try:
        res = alice.run(
            "%%gpu --gpus 1\nimport torch\nt = torch.arange(6.)\nsteps = (i for i in range(3))\n"
            "big = torch.ones(64 * 2**20 // 4)"
        )
        assert res.error is None, res.error_text
        # her session says what it holds now (what suspending it would move): the 64 MiB tensor, and
        # more
        assert wait_until(
            lambda: (by_user(a).get("alice", {}).get("resident_bytes") or 0) >= 60 * 2**20
        )
        cell = carol.submit(
            "%%gpu --gpus 1\nimport time\nprint('carol starts', flush=True)\ntime.sleep(12)\n"
            "print('carol done')"
        )
        carol.wait_for_output(cell, "carol starts", timeout=180)
        assert wait_until(lambda: by_user(a).get("carol", {}).get("state") == "running")
        held = by_user(a)
        # batch work never suspends anybody: it waits, even with alice idle for longer than 2 s
        with connected_client(a) as client:
            batch = call(
                a,
                "gpu_request",
                user="bob",
                kernel="b",
                spec={"fraction": 0.5, "priority": "batch"},
                token=spool.tokens["bob"],
                client=client.id,
            )
            assert batch["state"] == "queued"
            time.sleep(3)
            assert [q["id"] for q in snapshot(a)["queue"]] == [batch["id"]]
            assert by_user(a)["alice"]["id"] == held["alice"]["id"]
            assert call(a, "gpu_cancel", id=batch["id"], user="bob", token=spool.tokens["bob"])[
                "cancelled"
            ]
        # bob's interactive cell moves alice's idle session to host memory (not carol's running one)
        # idle for 6 s, alice's session has copied its variables to host memory already
        assert wait_until(lambda: standby_copy(held["alice"]["id"], spool), timeout=90)
        res = bob.run("%%gpu --gpus 0.5\nprint('bob ran')", timeout=120)
        assert res.error is None and "bob ran" in res.stdout, res.error_text
        now = by_user(a)
        assert now["carol"]["id"] == held["carol"]["id"] and now["carol"]["state"] == "running"
        ended = call(
            a,
            "gpu_lease_info",
            lease=held["alice"]["id"],
            user="alice",
            token=spool.tokens["alice"],
        )
        assert ended["state"] == "ended" and ended["end_reason"].startswith("suspended after"), (
            ended
        )
        assert "bob's cell was waiting for the GPU" in ended["end_reason"]
        # the panel's snapshot lists alice's variables as waiting in host memory
        assert wait_until(
            lambda: (
                [(p["id"], p["state"]) for p in snapshot(a)["in_host_memory"]]
                == [(held["alice"]["id"], "saved")]
            )
        )
        parked = snapshot(a)["in_host_memory"][0]
        assert parked["user"] == "alice" and list(parked["saved"]) == ["big", "t", "torch"]
        assert list(parked["lost"]) == ["steps"]
        assert parked["bytes"] >= 64 * 2**20 and parked["reason"].startswith("suspended after")
        assert parked["standby"] is True  # her copy was handed over: nothing was left to write
        assert not standby_copy(held["alice"]["id"], spool)
        # host memory short: her copy is spilled to the worker's disk folder; her next cell still
        # restores it (below)
        assert copy_files(held["alice"]["id"], spool)[0]
        assert spill(spool, held["alice"]["worker"], held["alice"]["id"]) >= 64 * 2**20
        in_memory, on_disk = copy_files(held["alice"]["id"], spool)
        assert not in_memory and len(on_disk) == 1, (in_memory, on_disk)
        # alice's %gpu status says so too (a line magic: it does not restore anything)
        status = alice.run("%gpu status").data()[0]
        assert "My sessions in host memory" in status and held["alice"]["id"] in status, status
        assert "this kernel" in status and "3 variable(s)" in status, status
        assert "done" in carol.collect(cell, timeout=180).stdout
        # alice's next cell says why, starts a new session and gets her variables back
        assert bob.run("%gpu release").error is None
        res = alice.run("%%gpu\nprint('sum', float(t.sum()))", timeout=120)
        assert res.error is None, res.error_text
        assert "suspended after" in res.stdout and "were moved to host memory" in res.stdout, (
            res.stdout
        )
        assert "Restored 3 variable(s) from host memory: big, t, torch." in res.stdout, res.stdout
        assert "steps (generator)" in res.stdout and "sum 15.0" in res.stdout, res.stdout
        assert not snapshot(a)["in_host_memory"]  # restored: nothing waits in host memory any more
        assert copy_files(held["alice"]["id"], spool) == ([], [])  # nor on disk
    finally:
        for k in (alice, bob, carol):
            k.shutdown(now=True)
    # the audit keeps the suspension, as a preemption of alice's lease for bob
    store = AuditStore(str(spool.root / "audit.sqlite"))
    try:
        rows = store.rows("preemptions")
        assert [(r["user"], r["for_user"]) for r in rows] == [("alice", "bob")]
        assert rows[0]["reason"].startswith("suspended after")
    finally:
        store.close()


def test_a_cell_makes_the_standby_copy_stale_and_suspension_moves_the_variables_as_they_are(spool):
    """Suspended 2 s into its idleness, before its next copy (6 s), a session writes what it holds
    now: never the copy taken before its last cell."""
    alice, bob, carol = spool.kernel("alice"), spool.kernel("bob"), spool.kernel("carol")
    a = spool.address
    try:
        assert alice.run("%%gpu --gpus 1\nimport torch\nx = torch.ones(4)").error is None
        lease_id = by_user(a)["alice"]["id"]
        assert wait_until(lambda: standby_copy(lease_id, spool), timeout=90)  # a copy holding x = 1
        # the other GPU is busy with carol's running cell: bob's cell can only get alice's
        cell = carol.submit(
            "%%gpu --gpus 1\nimport time\nprint('carol starts', flush=True)\ntime.sleep(300)"
        )
        carol.wait_for_output(cell, "carol starts", timeout=180)
        assert alice.run("%%gpu\nx = x * 2").error is None
        # stale from the moment the cell started: its memory given back
        assert not standby_copy(lease_id, spool)
        res = bob.run("%%gpu --gpus 1\nprint('bob ran')", timeout=120)
        assert res.error is None and "bob ran" in res.stdout, res.error_text
        assert wait_until(
            lambda: (
                [(p["id"], p["state"]) for p in snapshot(a)["in_host_memory"]]
                == [(lease_id, "saved")]
            )
        )
        # written when suspended, as it was then
        assert snapshot(a)["in_host_memory"][0]["standby"] is False
        assert bob.run("%gpu release").error is None
        res = alice.run("%%gpu\nprint('x', x.tolist())", timeout=120)
        assert res.error is None and "x [2.0, 2.0, 2.0, 2.0]" in res.stdout, (
            res.stdout,
            res.error_text,
        )
    finally:
        for k in (alice, bob, carol):
            k.shutdown(now=True)
