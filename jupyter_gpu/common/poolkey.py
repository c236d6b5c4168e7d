"""The pool key: what the parts of a pool prove to each other, and what users never hold.

Why: a kernel and a worker both connect to the scheduler, and Dask cannot tell them apart. A user's
code must not be able to act as a worker (offer a fake GPU, report a 10 TB peak for someone else's
lease, end a session), nor as the broker towards a worker. So the scheduler and the workers share a
secret, the pool key, in a file only the pool's service account can read; user code (in kernels and
sessions, under the users' accounts) cannot read it.

It never travels to the scheduler: a worker proves it holds the key with a :func:`proof` (an HMAC
of the key over what it does, the worker's address, the time and a fresh nonce) when it registers
and with each heartbeat, and the scheduler checks it (:class:`ProofChecker`: within five minutes,
each nonce once). Everything else a worker tells the broker goes on the stream it registered with,
which nobody else can write to. The broker shows the key itself to registered workers only, with
every order it gives them (``gpu_session_*``), and workers show it to each other (a copy handed
over).

Where it lives: ``jupyter-gpu.pool-key-file`` if set (a pool across machines: copy the file to each
worker machine, readable only by the service account), else ``jupyter-gpu-pool-<port>.key`` in the
service account's Jupyter runtime folder, which ``jupyter-gpu pool up`` creates on first start and a
``jupyter-gpu worker`` of the same account on the same machine finds by the scheduler's port.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from typing import Any

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


def proof(key: str | None, purpose: str, address: str, now: float | None = None) -> dict[str, Any]:
    """Proof that whoever sends it holds ``key``, for ``purpose`` (``register``, ``heartbeat``) by
    the worker at ``address`` (empty with no key configured)."""
    if key is None:
        return {}
    t = time.time() if now is None else now
    nonce = secrets.token_urlsafe(12)
    return {"time": t, "nonce": nonce, "mac": _mac(key, purpose, address, t, nonce)}


def _mac(key: str, purpose: str, address: str, t: float, nonce: str) -> str:
    text = f"jupyter-gpu|{purpose}|{address}|{t!r}|{nonce}"
    return hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest()


class ProofChecker:
    """Checks proofs (:func:`proof`) against the pool key: fresh (within ``window`` seconds), for this
    purpose and address, and each nonce once."""

    def __init__(self, window: float = 300.0) -> None:
        self.window = window
        self._seen: dict[str, float] = {}

    def check(
        self, given: object, key: str | None, purpose: str, address: str, now: float | None = None
    ) -> bool:
        if key is None:
            return True
        if not isinstance(given, dict):
            return False
        t, nonce, mac = given.get("time"), given.get("nonce"), given.get("mac")
        if (
            not isinstance(t, (int, float))
            or not isinstance(nonce, str)
            or not isinstance(mac, str)
        ):
            return False
        now = time.time() if now is None else now
        if abs(now - t) > self.window or len(nonce) > 64 or nonce in self._seen:
            return False
        if not hmac.compare_digest(mac, _mac(key, purpose, address, float(t), nonce)):
            return False
        self._seen = {n: s for n, s in self._seen.items() if now - s <= 2 * self.window}
        self._seen[nonce] = now
        return True


def matches(given: str | None, key: str | None) -> bool:
    """Whether ``given`` is the pool key (constant time); with no key configured nothing is
    checked."""
    if key is None:
        return True
    return given is not None and hmac.compare_digest(given, key)
