"""The broker's settings, loaded and checked before the pool listens.

Why up front: a broker whose quota file, token file or audit store cannot be used must not leave behind a
scheduler that serves without it (every request then failed with an internal error). ``jupyter-gpu pool
up`` loads these first and exits non-zero with the file, the line and the fix; a scheduler started by hand
with ``--preload jupyter_gpu.broker.plugin`` exits the same way.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from jupyter_gpu.broker.audit import AuditStore, audit_from_config
from jupyter_gpu.broker.identity import TokenFileError, TokenStore, tokens_from_config
from jupyter_gpu.broker.quotas import PoolQuotas, QuotaConfigError, quotas_from_config


class PoolConfigError(Exception):
    """A setting of the pool cannot be used; the message names the file and the fix."""


@dataclass
class BrokerSettings:
    quotas: PoolQuotas
    tokens: TokenStore | None
    audit: AuditStore


def load_settings() -> BrokerSettings:
    """Quotas (``jupyter-gpu.pool-config``), tokens (``jupyter-gpu.token-file``) and the audit store
    (``jupyter-gpu.audit-db``) from Dask config, each checked; raises ``PoolConfigError``."""
    try:
        quotas = quotas_from_config()
    except QuotaConfigError as exc:
        raise PoolConfigError(str(exc)) from None
    tokens = tokens_from_config()
    if tokens is not None:
        try:
            tokens.validate()
        except TokenFileError as exc:
            raise PoolConfigError(str(exc)) from None
    try:
        audit = audit_from_config()
    except (sqlite3.Error, OSError) as exc:
        from jupyter_gpu.common import config

        raise PoolConfigError(f"cannot open the audit store {config.get('audit-db')} (jupyter-gpu.audit-db): {exc}. "
                              "Its folder must exist and be writable by the pool's service account.") from None
    return BrokerSettings(quotas=quotas, tokens=tokens, audit=audit)
