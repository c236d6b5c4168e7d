"""JupyterHub as the pool's identity source: the Hub's own API tokens are the users' pool tokens.

Why: teams that share GPUs among notebook users run JupyterHub, and a Hub already gives every
single-user server (and the kernels it starts) a token of its user (``JUPYTERHUB_API_TOKEN``).
With Dask config ``jupyter-gpu.hub.api-url`` set, the broker accepts those tokens instead of a
token file, so nobody hands out pool tokens: it asks the Hub who a token belongs to
(``GET {api-url}/user`` with it, through JupyterHub's own ``HubAuth``) and takes the name, the
admin flag and the groups the Hub gives. A token must carry one of ``hub.scopes`` (by default
``access:services!service=<hub.service-name>``, the scope that lets a user use the pool's Hub
service); a Hub admin, or a token with ``hub.admin-scope`` (``custom:jupyter-gpu:admin``), may see
and cancel everyone's work.

Answers (refusals too) are kept for ``hub.cache-time``: a revoked token is refused within that
time, and the Hub is asked at most once per token and period, however often kernels call. When the
Hub does not answer, a token it has not vouched for within that time is refused with the reason;
nothing else stops (running cells talk to their sessions, not to the Hub).

Quota teams may name Hub groups (``hub-group`` in the quota file, ``broker/quotas.py``): their
members are read with the pool service's own token (``hub.api-token-file``, or
``JUPYTERHUB_API_TOKEN`` when the Hub starts the pool as a managed service) every
``hub.groups-refresh``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlencode

from jupyter_gpu.broker.identity import Verdict

if TYPE_CHECKING:
    from jupyter_gpu.broker.quotas import PoolQuotas

log = logging.getLogger(__name__)

GROUPS_PAGE = 200  # groups per page of the Hub's listing


class HubSettingsError(ValueError):
    """The JupyterHub settings cannot be used; the message names the setting and the fix."""


@dataclass(frozen=True)
class HubSettings:
    """Dask config ``jupyter-gpu.hub.*``, checked (``hub_settings_from_config``)."""

    api_url: str  # e.g. http://127.0.0.1:8081/hub/api
    service_token: str | None  # the pool service's own token: reads the groups quota teams name
    service_name: str
    scopes: tuple[str, ...]  # a user's token must carry one of these
    admin_scope: str | None
    cache_time: float
    groups_refresh: float
    timeout: float


def _read_token_file(path: str) -> str:
    """The service's token (``broker/settings.py`` checked who may read the file first)."""
    try:
        with open(os.path.expanduser(path)) as f:
            token = f.read().strip()
    except OSError as exc:
        raise HubSettingsError(
            f"cannot use the pool's JupyterHub token file {path} (jupyter-gpu.hub.api-token-file): "
            f"{exc}. Write the service's api_token there (0600, owned by the pool's account)."
        ) from None
    if not token:
        raise HubSettingsError(
            f"the pool's JupyterHub token file {path} (jupyter-gpu.hub.api-token-file) is empty: "
            "write the api_token of the pool's service in jupyterhub_config.py there."
        )
    return token


