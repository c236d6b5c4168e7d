"""Who is asking: user names backed by tokens, for pools shared between people.

Without a token file (the default, and every embedded pool) a user is whoever ``JUPYTER_GPU_USER`` (or the
login name) says, as before. With Dask config ``jupyter-gpu.token-file`` set, the broker accepts a request,
cancel or release only with the user's token (``JUPYTER_GPU_TOKEN``); ``jupyter-gpu token create USER``
issues one. The file stores salted SHA-256 hashes only, so reading it does not reveal tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time

log = logging.getLogger(__name__)


def _hash(token: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{token}".encode()).hexdigest()


class TokenStore:
    """The token file: ``{"users": {name: {"salt", "hash", "created"}}}`` (written 0600)."""

    def __init__(self, path: str):
        self.path = os.path.expanduser(path)
        self._mtime: float | None = None
        self._users: dict[str, dict] = {}

    def _load(self) -> dict[str, dict]:
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            self._users, self._mtime = {}, None
            return self._users
        if mtime != self._mtime:  # tokens created while the pool runs take effect at once
            with open(self.path) as f:
                self._users = dict(json.load(f).get("users") or {})
            self._mtime = mtime
        return self._users

    def create(self, user: str) -> str:
        """Issue a new token for ``user`` (replacing any earlier one) and return it; only its hash is kept."""
        token = secrets.token_urlsafe(24)
        salt = secrets.token_hex(8)
        users = dict(self._load())
        users[user] = {"salt": salt, "hash": _hash(token, salt), "created": time.time()}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump({"users": users}, f, indent=1)
        os.replace(tmp, self.path)
        self._mtime = None
        log.info("token created for %s in %s", user, self.path)
        return token

    def check(self, user: str | None, token: str | None) -> str | None:
        """None if ``token`` is ``user``'s, else the error the caller sees (saying what to do)."""
        if not user:
            return "The pool requires a user name and token (JUPYTER_GPU_USER and JUPYTER_GPU_TOKEN)."
        entry = self._load().get(user)
        if entry is None:
            return (f"The pool does not know the user {user!r}: it accepts only users with a token. Ask the "
                    f"pool's admin for one (jupyter-gpu token create {user}) and set JUPYTER_GPU_TOKEN.")
        if not token:
            return (f"The pool requires a token for user {user!r} and none was sent: set JUPYTER_GPU_TOKEN in "
                    "the kernel's environment.")
        if not hmac.compare_digest(_hash(token, entry["salt"]), entry["hash"]):
            return (f"The token sent for user {user!r} is wrong (JUPYTER_GPU_TOKEN). Use the token issued for "
                    "this user, or ask the pool's admin for a new one.")
        return None


def tokens_from_config() -> TokenStore | None:
    """The token store at Dask config ``jupyter-gpu.token-file``, or None: names are trusted as given."""
    from jupyter_gpu.common import config

    path = config.get("token-file")
    return TokenStore(str(path)) if path else None
