"""What a session starts ends with it, a session that takes too much host memory is stopped alone, and a
killed worker's leftovers are cleared by the next one.

Bugs fixed: a process a cell started with ``start_new_session=True`` outlived its session; a cell allocating
more host memory than the machine has left the host's OOM killer to pick among everyone's processes; 20
worker kills left 20 host-memory folders in /dev/shm, and an idle session's standby copy stayed after its
worker was killed.
"""

from __future__ import annotations

import glob
import os
import signal

import pytest
from harness import Kernel, leases, wait_until
from services import PoolServices

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    env = {"DASK_JUPYTER_GPU__SESSION__HOST_MEMORY_LIMIT": "600MiB",
           "DASK_JUPYTER_GPU__SESSION__STANDBY_AFTER": "0.5s"}
    with PoolServices(tmp_path_factory.mktemp("contained"), env=env) as services:
        yield services


def test_processes_a_cell_starts_end_with_its_session(pool):
    k = Kernel(pool.address, user="alice")
    try:
        res = k.run("%%gpu\nimport subprocess\n"
                    "p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
                    "q = subprocess.Popen(['sleep', '300'])\nprint(p.pid, q.pid)")
        assert res.error is None, res.error_text
        pids = [int(x) for x in res.stdout.split()]
        assert all(_alive(p) for p in pids)
        lease = next(ls for ls in leases(pool.address) if ls["user"] == "alice")
        assert lease["containment"].startswith("cgroup"), lease
        assert k.run("%gpu release").error is None
        assert wait_until(lambda: not any(_alive(p) for p in pids), 10), [p for p in pids if _alive(p)]
    finally:
        k.shutdown(now=True)


def test_a_session_over_its_host_memory_limit_is_stopped_alone(pool):
    a, b = Kernel(pool.address, user="alice"), Kernel(pool.address, user="bob")
    try:
        assert b.run("%%gpu\nkeep = 'bob is fine'").error is None
        mine = next(ls for ls in leases(pool.address) if ls["user"] == "bob")
        assert mine["host_memory_limit"] == 600 * 2**20
        res = a.run("%%gpu\nimport numpy as np\nhog = np.ones(2 * 2**30 // 8)\nprint('allocated')", timeout=120)
        assert res.error is not None and "allocated" not in res.stdout
        assert "more host memory than its limit of 600.0 MiB" in res.error_text, res.error_text
        assert a.alive()
        assert b.run("%%gpu\nprint(keep)").stdout.strip() == "bob is fine"
        again = a.run("%%gpu\nprint('new session')")  # the next cell gets a new session
        assert again.error is None and "new session" in again.stdout
    finally:
        a.shutdown(now=True)
        b.shutdown(now=True)


def test_a_killed_workers_host_memory_folder_and_standby_copy_are_removed_by_the_next_worker(pool):
    k = Kernel(pool.address, user="carol")
    try:
        assert k.run("%%gpu\nimport numpy as np\nbig = np.zeros(4_000_000)").error is None
        lease = next(ls for ls in leases(pool.address) if ls["user"] == "carol")
        copies = lambda: glob.glob(f"/dev/shm/jupyter-gpu-*/{lease['id']}.standby")  # noqa: E731
        assert wait_until(lambda: bool(copies()), 20), "no standby copy was written"
        folder = os.path.dirname(copies()[0])
        worker_pid = int(os.path.basename(folder).split("-")[2])
        os.kill(worker_pid, signal.SIGKILL)  # no teardown runs: the nanny starts a new worker
        assert wait_until(lambda: not os.path.exists(folder), 60), os.listdir(folder)
        assert not copies()
        res = k.run("%%gpu\nprint('after')")  # the kernel is told and carries on in a new session
        assert "after" in res.stdout or "SessionLost" in res.error_text
    finally:
        k.shutdown(now=True)
