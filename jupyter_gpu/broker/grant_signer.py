"""The broker's side of grants (``common/grants.py``): the signing key, and a lease's grant.

Why here, held in memory: the key must not be readable by the pool's service account, which the
scheduler runs as (so do the workers, and anyone holding the pool key can act as one). ``jupyter-gpu
pool up`` started as root reads it before it gives root up (``pool/privileges.py``) and hands it
to :func:`install`; it then exists only in the scheduler's memory, which other processes of the
service account cannot read. A scheduler started otherwise (as the service account, or any Dask
scheduler with ``--preload jupyter_gpu.broker.plugin``) reads the key file if it may; without a key
it signs nothing, and a worker whose sessions run as their users refuses them, saying so.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from jupyter_gpu.broker.model import Lease
from jupyter_gpu.common import grants

log = logging.getLogger(__name__)

_installed: list[Any] = []  # the key pool up read as root (at most one)


def install(key: Any) -> None:
    """The signing key ``pool up`` read as root, for the broker of this process."""
    _installed[:] = [key]


def signing_key(scheduler_address: str) -> Any | None:
    """The key to sign with: the installed one, else the key file if this account may read it,
    else None (no grants: sessions cannot run as their users)."""
    if _installed:
        return _installed[0]
    path = grants.private_key_path(scheduler_address)
    if not os.access(path, os.R_OK):
        return None
    try:
        from cryptography.hazmat.primitives import serialization

        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError) as exc:
        log.error("could not read the grant-signing key %s: %s", path, exc)
        return None
    log.warning(
        "the grant-signing key %s is readable by the pool's own account: any process of that "
        "account can sign grants. Start `jupyter-gpu pool up` as root instead.",
        path,
    )
    return key


def grant_for(lease: Lease, key: Any, account: str | None) -> str:
    """The signed grant for ``lease``'s session: the OS account it runs as (``account``: the one
    the broker mapped its user to, ``jupyter-gpu.session.accounts``; None: the pool's service
    account, and the grant names the pool user for the record), its lease, worker, GPUs and
    bytes, and the host memory and cores booked for it (the launcher's cgroup limits)."""
    gpus = [a.index for a in lease.allocations]
    grant = grants.new_grant(
        account or lease.user,
        lease.id,
        lease.worker,
        gpus,
        lease.bytes,
        account is not None,
        host_memory=lease.host_memory,
        cpu_milli=lease.cpu_milli,
    )
    return grants.sign(grant, key)
