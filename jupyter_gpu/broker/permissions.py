"""Who may do what in the pool: the broker's checks of a caller, each raising the refusal its caller
reads.

Why one module: every handler of the broker starts with one of these questions (is this the user
the token says; is this their work; may this user scale the pool; do sessions run as their users),
and the answers must be the same in every handler and
worded the same for every user. A check passes silently or raises a ``Refused``
(``common/refusals.py``), which the handler's caller receives in Dask's error envelope.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.identity import TokenStore
from jupyter_gpu.common import config
from jupyter_gpu.common.refusals import NotAuthorized, NotYours


class Permissions:
    """The checks of one pool: its token file (None: names are trusted) and its pool key."""

    def __init__(self, tokens: TokenStore | None) -> None:
        self.tokens = tokens
        self.pool_key: str | None = None  # set when the broker starts

    @property
    def shared(self) -> bool:
        """The pool checks tokens: several people use it."""
        return self.tokens is not None

    def identity_error(self, user: str | None, token: str | None) -> str | None:
        """With a token file, why ``user``/``token`` is not accepted (None: accepted)."""
        return self.tokens.check(user, token) if self.tokens is not None else None

    def check_identity(self, user: str | None, token: str | None) -> None:
        denied = self.identity_error(user, token)
        if denied:
            raise NotAuthorized(denied)

    def check_owner(self, owner: str, user: str | None, what: str) -> None:
        """In a pool that checks tokens, only the owner may read their work."""
        if self.tokens is not None and user != owner:
            raise NotYours(f"{what} belongs to another user; you can see only your own work")

    @staticmethod
    def check_acting_for(owner: str, user: str | None, why: str) -> None:
        """A user who names themselves may act on their own work only (``why``: what to say)."""
        if user is not None and owner != user:
            raise NotYours(why)

    @staticmethod
    def scale_users() -> list[str] | None:
        """Who may scale the pool (None: everyone), from Dask config ``jupyter-gpu.scale-users``."""
        allowed = config.get("scale-users")
        if allowed is None:
            return None
        return [str(u) for u in ([allowed] if isinstance(allowed, str) else allowed)]

    def scale_refusal(self, user: str | None, token: str | None) -> str | None:
        """Why ``user`` may not scale the pool (None: they may)."""
        denied = self.identity_error(user, token)
        if denied:
            return denied
        allowed = self.scale_users()
        if allowed is None or (user is not None and user in allowed):
            return None
        return (
            f"user {user!r} may not scale this pool: only {', '.join(allowed) or 'nobody'} may "
            "(Dask config jupyter-gpu.scale-users on the scheduler). Ask one of them, or an "
            "administrator."
        )

    def check_scale(
        self,
        user: str | None,
        token: str | None,
        asked: dict[str, int | None],
        audit: AuditStore,
        log_event: Callable[[str, dict[str, Any]], None],
    ) -> None:
        """Refuse a scale ``user`` may not ask for: audited when the caller proved who they are
        (a wrong token is not: anyone could fill the store with it)."""
        self.check_identity(user, token)
        denied = self.scale_refusal(user, token)
        if denied:
            audit.refused(None, user, None, {"scale": asked}, denied)
            log_event(
                "jupyter-gpu-audit", {"action": "scale refused", "user": user, "reason": denied}
            )
            raise NotAuthorized(denied)

    def sessions_as_users(self) -> bool:
        """Whether sessions are to run as their users' accounts: when the pool checks tokens,
        unless the admin turned it off (``session.as-user: false``, e.g. tokens kept for
        accounting only)."""
        return self.tokens is not None and config.get("session.as-user") is not False

    def users_isolated(self, workers_run_as_users: Iterable[bool]) -> bool:
        """Whether every session runs as its user (as above, and every worker runs as root)."""
        workers = list(workers_run_as_users)
        return self.sessions_as_users() and bool(workers) and all(workers)
