"""What a JupyterHub administrator adds to ``jupyterhub_config.py`` for the pool, in one call.

``configure(c, pool="tcp://10.0.0.5:8786", api_token=...)`` declares the pool as a Hub service
(its page, hub-managed by default, or external with ``managed=False``), the roles and scopes it
needs, the custom admin scope, the scopes of the servers' tokens, and the pool's address in every
server's environment. Each piece is a plain JupyterHub setting, listed in docs/jupyterhub.md for
administrators who prefer to write them out (and for Zero-to-JupyterHub's ``values.yaml``, whose
equivalent ships beside this file as ``z2jh-values.yaml``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from jupyter_gpu.common.protocol import HUB_ADMIN_SCOPE, SCHEDULER_ENV

SERVICE_SCOPES = ("list:users", "read:users", "list:groups", "read:groups")


def service_entry(
    pool: str,
    api_token: str,
    name: str = "jupyter-gpu",
    url: str | None = None,
    managed: bool = True,
) -> dict[str, Any]:
    """``c.JupyterHub.services`` entry of the pool: its page at ``/services/<name>/`` (``url``:
    where the page listens), and the token the pool's broker shows the Hub (read groups)."""
    entry: dict[str, Any] = {
        "name": name,
        "api_token": api_token,
        "oauth_no_confirm": True,  # its page is the Hub's own: no "authorize" screen
        "display": True,
        "info": {"description": "Who holds which GPU of the shared pool, and who waits"},
    }
    if url:
        entry["url"] = url
        if managed:
            entry["command"] = [sys.executable, "-m", "jupyter_gpu.hubservice"]
            entry["environment"] = {SCHEDULER_ENV: pool}
    return entry


def roles(name: str = "jupyter-gpu", admin_groups: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``c.JupyterHub.load_roles``: the service may list users and groups; every user may use the
    pool's service (their servers' tokens carry that scope); ``admin_groups`` get the admin scope."""
    access = f"access:services!service={name}"
    result: list[dict[str, Any]] = [
        {"name": f"{name}-service", "scopes": list(SERVICE_SCOPES), "services": [name]},
        {"name": "user", "scopes": ["self", access]},
    ]
    groups = list(admin_groups)
    if groups:
        result.append(
            {"name": f"{name}-admins", "scopes": [HUB_ADMIN_SCOPE, access], "groups": groups}
        )
    return result


def server_token_scopes(name: str = "jupyter-gpu") -> list[str]:
    """``c.Spawner.server_token_scopes``: the default server role's, plus the pool's access and
    admin scopes (a token gets only those its user holds)."""
    return [
        "users:activity!user",
        "access:servers!server",
        f"access:services!service={name}",
        HUB_ADMIN_SCOPE,
    ]


def configure(
    c: Any,
    pool: str,
    api_token: str,
    name: str = "jupyter-gpu",
    url: str | None = "http://127.0.0.1:10101",
    managed: bool = True,
    admin_groups: Iterable[str] = (),
) -> None:
    """Add the pool to a ``jupyterhub_config.py``'s ``c`` (see the module docstring); settings
    made before are kept (services, roles, custom scopes, the spawner's environment)."""
    hub = c.JupyterHub
    hub.services = [
        *_set(hub, "services", list),
        service_entry(pool, api_token, name, url, managed),
    ]
    hub.load_roles = [*_set(hub, "load_roles", list), *roles(name, admin_groups)]
    scopes = _set(hub, "custom_scopes", dict)
    scopes[HUB_ADMIN_SCOPE] = {
        "description": "See and cancel every user's work on the shared GPU pool."
    }
    c.JupyterHub.custom_scopes = scopes
    c.Spawner.server_token_scopes = server_token_scopes(name)
    env = _set(c.Spawner, "environment", dict)
    env[SCHEDULER_ENV] = pool
    c.Spawner.environment = env


def _set(section: Any, key: str, kind: type) -> Any:
    """A copy of what ``section.key`` was set to, or an empty ``kind`` (traitlets answers an unset
    key with a placeholder, not a value)."""
    value = section[key] if key in section else None
    return kind(value) if isinstance(value, kind) else kind()
