"""``jupyterhub-idle-culler`` and GPU work agree: a server whose ``%%gpu`` cell runs (printing
nothing for longer than the culler's timeout), and one whose ``--async`` cell runs while its kernel
is idle, survive the culler, because their server extension posts their GPU work to the Hub as
activity; a server whose kernel only holds an idle session is culled, and its lease ends with it:
nothing of that user keeps a GPU or host memory afterwards.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import pytest

from tests.support.harness import wait_until
from tests.system.hub.conftest import CAROL, DAVE, ERIN
from tests.system.hub.lab import ServerKernel

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

CULL_AFTER_S, CULL_EVERY_S = 15, 3  # 5 times the servers' activity interval (conftest ACTIVITY_S)
WORK_S = 45  # three times the culler's timeout, with no output


def last_activity(hub, user: str) -> float:
    """When the Hub last saw activity of ``user``'s default server (seconds since the epoch)."""
    server = (hub.api("GET", f"/users/{user}").get("servers") or {}).get("") or {}
    stamp = server.get("last_activity")
    if not stamp:
        return 0.0
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_the_culler_spares_servers_with_gpu_work_and_culls_the_idle_one(hubpool):
    hub = hubpool.hub
    kernels: dict[str, ServerKernel] = {}
    culler = None
    log = open(hub.root / "culler.log", "ab")
    try:
        for user in (CAROL, DAVE, ERIN):
            kernels[user] = ServerKernel(hub.start_server(user), hub.admin_token)
            out = kernels[user].run("%load_ext jupyter_gpu")
            assert out.error is None, out
        out = kernels[ERIN].run("%%gpu\nx = 1\nprint('erin holds an idle session')")
        assert out.error is None and "idle session" in out.stdout, out
        out = kernels[DAVE].run(f"%%gpu --async\nimport time\ntime.sleep({WORK_S})\nprint('dave')")
        assert out.error is None, out
        carol = kernels[CAROL].send(f"%%gpu\nimport time\ntime.sleep({WORK_S})\nprint('carol')")
        assert wait_until(
            lambda: [ls["state"] for ls in hubpool.leases_of(CAROL)] == ["running"], 120
        ), "carol's cell did not start"
        assert [ls["state"] for ls in hubpool.leases_of(DAVE)] == ["running"]
        # their servers' extension posts the GPU work as activity (every few seconds): the Hub
        # records it before the culler first looks
        started = time.time()
        assert wait_until(
            lambda: min(last_activity(hub, CAROL), last_activity(hub, DAVE)) > started, 60
        ), "no GPU activity reached the Hub"

        culler = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterhub_idle_culler",
                f"--url={hub.api_url}",
                f"--timeout={CULL_AFTER_S}",
                f"--cull-every={CULL_EVERY_S}",
            ],
            env={**os.environ, "JUPYTERHUB_API_TOKEN": hub.culler_token},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # the idle one goes, and its lease with it
        assert wait_until(lambda: not hub.server_running(ERIN), 180), (
            "the idle server was not culled:\n" + (hub.root / "culler.log").read_text()
        )
        assert wait_until(lambda: not hubpool.leases_of(ERIN), 60), hubpool.leases_of(ERIN)
        snap = hubpool.snapshot()
        assert not [p for p in snap["in_host_memory"] if p["user"] == ERIN]
        assert not [q for q in snap["queue"] if q["user"] == ERIN]
        # the busy ones stay until their work is done, long past the culler's timeout
        try:
            done = kernels[CAROL].wait(carol, timeout=WORK_S + 240)
        except Exception as exc:  # noqa: BLE001 - reported with what the culler and the Hub saw
            raise AssertionError(
                f"carol's cell did not finish ({exc}); culler:\n"
                + (hub.root / "culler.log").read_text()
                + "\nHub:\n"
                + "\n".join(
                    line
                    for line in (hub.root / "hub.log").read_text(errors="replace").splitlines()
                    if "GET /hub/api/users/jgherin" not in line and "/groups?" not in line
                )[-12000:]
            ) from None
        assert done.error is None and "carol" in done.stdout, done
        assert hub.server_running(CAROL) and hub.server_running(DAVE), (
            hub.root / "culler.log"
        ).read_text()
        culled = (hub.root / "culler.log").read_text()
        assert ERIN in culled and CAROL not in culled.replace(f"{CAROL}:", ""), culled
    finally:
        if culler is not None:
            os.killpg(culler.pid, 15)
            culler.wait(30)
        log.close()
        for kernel in kernels.values():
            kernel.close()
        for user in (CAROL, DAVE, ERIN):
            hub.stop_server(user)
