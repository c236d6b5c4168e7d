"""Grants: the broker's signed word that a session may run as a user, and the keys that sign them.

Why: a session that runs as its user is started by the privileged launcher (``launcher/``), which
runs as root. The launcher must not take a worker's word for whose account a session gets: a worker
runs as the pool's service account, and anyone holding the pool key could otherwise ask for a
session as any user (or as root). So the broker signs a grant for each lease it grants (Ed25519: its
private key is read by ``jupyter-gpu pool up`` as root before it drops to the service account, and
lives only in the scheduler's memory, which other processes of that account cannot read: it is not
dumpable), and the launcher checks it with the public key, which only root can replace.

A grant names the user, the lease, the worker, the GPUs and limits it may use (GPU memory, and the
host memory and CPU cores the broker booked for it on its machine, which the launcher enforces in
the session's cgroup: a worker cannot raise them) and when it expires,
and whether the session runs as the user's account (a pool that isolates its users) or as the pool's
service account (one that does not: still confined, never root); it is single-use (the launcher remembers its nonce until it expires). On the wire it is text:
``base64url(payload) "." base64url(signature)``, where the payload is canonical JSON (sorted keys,
no spaces) and the signature covers ``DOMAIN + payload``.

Key files: ``jupyter-gpu.grant-key-file`` (the private key, PEM, 0600, read by ``pool up``) and
``jupyter-gpu.grant-public-key-file`` (the public key, PEM, 0644 and owned by root on every worker
machine; by default the key file's path and ``.pub``); by default the key file is in root's
Jupyter runtime folder, named by the scheduler's port.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import time
from typing import Any, TypedDict

DOMAIN = b"jupyter-gpu grant v1\0"
LIFETIME = 120.0  # seconds a grant may be used after it was signed (clock skew included)
MAX_TEXT = 4096


class Grant(TypedDict):
    """What a grant says (its payload)."""

    v: int
    user: str  # the OS account the session runs as when ``as_user`` (else the pool user, a record)
    as_user: bool  # run as the OS account named like ``user``; else as the pool's service account
    lease: str
    worker: str  # the worker address that may start it
    gpus: list[int]  # GPU indices on that worker
    bytes: int  # GPU memory leased
    host_memory: int  # host memory booked for it on its machine (bytes; 0: none booked)
    cpu_milli: int  # thousandths of a CPU core booked for it (0: none booked)
    issued: float
    expires: float
    nonce: str


class BadGrant(PermissionError):
    """A grant that is not the broker's, is for something else, or is used again or too late; the
    message says which."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def payload_bytes(grant: Grant) -> bytes:
    return json.dumps(grant, sort_keys=True, separators=(",", ":")).encode()


def new_grant(
    user: str,
    lease: str,
    worker: str,
    gpus: list[int],
    nbytes: int,
    as_user: bool = True,
    now: float | None = None,
    host_memory: int = 0,
    cpu_milli: int = 0,
) -> Grant:
    issued = time.time() if now is None else now
    return {
        "v": 1,
        "user": user,
        "as_user": as_user,
        "lease": lease,
        "worker": worker,
        "gpus": list(gpus),
        "bytes": int(nbytes),
        "host_memory": int(host_memory),
        "cpu_milli": int(cpu_milli),
        "issued": issued,
        "expires": issued + LIFETIME,
        "nonce": secrets.token_urlsafe(16),
    }


def sign(grant: Grant, private_key: Any) -> str:
    """The grant as text, signed with ``private_key`` (an ``Ed25519PrivateKey``)."""
    payload = payload_bytes(grant)
    return f"{_b64(payload)}.{_b64(private_key.sign(DOMAIN + payload))}"


def verify(text: str, public_key: Any, now: float | None = None) -> Grant:
    """The grant in ``text`` if ``public_key`` signed it and it has not expired; ``BadGrant``
    otherwise (single use is the verifier's to enforce: it keeps the nonces)."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(text, str) or len(text) > MAX_TEXT or text.count(".") != 1:
        raise BadGrant("the grant is not a signed grant")
    head, sig = text.split(".")
    try:
        payload, signature = _unb64(head), _unb64(sig)
        public_key.verify(signature, DOMAIN + payload)
    except (InvalidSignature, ValueError):
        raise BadGrant("the grant's signature is not the broker's") from None
    grant = json.loads(payload)
    now = time.time() if now is None else now
    if not isinstance(grant, dict) or grant.get("v") != 1:
        raise BadGrant("the grant's version is not known")
    if not grant["issued"] - LIFETIME <= now <= grant["expires"]:
        raise BadGrant(
            "the grant has expired (or the clocks of the broker and this machine differ)"
        )
    return grant  # type: ignore[return-value]  # signed by the broker, which made it a Grant


# ---------------------------------------------------------------------- key files
def _default(scheduler_address: str, suffix: str) -> str:
    from jupyter_core.paths import jupyter_runtime_dir

    port = scheduler_address.rsplit(":", 1)[-1].strip("/")
    return os.path.join(jupyter_runtime_dir(), f"jupyter-gpu-pool-{port}-grant.{suffix}")


def private_key_path(scheduler_address: str) -> str:
    from jupyter_gpu.common import config  # here: the launcher, which imports no Dask, needs none

    configured = config.get("grant-key-file")
    return os.path.expanduser(str(configured)) if configured else _default(scheduler_address, "key")


def public_key_path(scheduler_address: str) -> str:
    from jupyter_gpu.common import config

    configured = config.get("grant-public-key-file")
    if configured:
        return os.path.expanduser(str(configured))
    return f"{private_key_path(scheduler_address)}.pub"


def ensure_private_key(path: str) -> Any:
    """The private key in ``path``, made (0600, with its public key beside it at ``path.pub``,
    0644) if there is none. Read by ``pool up`` before it gives up root."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        with open(path, "rb") as f:
            return serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(path, private, 0o600)
    _write(f"{path}.pub", public, 0o644)
    return key


def _write(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def load_public_key(path: str, owner: int = 0) -> Any:
    """The public key in ``path``, which must belong to ``owner`` (root) and be writable by nobody
    else, nor its folder: whoever can replace it can sign grants. ``BadGrant`` says what is
    wrong and how to fix it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    fix = (
        f"start `jupyter-gpu pool up` as root (it writes the key pair), or install the pool's "
        f"public key as root: `install -o root -m 644 KEY.pub {path}` (Dask config "
        "jupyter-gpu.grant-public-key-file)"
    )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise BadGrant(f"no grant public key at {path} ({exc.strerror}): {fix}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read(8192)
    folder = os.stat(os.path.dirname(os.path.abspath(path)))
    for what, s in (("the grant public key", st), ("its folder", folder)):
        if s.st_uid != owner or s.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise BadGrant(f"{what} ({path}) may be changed by an account other than root: {fix}")
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise BadGrant(f"{path} is not an Ed25519 public key: {fix}")
    return key
