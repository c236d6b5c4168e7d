"""Behind JupyterHub: tell the Hub that this server is in use while its kernels' GPU work runs.

Why: ``jupyterhub-idle-culler`` stops servers whose last activity, as the Hub knows it, is older
than its timeout. The Hub learns of activity from browser traffic and from the server's own
reports, which count kernel messages; a long ``%%gpu`` cell that prints nothing, an ``--async``
cell (the kernel is idle while it runs) or a ``--workers`` run sends none, so the culler stopped
servers in the middle of a training run (jupyterhub #1498). This server extension asks the pool,
every ``GpuPanelConfig.hub_activity_interval`` seconds, whether a kernel of this server has a
cell running on a GPU or a request waiting for one, and if so posts the activity of this server
to the Hub (``POST {JUPYTERHUB_API_URL}/users/{user}/activity`` with the server's own token, whose
``users:activity!user`` scope every server token has). An idle session is no activity: a server
whose kernels only hold idle sessions is culled like any idle server, and its kernels' leases end
with them.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import quote

from jupyter_gpu.common.protocol import HUB_USER_ENV

log = logging.getLogger(__name__)

HUB_API_ENV = (
    "JUPYTERHUB_API_URL"  # what JupyterHub puts in the environment of the servers it starts
)
HUB_SERVER_ENV = "JUPYTERHUB_SERVER_NAME"  # "" for a user's default server


def gpu_work_of(snapshot: dict[str, Any], kernels: Collection[str]) -> list[str]:
    """The ids of the leases running a cell and the requests waiting in the queue that belong to
    ``kernels`` (this server's kernel ids): what keeps the server busy although its kernels may be
    idle."""
    busy = {
        ls["id"]
        for gpu in snapshot.get("gpus") or ()
        for ls in gpu.get("leases") or ()
        if ls.get("kernel") in kernels and ls.get("state") == "running"
    }
    busy.update(q["id"] for q in snapshot.get("queue") or () if q.get("kernel") in kernels)
    return sorted(busy)


class HubActivity:
    """Posts this server's activity to the Hub while its kernels have GPU work (module
    docstring)."""

    def __init__(
        self,
        call: Callable[..., Any],
        kernels: Callable[[], Collection[str]],
        interval: float,
        env: dict[str, str] | None = None,
    ):
        env = dict(os.environ if env is None else env)
        self.call = call  # PoolLink.call: a broker handler, answered
        self.kernels = kernels
        self.interval = interval
        self.api_url = (env.get(HUB_API_ENV) or "").rstrip("/")
        self.token = env.get("JUPYTERHUB_API_TOKEN") or ""
        self.user = env.get(HUB_USER_ENV) or ""
        self.server = env.get(HUB_SERVER_ENV, "")
        self.reported = 0  # how many times activity was posted (tests read it)
        self._task: asyncio.Task[None] | None = None

    @property
    def behind_hub(self) -> bool:
        return bool(self.api_url and self.token and self.user)

    def start(self) -> None:
        if self.behind_hub and self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
            log.info(
                "reporting GPU work to JupyterHub as activity of %s every %g s",
                self.user,
                self.interval,
            )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - the pool or the Hub may be away: try again next time
                log.debug("could not report GPU activity to the Hub: %s", exc)

    async def tick(self) -> bool:
        """One look at the pool; posts the activity when this server has GPU work. Returns
        whether it did."""
        kernels = set(self.kernels())
        if not kernels:
            return False
        busy = gpu_work_of(await self.call("gpu_snapshot"), kernels)
        if not busy:
            return False
        await self.post()
        log.debug("GPU work %s: reported activity to JupyterHub", ", ".join(busy))
        return True

    async def post(self) -> None:
        from tornado.httpclient import AsyncHTTPClient, HTTPRequest

        now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        body = {"last_activity": now, "servers": {self.server: {"last_activity": now}}}
        await AsyncHTTPClient().fetch(
            HTTPRequest(
                f"{self.api_url}/users/{quote(self.user, safe='')}/activity",
                method="POST",
                headers={"Authorization": f"token {self.token}"},
                body=json.dumps(body),
                request_timeout=10,
            )
        )
        self.reported += 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
