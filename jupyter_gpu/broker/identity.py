"""Who is asking: user names backed by tokens, for pools shared between people.

Without a token file (the default, and every embedded pool) a user is whoever ``JUPYTER_GPU_USER``
(or the login name) says, as before. With Dask config ``jupyter-gpu.token-file`` set, the broker
accepts a request, cancel or release only with the user's token (``JUPYTER_GPU_TOKEN``);
``jupyter-gpu token create USER`` issues one. The file stores salted SHA-256 hashes only, so reading
it does not reveal tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from jupyter_gpu.broker.quotas import PoolQuotas

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """What the pool's identity source says about a call's user name and token.

    ``error``: why the call is refused (None: accepted). ``admin``: the caller may see and cancel
    every user's work (a JupyterHub admin, or a token with the pool's admin scope; a token file has
    no admins). ``groups``: the caller's groups where the source knows them (JupyterHub's)."""

    error: str | None
    admin: bool = False
    groups: frozenset[str] = field(default_factory=frozenset)


class Identities(Protocol):
    """The broker's one question to an identity source (a token file, or JupyterHub:
    ``broker/hub_identity.py``): is this token this user's, and what may they do?"""

    kind: Literal["tokens", "hub"]

    async def verify(self, user: str | None, token: str | None) -> Verdict:
        """The verdict on ``user``/``token``; never raises (a source that cannot answer refuses,
        saying why)."""
        ...

    def start(self, quotas: PoolQuotas) -> None:
        """Begin what runs in the background (JupyterHub: reading group membership into
        ``quotas``)."""
        ...

    async def close(self) -> None:
        """Stop what ``start`` began."""
        ...


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the file and the fix."""


def _hash(token: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{token}".encode()).hexdigest()


def parse_token_file(text: str, path: str) -> dict[str, dict[str, Any]]:
    """The users of a token file's text, checked: ``{"users": {name: {"salt", "hash",
    "created"}}}``."""
    fix = f"Recreate it with `jupyter-gpu token create --file {path} USER` (one line per user)."
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TokenFileError(f"the token file {path} is not JSON ({exc}). {fix}") from None
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict):
        raise TokenFileError(f'the token file {path} has no "users" mapping. {fix}')
    for name, entry in users.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("salt"), str)
            or not isinstance(entry.get("hash"), str)
            or len(entry["hash"]) != 64
        ):
            raise TokenFileError(
                f"the token file {path}: the entry of user {name!r} lacks a salt and a SHA-256 "
                f"hash. {fix}"
            )
    return users


class TokenStore:
    """The token file: ``{"users": {name: {"salt", "hash", "created"}}}`` (written 0600).

    It is read again when it changes, so tokens created while the pool runs take effect at once.
    A file that turns bad while the pool runs (half written, edited by hand, unreadable) does
    not lock everybody out: the last good copy stays in use and the error is logged once.
    """

    kind: Literal["tokens", "hub"] = "tokens"

    def __init__(self, path: str):
        self.path = os.path.expanduser(path)
        self._stamp: tuple[float, int] | None = None
        self._users: dict[str, dict[str, Any]] | None = None
        self._bad_stamp: tuple[float, int] | None = None

    def validate(self) -> int:
        """Read the file now, strictly (``jupyter-gpu pool up`` does this before it listens);
        returns the number of users. Raises ``TokenFileError`` naming the file and the fix."""
        try:
            with open(self.path) as f:
                text = f.read()
            stamp = self._stat()
        except FileNotFoundError:
            raise TokenFileError(
                f"the token file {self.path} (jupyter-gpu.token-file) does not exist. Create it "
                f"with `jupyter-gpu token create --file {self.path} USER`, or unset "
                "jupyter-gpu.token-file for a pool without tokens."
            ) from None
        except OSError as exc:
            raise TokenFileError(
                f"cannot read the token file {self.path}: {exc.strerror or exc}. The pool's "
                "service account must be able to read it (and nobody else)."
            ) from None
        self._users, self._stamp = parse_token_file(text, self.path), stamp
        return len(self._users)

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime, st.st_size)

    def _load(self) -> dict[str, dict[str, Any]]:
        stamp = self._stat()
        if self._users is not None and stamp == self._stamp:
            return self._users
        if stamp is not None and stamp == self._bad_stamp:
            return self._users or {}
        try:
            if stamp is None:
                raise TokenFileError(f"the token file {self.path} was removed")
            with open(self.path) as f:
                users = parse_token_file(f.read(), self.path)
        except (OSError, TokenFileError) as exc:
            self._bad_stamp = stamp
            if self._users is not None:
                log.error(
                    "%s; keeping the last good copy of the tokens (%d user(s)) until it is fixed",
                    exc,
                    len(self._users),
                )
                return self._users
            log.error("%s; no user can be checked until it is fixed", exc)
            return {}
        self._users, self._stamp, self._bad_stamp = users, stamp, None
        return users

    def create(self, user: str) -> str:
        """Issue a new token for ``user`` (replacing any earlier one) and return it; only its hash
        is kept."""
        token = secrets.token_urlsafe(24)
        salt = secrets.token_hex(8)
        try:
            with open(self.path) as f:
                users = dict(parse_token_file(f.read(), self.path))
        except FileNotFoundError:
            users = {}
        users[user] = {"salt": salt, "hash": _hash(token, salt), "created": time.time()}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump({"users": users}, f, indent=1)
        os.replace(tmp, self.path)
        self._stamp = None
        log.info("token created for %s in %s", user, self.path)
        return token

    def check(self, user: str | None, token: str | None) -> str | None:
        """None if ``token`` is ``user``'s, else the error the caller sees (saying what to do)."""
        if not user:
            return (
                "The pool requires a user name and token (JUPYTER_GPU_USER and JUPYTER_GPU_TOKEN)."
            )
        users = self._load()
        entry = users.get(user)
        if entry is None:
            if not users and self._bad_stamp is not None:
                return (
                    "The pool cannot check tokens right now: its token file is unreadable. Ask the "
                    "pool's "
                    "admin to fix it (the scheduler's log says what is wrong)."
                )
            return (
                f"The pool does not know the user {user!r}: it accepts only users with a token. "
                "Ask the "
                f"pool's admin for one (jupyter-gpu token create {user}) and set JUPYTER_GPU_TOKEN."
            )
        if not token:
            return (
                f"The pool requires a token for user {user!r} and none was sent: set "
                "JUPYTER_GPU_TOKEN in "
                "the kernel's environment."
            )
        if not hmac.compare_digest(_hash(token, entry["salt"]), entry["hash"]):
            return (
                f"The token sent for user {user!r} is wrong (JUPYTER_GPU_TOKEN). Use the token "
                "issued for "
                "this user, or ask the pool's admin for a new one."
            )
        return None

    async def verify(self, user: str | None, token: str | None) -> Verdict:
        """``check`` as the broker asks it (``Identities``): a token file knows no admins or
        groups."""
        return Verdict(self.check(user, token))

    def start(self, quotas: PoolQuotas) -> None:
        """Nothing runs in the background: the file is read again when it changes."""

    async def close(self) -> None:
        """Nothing to stop."""


