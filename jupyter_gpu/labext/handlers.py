"""HTTP and websocket routes of the GPU panel, all under ``<base_url>/jupyter-gpu/``.

Every HTTP verb method is wrapped by ``tornado.web.authenticated`` (tests/labext enumerates
them): the routes can start a pool, scale it and cancel work in the server user's name, so an
unauthenticated request must never reach them. ``APIHandler`` turns the login redirect into a
403; the websocket handler does the same, since a redirect is meaningless to a websocket.

Routes:

- ``GET  api/snapshot``      the pool snapshot (``state`` ok / no-pool / unreachable, see ``PoolLink``)
- ``POST api/pool``          start (or find) this user's embedded pool
- ``POST api/scale``         ``{"n": int}`` or ``{"minimum": int, "maximum": int}`` → broker ``gpu_scale``
- ``POST api/cancel/<id>``   cancel my queued request or lease → broker ``gpu_cancel``
- ``GET  api/stream``        websocket: one snapshot JSON text per update interval, from the shared poller
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.utils import url_path_join
from tornado import websocket

from jupyter_gpu.common.refusals import CallError
from jupyter_gpu.labext.pool_link import PoolLink, PoolUnavailable, server_token, server_user

log = logging.getLogger(__name__)

ROUTE_PREFIX = "jupyter-gpu"
SETTINGS_KEY = "jupyter_gpu_pool_link"


class _PoolHandlerMixin:
    """Access to the server-wide ``PoolLink`` stored in the tornado settings by
    ``GpuPanelExtension``."""

    @property
    def pool(self) -> PoolLink:
        return self.settings[SETTINGS_KEY]  # type: ignore[attr-defined]


class _ApiBase(_PoolHandlerMixin, APIHandler):
    def json_body(self) -> dict:
        """Parse the request body as a JSON object, or answer 400 saying what was wrong."""
        raw = self.request.body or b"{}"
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise tornado.web.HTTPError(400, f"request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise tornado.web.HTTPError(400, "request body must be a JSON object")
        return body

    def reply(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload))


class SnapshotHandler(_ApiBase):
    """The current pool snapshot; the panel's first paint and its fallback when the websocket is
    down."""

    @tornado.web.authenticated
    async def get(self) -> None:
        # A snapshot fetched by the shared poller within the last half interval is as fresh as a new
        # one.
        text = await self.pool.snapshot_text(max_age=self.pool.config.update_interval / 2)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(text)


class StartPoolHandler(_ApiBase):
    """The no-pool state's Start button: bring up this user's embedded pool on this machine."""

    @tornado.web.authenticated
    async def post(self) -> None:
        from jupyter_gpu.pool.launcher import ensure_embedded_pool

        timeout = self.pool.config.start_timeout
        loop = asyncio.get_running_loop()
        try:
            # ensure_embedded_pool blocks (it spawns processes and waits for them): keep it off the
            # event loop keep=True: the panel is not a Dask client, so a pool it starts must not
            # shut itself down after the short no-client idle timeout while the user is still
            # looking at it
            address = await loop.run_in_executor(
                None, lambda: ensure_embedded_pool(timeout=timeout, keep=True)
            )
        except Exception as exc:
            log.exception("starting the embedded GPU pool failed")
            self.reply({"started": False, "error": str(exc) or type(exc).__name__}, status=500)
            return
        log.info("embedded GPU pool running at %s (started from the panel)", address)
        self.reply({"started": True, "address": address})


MAX_WORKERS = 100_000  # what the broker accepts for a scale (and more than any real pool)


def _as_count(body: dict, key: str) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WORKERS:
        raise tornado.web.HTTPError(
            400, f"{key!r} must be a whole number from 0 to {MAX_WORKERS}, got {value!r}"
        )
    return value


class ScaleHandler(_ApiBase):
    """The Scale dialog: a fixed worker count, or adaptive bounds, passed to the broker's cluster
    manager."""

    @tornado.web.authenticated
    async def post(self) -> None:
        body = self.json_body()
        if "n" in body:
            kwargs: dict[str, Any] = {"n": _as_count(body, "n")}
        elif "minimum" in body and "maximum" in body:
            minimum, maximum = _as_count(body, "minimum"), _as_count(body, "maximum")
            if minimum > maximum:
                raise tornado.web.HTTPError(
                    400, f"minimum ({minimum}) must not exceed maximum ({maximum})"
                )
            kwargs = {"minimum": minimum, "maximum": maximum}
        else:
            raise tornado.web.HTTPError(400, 'send {"n": workers} or {"minimum": m, "maximum": M}')
        try:
            token = server_token(self.pool.config)
            result = await self.pool.call(
                "gpu_scale",
                timeout=self.pool.config.start_timeout,
                user=server_user(self.pool.config),
                **({"token": token} if token else {}),
                **kwargs,
            )
        except PoolUnavailable as exc:
            raise tornado.web.HTTPError(409, str(exc)) from exc
        except CallError as exc:  # the broker refused: e.g. a pool without a cluster manager
            self.reply({"error": str(exc)}, status=409)
            return
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            log.warning("gpu_scale failed: %s", error)
            raise tornado.web.HTTPError(502, f"the pool did not scale: {error}") from exc
        self.reply(result)


class CancelHandler(_ApiBase):
    """Cancel button of "my sessions" and the queue: the broker checks that the work is this user's.

    A pool with a token file (Dask config ``jupyter-gpu.token-file``) also checks the user's
    token, so the server sends its own (``GpuPanelConfig.token`` or ``JUPYTER_GPU_TOKEN``), as
    the user's kernels do. The broker's refusal (a ``Refused``: someone else's work, a missing or
    wrong token) is answered as ``{"cancelled": false, "what": reason}``, for the panel to show.
    """

    @tornado.web.authenticated
    async def post(self, item_id: str) -> None:
        kwargs: dict[str, Any] = {"id": item_id, "user": server_user(self.pool.config)}
        token = server_token(self.pool.config)
        # only when set: a pool without tokens ignores it, and the reply names what is missing
        if token:
            kwargs["token"] = token
        try:
            result = await self.pool.call("gpu_cancel", **kwargs)
        except PoolUnavailable as exc:
            raise tornado.web.HTTPError(409, str(exc)) from exc
        except CallError as exc:  # someone else's work, a missing or wrong token: said as is
            self.reply({"cancelled": False, "what": str(exc)})
            return
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            log.warning("gpu_cancel %s failed: %s", item_id, error)
            raise tornado.web.HTTPError(
                502, f"the pool did not answer the cancel: {error}"
            ) from exc
        self.reply(result)


class StreamHandler(_PoolHandlerMixin, WebSocketMixin, websocket.WebSocketHandler, JupyterHandler):
    """Websocket pushing snapshots; each socket only subscribes to the server's single poller."""

    def get_login_url(self) -> str:
        """``tornado.web.authenticated`` redirects GETs to the login page; a websocket gets 403
        instead."""
        raise tornado.web.HTTPError(403)

    @tornado.web.authenticated
    # tornado types what authenticated returns as Awaitable | None: narrower than the base's get
    async def get(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        res = super().get(*args, **kwargs)
        if res is not None:
            await res

    def open(self, *args: Any, **kwargs: Any) -> None:
        super().open()  # WebSocketMixin: keep-alive pings
        self.pool.subscribe(self._push)
        log.debug("panel websocket opened (%d listening)", self.pool.listeners)

    def _push(self, text: str) -> None:
        if self.ws_connection is None or self.ws_connection.is_closing():
            raise websocket.WebSocketClosedError()
        self.write_message(text)

    def on_message(self, message: str | bytes) -> None:
        """The panel sends nothing but an optional ``refresh``; answer it with the latest
        snapshot."""
        if message == "refresh":
            asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            self._push(await self.pool.snapshot_text(max_age=0))
        except websocket.WebSocketClosedError:
            pass

    def on_close(self) -> None:
        self.pool.unsubscribe(self._push)
        log.debug("panel websocket closed (%d listening)", self.pool.listeners)


def handler_classes() -> list[tuple[str, type]]:
    """Route patterns (relative to ``<base_url>/jupyter-gpu/``) and handlers; tests enumerate this
    list."""
    return [
        (r"api/snapshot", SnapshotHandler),
        (r"api/pool", StartPoolHandler),
        (r"api/scale", ScaleHandler),
        (r"api/cancel/(?P<item_id>[^/]+)", CancelHandler),
        (r"api/stream", StreamHandler),
    ]


def route_pattern(base_url: str, pattern: str) -> str:
    """Full URL pattern of one route (the tests and the app agree through this)."""
    return url_path_join(base_url, ROUTE_PREFIX, pattern)
