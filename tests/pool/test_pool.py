"""The pool as a set of services: worker loss, a pool started from the CLI across processes,
discovery."""

import os
import signal
import subprocess
import sys

import pytest

from tests.support.harness import Kernel, leases, snapshot, wait_until, worker_pid
from tests.support.service_account import services_env

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)  # its waits are bounds for a loaded machine, not its usual length
def test_worker_killed_mid_cell_gives_a_clear_error_and_frees_the_lease(private_pool):

    k = Kernel(private_pool, user="frank")
    try:
        msg = k.submit("%%gpu\nimport time\nprint('training', flush=True)\ntime.sleep(600)")
        # the first cell on a new pool starts its session: on a loaded machine that took over 30 s
        k.wait_for_output(msg, "training", timeout=180)
        lease = next(ls for ls in leases(private_pool) if ls["user"] == "frank")
        os.kill(worker_pid(lease["worker"]), signal.SIGKILL)
        # the broken connection ends the cell, long before its 600 s sleep would
        res = k.collect(msg, timeout=120)
        assert res.error["ename"] == "SessionLost", res.error_text
        assert lease["id"] in res.error["evalue"]
        assert wait_until(lambda: not any(ls["id"] == lease["id"] for ls in leases(private_pool)))
        assert k.alive()
        # the Nanny restarts the worker; its GPU rejoins and the next cell runs on the pool again
        assert wait_until(lambda: len(snapshot(private_pool)["gpus"]) == 2, timeout=120)
        assert k.run("%%gpu\nprint('back')").stdout.endswith("back\n")
    finally:
        k.shutdown(now=True)


def test_pool_up_and_worker_services_span_processes(tmp_path):
    """`jupyter-gpu pool up` + `jupyter-gpu worker ADDRESS`, joined by `%gpu connect tcp://...`
    (run as root, both give root up for a service account)."""
    with services_env() as (extra, _):
        _services_span_processes({**os.environ, "JUPYTER_GPU_VIRTUAL_GPUS": "1x8GiB", **extra})


def _services_span_processes(env: dict[str, str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    sched = subprocess.Popen(
        [sys.executable, "-m", "jupyter_gpu.cli", "pool", "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    worker = None
    try:
        from jupyter_gpu.pool.discovery import address_reachable

        assert wait_until(lambda: address_reachable(address), timeout=60)
        worker = subprocess.Popen(
            [sys.executable, "-m", "jupyter_gpu.cli", "worker", address, "--host", "127.0.0.1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert wait_until(lambda: len(snapshot(address)["gpus"]) == 1, timeout=60)
        k = Kernel(None, env={"JUPYTER_GPU_SCHEDULER": ""})
        try:
            res = k.run(f"%gpu connect {address}")
            assert "Connected to the pool at" in res.stdout and "1 GPU(s) (virtual)" in res.stdout
            res = k.run("%%gpu --gpus 0.5\nimport os\nprint(os.environ['JUPYTER_GPU_LEASE'])")
            assert res.stdout.strip().startswith("L"), res.error_text + res.stderr
        finally:
            k.shutdown(now=True)
        out = subprocess.run(
            [sys.executable, "-m", "jupyter_gpu.cli", "status", "--pool", address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "Virtual GPU 0" in out.stdout
        sched.send_signal(signal.SIGTERM)
        assert (
            "join GPU machines with:  jupyter-gpu worker " + address
            in sched.communicate(timeout=30)[0]
        )
    finally:
        for proc in (worker, sched):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_connect_to_an_unreachable_address_is_a_clear_error(kernel):
    res = kernel.run("%gpu connect tcp://127.0.0.1:9")
    assert res.error is not None
    assert "Could not reach the GPU pool at tcp://127.0.0.1:9" in res.error["evalue"]
    res = kernel.run("%gpu frobnicate")
    assert "unknown command" in res.stderr


def test_adaptive_scaling_grows_for_waiting_requests_and_retires_only_idle_workers(private_pool):
    import asyncio

    from jupyter_gpu.common.security import pool_rpc

    async def scenario() -> None:
        async with pool_rpc(private_pool) as r:
            reply = await r.gpu_scale(minimum=2, maximum=3, user="admin")
            assert reply["adaptive"] == {"minimum": 2, "maximum": 3}, reply
            grants = [
                await r.gpu_request(user="u", kernel=f"k{i}", spec={"gpus": 1}) for i in range(3)
            ]
            ids = [g["id"] for g in grants]
            final = {}
            for rid in ids:  # the third waits until adaptive scaling adds a worker
                state = {"state": "queued"}
                for _ in range(120):
                    state = await r.gpu_wait(id=rid, timeout=1)
                    if state["state"] not in ("queued", "starting"):
                        break
                final[rid] = state
            assert all(s["state"] == "granted" for s in final.values()), final
            snap = await r.gpu_snapshot()
            assert snap["pool"]["workers"] == 3 and len(snap["gpus"]) == 3
            busy_worker = final[ids[0]]["leases"][0]["worker"]
            for rid in ids[1:]:
                await r.gpu_cancel(id=final[rid]["leases"][0]["id"], user="u")
            # only idle workers are retired: the lease survives
            reply = await r.gpu_scale(n=1, user="admin")
            snap = await r.gpu_snapshot()
            assert [g["worker"] for g in snap["gpus"]] == [busy_worker]
            assert snap["gpus"][0]["leases"] and reply["workers"] == 1

    asyncio.run(scenario())
