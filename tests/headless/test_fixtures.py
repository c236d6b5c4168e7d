"""The ``gpu_pool`` and ``gpu_kernel`` fixtures for users' tests, and what a dead kernel leaves
behind."""

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


def test_the_kernel_driver_runs_cells_without_raising_and_interrupts_a_submitted_one(gpu_pool):
    """What the project's own tests and benchmarks use of the same driver: a user and environment
    for the kernel, ``run`` (never raises for the cell's error),
    ``submit``/``wait_for_output``/``collect`` around an interrupt, ``record=False`` for timing,
    ``alive``, ``shutdown``."""
    kernel = GpuKernel(gpu_pool, user="driver-user", env={"DRIVER_MARK": "set"}).start()
    try:
        res = kernel.run(
            "import os\nprint(os.environ['JUPYTER_GPU_USER'], os.environ['DRIVER_MARK'])\n1 / 0"
        )
        assert res.stdout == "driver-user set\n" and res.status == "error"
        assert (
            res.error["ename"] == "ZeroDivisionError"
            and "1 / 0" in res.error_text
            and res.elapsed > 0
        )
        assert [o["output_type"] for o in res.outputs] == ["stream", "error"]
        timed = kernel.run("%%gpu\npass", record=False)
        assert timed.status == "ok" and timed.outputs == [] and timed.elapsed > 0
        msg = kernel.submit("%%gpu\nimport time\nprint('started', flush=True)\ntime.sleep(60)")
        assert "started" in kernel.wait_for_output(msg, "started").stdout
        t0 = time.monotonic()
        kernel.interrupt()
        res = kernel.collect(msg)
        assert time.monotonic() - t0 < 5 and res.error["ename"] == "KeyboardInterrupt", (
            res.error_text
        )
        assert "started" not in res.stdout  # what wait_for_output read is not repeated
        with pytest.raises(TimeoutError, match="still ran after"):
            kernel.run("import time\ntime.sleep(3)", timeout=0.5)
        assert kernel.alive()
    finally:
        kernel.shutdown(now=True)
    assert not kernel.alive()
