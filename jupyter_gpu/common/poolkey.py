"""The pool key: what the parts of a pool show each other, and what users never hold.

Why: a kernel and a worker both connect to the scheduler, and Dask cannot tell them apart. A user's
code must not be able to act as a worker (offer a fake GPU, report a 10 TB peak for someone else's
lease, end a session), nor as the broker towards a worker. So the scheduler and the workers share a
secret, the pool key, in a file only the pool's service account can read; every handler meant for
workers or the broker asks for it, and user code (in kernels and sessions, under the users'
accounts) cannot read it.

Where it lives: ``jupyter-gpu.pool-key-file`` if set (a pool across machines: copy the file to each
worker machine, readable only by the service account), else ``jupyter-gpu-pool-<port>.key`` in the
service account's Jupyter runtime folder, which ``jupyter-gpu pool up`` creates on first start and a
``jupyter-gpu worker`` of the same account on the same machine finds by the scheduler's port.
"""

from __future__ import annotations

import hmac
import os
import secrets

from jupyter_gpu.common import config


def key_path(scheduler_address: str) -> str:
    """The key file of the pool whose scheduler is at ``scheduler_address``."""
    configured = config.get("pool-key-file")
    if configured:
        return os.path.expanduser(str(configured))
    from jupyter_core.paths import jupyter_runtime_dir

    port = scheduler_address.rsplit(":", 1)[-1].strip("/")
    return os.path.join(jupyter_runtime_dir(), f"jupyter-gpu-pool-{port}.key")


def read_key(path: str) -> str | None:
    """The key in ``path``, or None when there is no such file (or it is not ours to read)."""
    try:
        with open(path) as f:
            key = f.read().strip()
    except OSError:
        return None
    return key or None


def ensure_key(path: str) -> str:
    """The key in ``path``, created (0600, in a 0700 folder) when there is none yet."""
    key = read_key(path)
    if key is not None:
        return key
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    key = secrets.token_urlsafe(32)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)
    return key


def matches(given: str | None, key: str | None) -> bool:
    """Whether ``given`` is the pool key (constant time); with no key configured nothing is
    checked."""
    if key is None:
        return True
    return given is not None and hmac.compare_digest(given, key)
