"""The Hub service page's tornado application: login through the Hub, the pool as one page.

Why a page of its own rather than the panel: the panel lives in each user's JupyterLab; the
Hub's service page is where an administrator (or anyone allowed) looks at the whole pool without
opening a server, and where the Hub's home page links to (``/services/<name>/``). It is read-only:
cancelling stays in the panel and ``%gpu cancel``, which act with their own server's identity.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import os
import secrets
import time
from typing import Any
from urllib.parse import urlparse

from jupyter_gpu.common.units import format_bytes

log = logging.getLogger(__name__)

REFRESH_S = 5  # the page reloads itself


def page(snapshot: dict[str, Any], user: str) -> str:
    """The pool as HTML for ``user``: GPUs and who holds what, the queue, the teams' quotas."""
    e = html.escape
    viewer = snapshot.get("viewer") or {}
    gpu_rows = "".join(
        "<tr><td>{}</td><td>{} / {}</td><td>{}</td></tr>".format(
            e(f"{g.get('host')}: {g['name']}" + (" [virtual]" if g.get("virtual") else "")),
            format_bytes(g["leased_bytes"]),
            format_bytes(g["total_bytes"]),
            e(
                ", ".join(
                    f"{ls['user']}{' (you)' if ls['user'] == user else ''} "
                    f"{ls['fraction']:g} ({ls['state']})"
                    for ls in g.get("leases") or ()
                )
                or "idle"
            ),
        )
        for g in snapshot.get("gpus") or ()
    )
    now = snapshot.get("time") or time.time()
    queue_rows = "".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.0f} s</td><td>{}</td></tr>".format(
            q["position"], e(q["user"]), e(q["request"]), now - q["since"], e(q.get("reason") or "")
        )
        for q in snapshot.get("queue") or ()
    )
    quotas = snapshot.get("quotas") or {}
    team_rows = "".join(
        "<tr><td>{}</td><td>{:g}</td><td>{}</td><td>{:g}</td><td>{}</td></tr>".format(
            e(t["team"]),
            t["guarantee"],
            "-" if t.get("limit") is None else f"{t['limit']:g}",
            t["held"],
            e(", ".join(t.get("members") or ())),
        )
        for t in quotas.get("teams") or ()
    )
    role = (
        "You are an administrator of the pool: cancel anyone's work from your JupyterLab's GPU "
        "panel or with <code>%gpu cancel ID</code>."
        if viewer.get("admin")
        else "Your own sessions can be cancelled from your JupyterLab's GPU panel."
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>GPU pool</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:left}}</style>
</head><body>
<h1>GPU pool</h1>
<p id="who">Signed in through JupyterHub as <b>{e(user)}</b>. {role}</p>
<h2>GPUs</h2>
<table id="gpus"><tr><th>GPU</th><th>leased</th><th>held by</th></tr>{gpu_rows}</table>
<h2>Queue</h2>
{f'<table id="queue"><tr><th>#</th><th>user</th><th>request</th><th>waiting</th><th>reason</th></tr>{queue_rows}</table>' if queue_rows else "<p>nobody waits</p>"}
{f'<h2>Teams</h2><table id="teams"><tr><th>team</th><th>guarantee</th><th>limit</th><th>holds</th><th>members</th></tr>{team_rows}</table>' if team_rows else ""}
</body></html>"""


def make_app(address: str, prefix: str) -> Any:
    """The service's tornado application under ``prefix`` (``/services/<name>/``)."""
    from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
    from tornado import web

    from jupyter_gpu.common.security import pool_rpc

    async def snapshot(user: str, token: str | None) -> dict[str, Any]:
        async with pool_rpc(address) as r:
            who = {"user": user, **({"token": token} if token else {})}
            return dict(await asyncio.wait_for(r.gpu_snapshot(**who), 10))

    class PoolHandler(HubOAuthenticated, web.RequestHandler):
        """Only users whose Hub login carries the service's access scope get in (HubOAuth)."""

        async def read(self) -> tuple[str, dict[str, Any]]:
            model = self.get_current_user()
            name = str(model["name"])
            try:
                return name, await snapshot(name, self.hub_auth.get_token(self))
            except Exception as exc:  # noqa: BLE001 - the pool away in any way is shown, not raised
                log.warning("the pool at %s did not answer: %s", address, exc)
                raise web.HTTPError(
                    503, f"the GPU pool at {address} does not answer now ({exc})"
                ) from None

    class PageHandler(PoolHandler):
        @web.authenticated
        async def get(self) -> None:
            name, snap = await self.read()
            self.set_header("Cache-Control", "no-store")
            self.finish(page(snap, name))

    class SnapshotHandler(PoolHandler):
        @web.authenticated
        async def get(self) -> None:
            _, snap = await self.read()
            self.set_header("Content-Type", "application/json")
            self.set_header("Cache-Control", "no-store")
            self.finish(json.dumps(snap))

    return web.Application(
        [
            (prefix, PageHandler),
            (prefix + "api/snapshot", SnapshotHandler),
            (prefix + "oauth_callback", HubOAuthCallbackHandler),
        ],
        cookie_secret=secrets.token_bytes(32),
    )


def main() -> None:
    """Serve where the Hub says (``JUPYTERHUB_SERVICE_URL``, ``JUPYTERHUB_SERVICE_PREFIX``), for
    the pool named by ``JUPYTER_GPU_SCHEDULER``."""
    from tornado.ioloop import IOLoop

    logging.basicConfig(level=logging.INFO, format="[jupyter-gpu hub service] %(message)s")
    address = os.environ.get("JUPYTER_GPU_SCHEDULER")
    url = os.environ.get("JUPYTERHUB_SERVICE_URL")
    if not address or not url:
        raise SystemExit(
            "jupyter-gpu's Hub service needs JUPYTER_GPU_SCHEDULER (the pool's address: put it in "
            "the service's environment in jupyterhub_config.py) and JUPYTERHUB_SERVICE_URL (the "
            "Hub sets it for a managed service; give the service a url). See docs/jupyterhub.md."
        )
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/jupyter-gpu/")
    where = urlparse(url)
    app = make_app(address, prefix)
    app.listen(where.port or 80, where.hostname or "127.0.0.1")
    log.info("the pool at %s, shown at %s%s", address, url.rstrip("/"), prefix)
    IOLoop.current().start()