def session_account(user: str) -> str:
    """The OS account on the GPU machines that ``user``'s sessions run as (Dask config
    ``jupyter-gpu.session.accounts``): by default the account of the same name (a Hub with
    LocalProcessSpawner, SystemdSpawner or batchspawner, whose users have accounts). Where users
    have none there (KubeSpawner), the administrator maps them: a template such as
    ``"gpu-{user}"``, or a mapping ``{hub name: account}`` (names it leaves out keep their own).
    Each pool user must map to an account of their own: sessions of two users on one account are
    not isolated from each other."""
    from jupyter_gpu.common import config

    accounts = config.get("session.accounts")
    if isinstance(accounts, str):
        return accounts.replace("{user}", user)
    if isinstance(accounts, dict):
        return str(accounts.get(user, user))
    return user


def check_session_accounts(accounts: Any) -> str | None:
    """Why Dask config ``jupyter-gpu.session.accounts`` cannot be used (None: it can)."""
    if accounts is None:
        return None
    if isinstance(accounts, str):
        return (
            None
            if "{user}" in accounts
            else (
                f"jupyter-gpu.session.accounts {accounts!r} has no {{user}}: every user would share "
                "one account and not be isolated. Write a template such as gpu-{user}."
            )
        )
    if isinstance(accounts, dict) and all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in accounts.items()
    ):
        taken = [v for v in accounts.values() if list(accounts.values()).count(v) > 1]
        return (
            None
            if not taken
            else (
                f"jupyter-gpu.session.accounts maps several users to {sorted(set(taken))}: users "
                "sharing an account are not isolated. Give each user an account of their own."
            )
        )
    return (
        f"jupyter-gpu.session.accounts must be null, a template with {{user}} or a mapping of "
        f"user names to account names, not {accounts!r}"
    )


def tokens_from_config() -> TokenStore | None:
    """The token store at Dask config ``jupyter-gpu.token-file``, or None: names are trusted as
    given."""
    from jupyter_gpu.common import config

    path = config.get("token-file")
    return TokenStore(str(path)) if path else None
