"""How kernels, the panel and the CLI find the pool they share.

``JUPYTER_GPU_SCHEDULER`` names a pool explicitly. Otherwise each user on a machine has one embedded
pool, advertised by a small JSON file in the Jupyter runtime directory, so every kernel and the
panel of that user join the same pool and really contend for the same GPUs.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from dataclasses import dataclass

from jupyter_core.paths import jupyter_runtime_dir

from jupyter_gpu.common import processes
from jupyter_gpu.common.protocol import (
    HUB_TOKEN_ENV,
    HUB_USER_ENV,
    SCHEDULER_ENV,
    TOKEN_ENV,
    USER_ENV,
)


def user_name() -> str:
    """Who this process acts for: ``JUPYTER_GPU_USER``, else the JupyterHub user of a server the
    Hub started (``JUPYTERHUB_USER``, its kernels inherit it), else the login name."""
    return os.environ.get(USER_ENV) or os.environ.get(HUB_USER_ENV) or getpass.getuser()


def pool_token(embedded: bool | None = None) -> str | None:
    """The token this process shows the pool for ``user_name()``: ``JUPYTER_GPU_TOKEN``; else, in
    a server JupyterHub started (and its kernels), the Hub's own token of its user
    (``JUPYTERHUB_API_TOKEN``), which a pool behind the Hub accepts (``broker/hub_identity.py``).

    The Hub's token goes only to a pool named for this process (``embedded`` False; by default:
    ``JUPYTER_GPU_SCHEDULER`` is set, as the Hub's spawner sets it), never to an embedded pool,
    and only when the pool user is the Hub's user: it also opens the user's own server.
    """
    explicit = os.environ.get(TOKEN_ENV)
    if explicit:
        return explicit
    hub_token = os.environ.get(HUB_TOKEN_ENV)
    if embedded is None:
        embedded = not os.environ.get(SCHEDULER_ENV)
    if not hub_token or embedded or user_name() != os.environ.get(HUB_USER_ENV):
        return None
    return hub_token


def runtime_file(user: str | None = None) -> str:
    """The embedded pool's advertisement file for ``user`` (the JUPYTER_RUNTIME_DIR is honoured)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (user or user_name()))
    return os.path.join(jupyter_runtime_dir(), f"jupyter-gpu-pool-{safe}.json")


@dataclass
class PoolRecord:
    """What the runtime file says about an embedded pool. ``tls``: the folder of the TLS credentials
    it made for itself (None when it uses the administrator's); its clients find them from its
    address anyway (``jupyter_gpu.common.pool_credentials``), this is for whoever cleans up after a
    killed pool."""

    address: str
    pid: int
    started: float
    keep: bool = False
    log: str | None = None
    tls: str | None = None


def read_record(path: str | None = None) -> PoolRecord | None:
    path = path or runtime_file()
    try:
        with open(path) as f:
            data = json.load(f)
        return PoolRecord(
            **{k: data[k] for k in ("address", "pid", "started") if k in data},
            keep=bool(data.get("keep")),
            log=data.get("log"),
            tls=data.get("tls"),
        )
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_record(record: PoolRecord, path: str | None = None) -> None:
    path = path or runtime_file()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record.__dict__, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a child of ours that exited is reaped, not mistaken for alive)."""
    return processes.pid_alive(pid, reap=True)


def address_reachable(address: str, timeout: float = 1.0) -> bool:
    """A TCP connect to the scheduler's port: cheap and needs no event loop."""
    from distributed.comm import parse_address, parse_host_port

    try:
        _, loc = parse_address(address)
        host, port = parse_host_port(loc)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def live_embedded_pool(path: str | None = None) -> PoolRecord | None:
    """The advertised embedded pool if its process is alive and its scheduler answers."""
    record = read_record(path)
    if record and pid_alive(record.pid) and address_reachable(record.address):
        return record
    return None


def pool_address() -> str | None:
    """The pool to use: ``JUPYTER_GPU_SCHEDULER``, else this user's live embedded pool, else
    None."""
    explicit = os.environ.get(SCHEDULER_ENV)
    if explicit:
        return explicit
    record = live_embedded_pool()
    return record.address if record else None
