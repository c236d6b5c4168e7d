"""The broker's settings, loaded and checked before the pool listens.

Why up front: a broker whose quota file, token file or audit store cannot be used must not leave
behind a scheduler that serves without it (every request then failed with an internal error).
``jupyter-gpu pool up`` loads these first and exits non-zero with the file, the line and the fix; a
scheduler started by hand with ``--preload jupyter_gpu.broker.plugin`` exits the same way.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from dataclasses import dataclass

from jupyter_gpu.broker.audit import AuditStore, audit_from_config
from jupyter_gpu.broker.hub_identity import (
    HubIdentity,
    HubSettings,
    HubSettingsError,
    hub_settings_from_config,
)
from jupyter_gpu.broker.identity import (
    Identities,
    TokenFileError,
    check_session_accounts,
    tokens_from_config,
)
from jupyter_gpu.broker.quotas import PoolQuotas, QuotaConfigError, quotas_from_config

log = logging.getLogger(__name__)


class PoolConfigError(Exception):
    """A setting of the pool cannot be used; the message names the file and the fix."""


@dataclass
class BrokerSettings:
    quotas: PoolQuotas
    tokens: Identities | None  # a token file, JupyterHub, or None: names are trusted as given
    audit: AuditStore


def secure_file(path: str, what: str) -> None:
    """A pool secret readable and writable by the pool's account only.

    A file another account owns, or in a folder others may write, could be changed by a user (a
    quota, a token): refused, naming the fix. A file of ours that others may read is made
    private (0600), with a warning: the pool starts, and its secrets stop leaking.
    """
    path = os.path.abspath(os.path.expanduser(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # the loaders say what is missing
    if st.st_uid != os.geteuid():
        raise PoolConfigError(
            f"the {what} {path} belongs to uid {st.st_uid}, not to the pool's account (uid "
            f"{os.geteuid()}): whoever owns it could change it. `chown` it to the pool's account "
            "and `chmod 600` it."
        )
    folder = os.stat(os.path.dirname(path))
    if folder.st_mode & 0o022 and not folder.st_mode & stat.S_ISVTX:
        raise PoolConfigError(
            f"the folder of the {what} {path} can be written by other accounts, who could replace "
            f"the file: keep pool secrets in a folder only the pool's account writes (chmod 700)."
        )
    if st.st_mode & 0o077:
        log.warning(
            "the %s %s could be read by other accounts (mode %o): made it 0600",
            what,
            path,
            stat.S_IMODE(st.st_mode),
        )
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def load_settings() -> BrokerSettings:
    """Quotas (``jupyter-gpu.pool-config``), identities (``jupyter-gpu.token-file``, or
    JupyterHub's tokens: ``jupyter-gpu.hub.*``) and the audit store (``jupyter-gpu.audit-db``) from
    Dask config, each checked (and kept private: ``secure_file``); raises ``PoolConfigError``."""
    from jupyter_gpu.common import config

    for key, what in (
        ("pool-config", "quota file"),
        ("token-file", "token file"),
        ("hub.api-token-file", "JupyterHub service token file"),
        ("audit-db", "audit store"),
    ):
        if config.get(key):
            secure_file(str(config.get(key)), what)
    try:
        quotas = quotas_from_config()
    except QuotaConfigError as exc:
        raise PoolConfigError(str(exc)) from None
    store = tokens_from_config()
    try:
        hub = hub_settings_from_config()
        if store is not None:
            store.validate()
    except (TokenFileError, HubSettingsError) as exc:
        raise PoolConfigError(str(exc)) from None
    tokens: Identities | None = hub_identity(hub, quotas) if hub is not None else store
    accounts = check_session_accounts(config.get("session.accounts"))
    if accounts is not None:
        raise PoolConfigError(accounts)
    try:
        audit = audit_from_config()
    except (sqlite3.Error, OSError) as exc:
        from jupyter_gpu.common import config

        raise PoolConfigError(
            f"cannot open the audit store {config.get('audit-db')} (jupyter-gpu.audit-db): {exc}. "
            "Its folder must exist and be writable by the pool's service account."
        ) from None
    return BrokerSettings(quotas=quotas, tokens=tokens, audit=audit)


def hub_identity(hub: HubSettings, quotas: PoolQuotas) -> HubIdentity:
    """JupyterHub as the identity source, checked against the quotas; JupyterHub's own client
    library must be installed where the pool runs."""
    try:
        import jupyterhub.services.auth  # noqa: F401
    except ImportError:
        raise PoolConfigError(
            "jupyter-gpu.hub.api-url is set but JupyterHub's client library is not installed "
            "where the pool runs: `pip install 'jupyter-gpu[hub]'` (or unset the Hub's URL)."
        ) from None
    identity = HubIdentity(hub)
    try:
        identity.check_requirements(quotas)
    except HubSettingsError as exc:
        raise PoolConfigError(str(exc)) from None
    return identity
