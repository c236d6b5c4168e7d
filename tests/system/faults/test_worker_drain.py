"""A GPU machine's service stopped as systemd stops it (SIGTERM to `jupyter-gpu worker`) drains:
running cells finish, idle sessions move to another worker with their variables, their users are
told at their next cell, and the service exits 0.

Before: SIGTERM closed the workers at once; every session on them ended, its variables were lost,
and the next cell said only that the session had ended.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.support.harness import Kernel, leases, wait_until
from tests.support.services import PoolServices

pytestmark = [pytest.mark.system, pytest.mark.timeout(420)]


def _by_user(address: str) -> dict[str, dict]:
    return {ls["user"]: ls for ls in leases(address)}


def test_a_stopped_worker_drains_its_sessions_to_another_worker_with_their_variables(tmp_path):
    with PoolServices(tmp_path, virtual="1x16GiB") as pool:
        alice, bob = Kernel(pool.address, user="alice"), Kernel(pool.address, user="bob")
        try:
            # both sessions on the first worker's GPU (the only one yet)
            assert alice.run("%%gpu --gpus 0.25\nx = 41\nprint('set')").stdout.strip() == "set"
            assert bob.run("%%gpu --gpus 0.25\ny = 'kept'").error is None
            first = {ls["worker"] for ls in leases(pool.address)}
            assert len(first) == 1, leases(pool.address)
            pool.add_worker("worker-b", "1x16GiB")

            # bob's cell is running when the first worker's service is told to stop
            running = bob.submit(
                "%%gpu\nimport time\nfor i in range(6):\n    print('tick', i, flush=True)\n"
                "    time.sleep(1)\ny = y + '!'\nprint('done')"
            )
            bob.wait_for_output(running, "tick 1", timeout=60)
            os.kill(pool.worker.pid, signal.SIGTERM)  # systemd's KillMode=mixed: the service only

            out = bob.collect(running, timeout=120)
            assert out.error is None, out.error_text  # the drain let it finish
            assert "tick 5" in out.stdout and "done" in out.stdout
            assert pool.worker.wait(240) == 0, pool.log("worker")
            log = pool.full_log("worker")
            assert "draining 1 GPU worker(s) before stopping" in log, log[-3000:]
            assert "2 session(s) moved to other workers with their variables, 0 ended" in log, log[
                -3000:
            ]

            # both sessions live on the other worker now, under new leases
            assert wait_until(
                lambda: (
                    {ls["worker"] for ls in leases(pool.address)} - first
                    and not {ls["worker"] for ls in leases(pool.address)} & first
                ),
                60,
            ), leases(pool.address)
            old = {u: ls["id"] for u, ls in _by_user(pool.address).items()}
            back = alice.run("%%gpu\nprint(x + 1)")
            assert back.error is None, back.error_text
            assert back.stdout.strip().endswith("42"), back.stdout
            assert "[jupyter-gpu] Your session moved from worker " in back.stdout, back.stdout
            assert "for maintenance; your variables came with it" in back.stdout
            kept = bob.run("%%gpu\nprint(y)")
            assert kept.error is None and kept.stdout.strip().endswith("kept!"), kept.error_text
            # the kernels took the moved sessions: no other session was started for them
            assert {u: ls["id"] for u, ls in _by_user(pool.address).items()} == old
        finally:
            alice.shutdown(now=True)
            bob.shutdown(now=True)


def test_the_only_worker_stops_at_once_and_its_users_are_told_why_their_variables_are_gone(
    tmp_path,
):
    """With no other worker to move to, the drain does not wait for room (it would for
    drain-timeout): the session ends with the reason, and the service exits 0."""
    with PoolServices(tmp_path, virtual="1x16GiB") as pool:
        alice = Kernel(pool.address, user="alice")
        try:
            assert alice.run("%%gpu\nx = 41").error is None
            os.kill(pool.worker.pid, signal.SIGTERM)
            assert pool.worker.wait(120) == 0, pool.log("worker")
            assert "0 session(s) moved to other workers with their variables, 1 ended" in (
                pool.full_log("worker")
            ), pool.log("worker")
            pool.worker = None  # stopped for good: another machine joins
            pool.add_worker("worker-b", "1x16GiB")
            res = alice.run("%%gpu\nprint('new session')")
            assert res.error is None, res.error_text
            assert (
                "its variables could not be moved (the pool has no other worker to move it to)"
                in (res.stdout)
            ), res.stdout
            assert "the variables that lived there are gone" in res.stdout
        finally:
            alice.shutdown(now=True)