def hub_settings_from_config() -> HubSettings | None:
    """The Hub settings from Dask config, or None when ``jupyter-gpu.hub.api-url`` is unset (no
    Hub). Raises ``HubSettingsError`` naming the setting and the fix."""
    from jupyter_gpu.common import config

    url = config.get("hub.api-url")
    if not url:
        return None
    url = str(url).rstrip("/")
    if not url.startswith(("http://", "https://")) or not url.endswith("/api"):
        raise HubSettingsError(
            f"jupyter-gpu.hub.api-url {url!r} is not the Hub's API: write its URL as the pool "
            "reaches it, ending in /hub/api (e.g. http://10.0.0.5:8081/hub/api)."
        )
    if config.get("token-file"):
        raise HubSettingsError(
            "both jupyter-gpu.token-file and jupyter-gpu.hub.api-url are set: a pool checks "
            "identities one way. Unset the token file to accept JupyterHub's tokens, or the Hub's "
            "URL to keep the token file."
        )
    path = config.get("hub.api-token-file")
    token = _read_token_file(str(path)) if path else os.environ.get("JUPYTERHUB_API_TOKEN")
    name = str(config.get("hub.service-name") or "jupyter-gpu")
    scopes = config.get("hub.scopes")
    if scopes is None:
        scopes = [f"access:services!service={name}"]
    elif isinstance(scopes, str):
        scopes = [scopes]
    if not scopes or not all(isinstance(s, str) and s for s in scopes):
        raise HubSettingsError(
            f"jupyter-gpu.hub.scopes {scopes!r} must be a list of JupyterHub scopes, e.g. "
            f"[access:services!service={name}], or null for that one."
        )
    try:
        cache = config.get_seconds("hub.cache-time")
        refresh = config.get_seconds("hub.groups-refresh")
        timeout = config.get_seconds("hub.timeout")
    except (TypeError, ValueError, KeyError) as exc:
        raise HubSettingsError(
            f"jupyter-gpu.hub.cache-time, groups-refresh and timeout are durations (e.g. 60s): "
            f"{exc}"
        ) from None
    if cache < 1 or refresh < 1 or timeout <= 0:
        raise HubSettingsError(
            "jupyter-gpu.hub.cache-time and groups-refresh must be at least 1s and hub.timeout "
            "above 0: every call would otherwise ask the Hub."
        )
    admin_scope = config.get("hub.admin-scope")
    return HubSettings(
        api_url=url,
        service_token=token or None,
        service_name=name,
        scopes=tuple(scopes),
        admin_scope=str(admin_scope) if admin_scope else None,
        cache_time=cache,
        groups_refresh=refresh,
        timeout=timeout,
    )


def has_scope(required: str, scopes: set[str]) -> bool:
    """Whether a token with ``scopes`` (as the Hub lists them: expanded, with their filters) holds
    ``required`` (JupyterHub's own rule: ``access:services`` holds
    ``access:services!service=x``)."""
    from jupyterhub.services.auth import check_scopes

    return bool(check_scopes({required}, scopes))


