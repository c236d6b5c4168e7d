"""The ``gpu_pool`` and ``gpu_kernel`` fixtures for users' tests, and what a dead kernel leaves behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from jupyter_gpu.headless.kernel import GpuKernel, KernelCellError
from jupyter_gpu.headless.pool import kernel_holdings, pool_snapshot

pytestmark = pytest.mark.integration


def test_gpu_kernel_runs_gpu_cells(gpu_kernel, gpu_pool):
    gpu_kernel.execute("x = 20")
    remote = gpu_kernel.execute("%%gpu\ny = x + 22\nprint('remote', y)")
    assert "remote 42" in remote.stdout
    assert gpu_kernel.execute("y").result == "42"  # plain data came back into the kernel
    err = gpu_kernel.execute("%%gpu\nraise KeyError('nope')", allow_error=True)
    assert err.status == "error" and err.ename == "KeyError"
    assert "<%%gpu cell" in err.traceback and "\x1b" not in err.traceback
    with pytest.raises(KernelCellError, match="KeyError"):
        gpu_kernel.execute("%%gpu\nraise KeyError('again')")
    leases, _ = kernel_holdings(pool_snapshot(gpu_pool), gpu_kernel.kernel_id)
    assert len(leases) == 1  # the kernel's one session, found by the kernel's id


def test_a_killed_kernel_leaves_no_lease_and_no_session(gpu_pool):
    import psutil

    kernel = GpuKernel(gpu_pool).start()
    try:
        kernel.execute("%%gpu\nimport os\nsession_pid = os.getpid()")
        session_pid = int(kernel.execute("session_pid").result)
        kernel_pid = int(kernel.execute("import os; os.getpid()").result)
        assert kernel_holdings(pool_snapshot(gpu_pool), kernel.kernel_id)[0]
        os.kill(kernel_pid, signal.SIGKILL)
        # the broker frees the lease by itself when the kernel's client disconnects
        deadline = time.monotonic() + 15
        while kernel_holdings(pool_snapshot(gpu_pool), kernel.kernel_id)[0]:
            assert time.monotonic() < deadline, "the dead kernel's lease was not freed"
            time.sleep(0.1)

        def running(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        while running(session_pid):
            assert time.monotonic() < deadline, "the dead kernel's session process still runs"
            time.sleep(0.1)
    finally:
        assert kernel.stop() == []  # nothing was left for the runner's own clean-up to end
