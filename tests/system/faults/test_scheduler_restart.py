"""A pool whose scheduler is killed and restarted keeps its workers, its sessions and their
variables.

Bug fixed: after ``kill -9`` of the scheduler the workers' nannies closed, ``jupyter-gpu worker``
stayed up with no worker (so nothing restarted it), the restarted pool had no GPU, kernels queued
forever, and the cell that was running failed 51 s later with "the broker has no record of this
lease". Now the GPU workers wait for their scheduler and join it again with their sessions, which
the new broker adopts.
"""

from __future__ import annotations

import pytest

from tests.support.harness import Kernel, leases, wait_until
from tests.support.services import PoolServices

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]


def test_a_cell_running_while_the_scheduler_restarts_finishes_and_sessions_keep_their_variables(
    tmp_path,
):
    with PoolServices(tmp_path) as pool:
        alice, bob = Kernel(pool.address, user="alice"), Kernel(pool.address, user="bob")
        try:
            assert alice.run("%%gpu\nx = 41\nprint('set')").stdout.strip() == "set"
            assert bob.run("%%gpu --gpus 0.5\ny = 'kept'").error is None
            before = {ls["user"]: ls["id"] for ls in leases(pool.address)}
            cell = alice.submit(
                "%%gpu\nimport time\nfor i in range(8):\n    print('tick', i, flush=True)\n"
                "    time.sleep(1)\nprint('done', x + 1)"
            )
            alice.wait_for_output(cell, "tick 1")
            pool.restart_scheduler()  # kill -9, then `jupyter-gpu pool up` again on the same port
            out = alice.collect(cell, timeout=60)
            assert out.error is None, out.error_text
            assert "tick 7" in out.stdout and "done 42" in out.stdout
            # the new broker adopted both sessions, under their old lease ids
            assert wait_until(
                lambda: {ls["user"]: ls["id"] for ls in leases(pool.address)} == before, 30
            ), (before, leases(pool.address), pool.log("scheduler"), pool.log("worker"))
            again = alice.run("%%gpu\nprint(x)")
            assert again.error is None and again.stdout.strip() == "41", again.error_text
            kept = bob.run("%%gpu\nprint(y)")
            assert kept.error is None and kept.stdout.strip() == "kept", kept.error_text
            # no new session was needed
            assert {ls["user"]: ls["id"] for ls in leases(pool.address)} == before
            status = alice.run("%gpu status")
            assert before["alice"] in "".join(status.data()), status.outputs
            # new requests get new ids, never one of the adopted leases'
            fresh = alice.run("%%gpu --fresh --gpus 0.25\nprint('fresh')")
            assert fresh.error is None and fresh.stdout.strip() == "fresh"
            assert pool.worker.poll() is None  # the worker service never went away
        finally:
            alice.shutdown(now=True)
            bob.shutdown(now=True)


def test_the_worker_service_exits_non_zero_when_its_scheduler_does_not_come_back(tmp_path):
    """With no scheduler to go back to, the workers give up after ``worker.reconnect-timeout``
    and the service exits non-zero so that a supervisor restarts it (instead of idling with no
    worker)."""
    env = {"DASK_JUPYTER_GPU__WORKER__RECONNECT_TIMEOUT": "3s"}
    with PoolServices(tmp_path, env=env) as pool:
        pool.kill_scheduler()
        assert wait_until(lambda: pool.worker.poll() is not None, 90), pool.log("worker")
        assert pool.worker.returncode == 1, pool.log("worker")
        assert "exiting so that a supervisor restarts this service" in pool.full_log("worker")


def test_a_sigterm_restart_keeps_every_session_and_cells_carry_on_or_say_they_wait(tmp_path):
    """A scheduler stopped as systemd, a supervisor or Ctrl-C stop it (SIGTERM), then started
    again: nothing a user holds is lost.

    Bug fixed: Dask's ``Scheduler.close`` told every worker to close, the GPU nanny's wrapper
    raised ``TypeError: object NoneType can't be used in 'await' expression``, ``jupyter-gpu
    worker`` exited, every session and its variables were gone, and the next ``%%gpu`` cell
    showed nothing for minutes. Now the workers wait for their scheduler with their sessions, a
    running cell finishes, a session's cells run on while the scheduler is away, and a cell that
    needs the broker says at once that it waits for it."""
    with PoolServices(tmp_path) as pool:
        alice, bob = Kernel(pool.address, user="alice"), Kernel(pool.address, user="bob")
        carol = Kernel(pool.address, user="carol")
        try:
            assert alice.run("%%gpu\nx = 41\nprint('set')").stdout.strip() == "set"
            assert bob.run("%%gpu --gpus 0.5\ny = 'kept'").error is None
            assert carol.run("%gpu status").error is None  # connected, no session yet
            before = {ls["user"]: ls["id"] for ls in leases(pool.address)}
            running = alice.submit(
                "%%gpu\nimport time\nfor i in range(10):\n    print('tick', i, flush=True)\n"
                "    time.sleep(1)\nprint('done', x + 1)"
            )
            alice.wait_for_output(running, "tick 1")
            pool.stop_scheduler()
            assert pool.scheduler.returncode == 0, pool.log("scheduler")

            # a cell that needs a new session says at once that the scheduler is away, and waits
            waiting = carol.submit("%%gpu\nprint('carol ran')")
            seen = carol.wait_for_output(waiting, "is not answering; waiting for it", timeout=20)
            assert "[jupyter-gpu] the pool's scheduler at " + pool.address in seen.stdout
            # a cell in a session runs without the scheduler
            meanwhile = bob.run("%%gpu\nprint(y)", timeout=60)
            assert meanwhile.error is None and meanwhile.stdout.strip() == "kept", (
                meanwhile.error_text
            )
            assert pool.worker.poll() is None, pool.log("worker")

            pool.start_scheduler()
            out = alice.collect(running, timeout=90)
            assert out.error is None, out.error_text
            assert "tick 9" in out.stdout and "done 42" in out.stdout
            late = carol.collect(waiting, timeout=120)
            assert late.error is None and "carol ran" in late.stdout, late.error_text
            assert "the pool's scheduler is back" in late.stdout
            # both sessions were adopted under their lease ids, with their variables
            assert wait_until(
                lambda: (
                    {
                        u: i
                        for u, i in ((ls["user"], ls["id"]) for ls in leases(pool.address))
                        if u != "carol"
                    }
                    == before
                ),
                30,
            ), (before, leases(pool.address), pool.log("scheduler"))
            again = alice.run("%%gpu\nprint(x)")
            assert again.error is None and again.stdout.strip() == "41", again.error_text
            kept = bob.run("%%gpu\nprint(y)")
            assert kept.error is None and kept.stdout.strip() == "kept", kept.error_text
            assert pool.worker.poll() is None  # the worker service never went away
            log = pool.full_log("worker")
            assert "TypeError" not in log and "Stopping worker" not in log, log[-4000:]
        finally:
            for kernel in (alice, bob, carol):
                kernel.shutdown(now=True)