class HubIdentity:
    """The broker's ``Identities`` backed by JupyterHub; see the module docstring."""

    kind: Literal["tokens", "hub"] = "hub"

    def __init__(self, settings: HubSettings):
        from jupyterhub.services.auth import HubAuth

        self.settings = settings
        self.auth = HubAuth(
            api_url=settings.api_url,
            api_token=settings.service_token or "",
            cache_max_age=max(1, round(settings.cache_time)),
            access_scopes=set(settings.scopes),
        )
        self._refresher: asyncio.Task[None] | None = None
        self.groups_read: float | None = None  # when the groups were last read (loop time)

    def check_requirements(self, quotas: PoolQuotas) -> None:
        """Refuse settings that cannot work together, before the pool listens: teams named by Hub
        groups need the service's token to read them."""
        if quotas.hub_groups() and not self.settings.service_token:
            raise HubSettingsError(
                f"the quota file names JupyterHub groups ({', '.join(quotas.hub_groups().values())}"
                ") but the pool has no token of its own to read them: set "
                "jupyter-gpu.hub.api-token-file to a file holding the service's api_token (its "
                "role needs list:groups and read:groups; docs/jupyterhub.md)."
            )

    async def verify(self, user: str | None, token: str | None) -> Verdict:
        """Ask the Hub (or its recent answer) whether ``token`` is ``user``'s and may use the pool."""
        if not user or not token:
            return Verdict(
                "The pool takes JupyterHub's token: a kernel started by the Hub has it "
                "(JUPYTERHUB_USER and JUPYTERHUB_API_TOKEN). This one sent "
                + ("no user name." if not user else "no token.")
                + " Start the notebook from your Hub server, or set JUPYTER_GPU_USER and "
                "JUPYTER_GPU_TOKEN to your Hub name and a token from the Hub's token page."
            )
        try:
            model = await asyncio.wait_for(
                self.auth.user_for_token(token, sync=False), self.settings.timeout
            )
        except Exception as exc:  # noqa: BLE001 - the Hub failing in any way is a refusal saying why
            why = "it did not answer in time" if isinstance(exc, asyncio.TimeoutError) else exc
            log.warning("JupyterHub at %s could not check a token: %s", self.settings.api_url, why)
            return Verdict(
                f"The pool cannot check your JupyterHub token now: the Hub at "
                f"{self.settings.api_url} did not answer ({why}). Cells of the GPU sessions you "
                "hold go on; new %%gpu requests work again once the Hub is back (tell the Hub's "
                "administrator if it stays down)."
            )
        return self.judge(user, model)

    def judge(self, user: str, model: Mapping[str, Any] | None) -> Verdict:
        """The verdict on the Hub's answer about a token sent as ``user``'s."""
        if model is None:
            return Verdict(
                f"JupyterHub does not accept the token sent for user {user!r}: it was revoked or "
                "has expired. Restart your server from the Hub's home page (a new server gets a "
                "new token), or create a new token on the Hub's token page."
            )
        if model.get("kind", "user") != "user" or model.get("name") != user:
            return Verdict(
                f"The JupyterHub token sent for user {user!r} belongs to "
                f"{model.get('kind', 'user')} {model.get('name')!r}: send your own (in a Hub "
                "server JUPYTERHUB_USER and JUPYTERHUB_API_TOKEN go together)."
            )
        scopes = set(model.get("scopes") or ())
        if not any(has_scope(s, scopes) for s in self.settings.scopes):
            return Verdict(
                f"JupyterHub's token for {user!r} does not let its holder use the pool: it needs "
                f"{' or '.join(self.settings.scopes)}. The Hub's administrator grants it "
                "(a role with that scope for these users, and the scope in "
                "c.Spawner.server_token_scopes; docs/jupyterhub.md)."
            )
        admin_scope = self.settings.admin_scope
        admin = bool(model.get("admin")) or bool(admin_scope and has_scope(admin_scope, scopes))
        return Verdict(None, admin=admin, groups=frozenset(model.get("groups") or ()))

    # ------------------------------------------------------------------ groups of quota teams
    def start(self, quotas: PoolQuotas) -> None:
        """Read the groups that quota teams name now and every ``groups-refresh`` after."""
        if quotas.hub_groups() and self.settings.service_token and self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh(quotas))

    async def _refresh(self, quotas: PoolQuotas) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                groups = await asyncio.wait_for(self.read_groups(), self.settings.timeout * 4)
            except Exception as exc:  # noqa: BLE001 - the Hub down or refusing: keep the last members
                log.warning(
                    "could not read JupyterHub's groups (quota teams keep their last members): %s",
                    exc,
                )
            else:
                quotas.set_hub_members(groups)
                self.groups_read = loop.time()
            await asyncio.sleep(self.settings.groups_refresh)

    async def read_groups(self) -> dict[str, set[str]]:
        """Every Hub group and its members, page by page (the service's token; ``list:groups`` and
        ``read:groups``)."""
        from tornado.httpclient import AsyncHTTPClient, HTTPRequest

        client = AsyncHTTPClient()
        groups: dict[str, set[str]] = {}
        offset = 0
        while True:
            query = urlencode({"offset": offset, "limit": GROUPS_PAGE})
            reply = await client.fetch(
                HTTPRequest(
                    f"{self.settings.api_url}/groups?{query}",
                    headers={
                        "Authorization": f"token {self.settings.service_token}",
                        "Accept": "application/jupyterhub-pagination+json",
                    },
                    request_timeout=self.settings.timeout,
                )
            )
            page = json.loads(reply.body)
            items = page["items"] if isinstance(page, dict) else page
            for group in items:
                groups[str(group["name"])] = {str(u) for u in group.get("users") or ()}
            following = (
                (page.get("_pagination") or {}).get("next") if isinstance(page, dict) else None
            )
            if not following or not items:
                return groups
            offset = int(following.get("offset", offset + len(items)))

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        try:  # JupyterHub 6 keeps one aiohttp session per loop for HubAuth: close it with the loop
            from jupyterhub.httpclient import JupyterHubHTTPClient
        except ImportError:  # JupyterHub 4 and 5 use tornado's client: nothing to close
            return
        try:
            await JupyterHubHTTPClient.loop_instance().close()
        except Exception as exc:  # noqa: BLE001 - closing at shutdown is best effort
            log.debug("could not close JupyterHub's HTTP client: %s", exc)
