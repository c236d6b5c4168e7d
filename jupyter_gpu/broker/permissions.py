"""Who may do what in the pool: the broker's checks of a caller, each raising the refusal its caller
reads.

Why one module: every handler of the broker starts with one of these questions (is this the user
the token says; is this their work; may this user scale the pool; do sessions run as their users),
and the answers must be the same in every handler and
worded the same for every user. A check passes silently or raises a ``Refused``
(``common/refusals.py``), which the handler's caller receives in Dask's error envelope.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.identity import Identities, Verdict, session_account
from jupyter_gpu.broker.model import Lease, Request
from jupyter_gpu.broker.quotas import PoolQuotas
from jupyter_gpu.broker.views import usage_for, viewer
from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import Snapshot, UsageReport, UsageView
from jupyter_gpu.common.refusals import NotAuthorized, NotYours


class Permissions:
    """The checks of one pool: its identity source (a token file, JupyterHub; None: names are
    trusted) and its pool key. Identity checks are coroutines: JupyterHub's answer is a network
    call (``broker/hub_identity.py``), never made synchronously on the scheduler's loop."""

    def __init__(self, tokens: Identities | None) -> None:
        self.tokens = tokens
        self.pool_key: str | None = None  # set when the broker starts

    @property
    def shared(self) -> bool:
        """The pool checks tokens: several people use it."""
        return self.tokens is not None

    @property
    def kind(self) -> Literal["tokens", "hub", "names"]:
        """How the pool knows its users: ``tokens`` (a token file), ``hub``, or ``names``."""
        return self.tokens.kind if self.tokens is not None else "names"

    async def verify(self, user: str | None, token: str | None) -> Verdict:
        """What the identity source says of ``user``/``token`` (accepted or why not, admin,
        groups); a pool without one accepts every name and has no admins."""
        return await self.tokens.verify(user, token) if self.tokens is not None else Verdict(None)

    def start(self, quotas: PoolQuotas) -> None:
        if self.tokens is not None:
            self.tokens.start(quotas)

    async def close(self) -> None:
        if self.tokens is not None:
            await self.tokens.close()

    @staticmethod
    def holds(item: Lease | Request | None, user: str | None, secret: str | None) -> bool:
        """Whether ``secret`` is ``item``'s, a lease's or a waiting request's (only its kernel got
        it): proof enough to give it back, even when the identity source no longer accepts the
        kernel's token (a revoked JupyterHub token, the Hub down)."""
        return (
            item is not None
            and item.user == user
            and secret is not None
            and item.secret is not None
            and hmac.compare_digest(secret, item.secret)
        )

    async def cancel_verdict(
        self, req: Request | None, user: str | None, token: str | None, secret: str | None
    ) -> Verdict | None:
        """Who may cancel: a request's own secret (only the kernel that asked got it, with the
        request's first status) is proof enough to withdraw it, even once the identity source
        stops accepting the kernel's token while it waits (a revoked JupyterHub token): nothing is
        then granted to a cell that will not run. Otherwise the caller's accepted identity."""
        return None if self.holds(req, user, secret) else await self.check_identity(user, token)

    async def check_holder(
        self, lease: Lease | None, user: str | None, token: str | None, secret: str | None
    ) -> None:
        """The holder of ``lease`` may give it back: its secret, or an accepted identity of its
        owner."""
        if not self.holds(lease, user, secret):
            await self.check_identity(user, token)
        if lease is not None:
            self.check_acting_for(lease.user, user, f"{lease.id} belongs to {lease.user}")

    async def with_viewer(self, snap: Snapshot, user: str | None, token: str | None) -> Snapshot:
        """``snap`` with what the pool makes of ``user`` (``viewer``), when one is named."""
        if user is not None:
            snap["viewer"] = viewer(user, await self.verify(user, token))
        return snap

    async def usage_view(
        self, usage: UsageReport, user: str | None = None, token: str | None = None
    ) -> UsageView:
        """The usage report as ``user`` may read it: everything, except behind JupyterHub, where
        a user who is not an admin sees their own rows beside the teams' totals."""
        if self.kind != "hub":
            return cast(UsageView, usage)  # the report: its optional key left out
        verdict = await self.verify(user, token)
        return usage_for(usage, None if verdict.error else user, verdict.admin)

    async def identity_error(self, user: str | None, token: str | None) -> str | None:
        """Why ``user``/``token`` is not accepted (None: accepted)."""
        return (await self.verify(user, token)).error

    async def check_identity(self, user: str | None, token: str | None) -> Verdict:
        """The verdict on an accepted caller; a refused one raises ``NotAuthorized``."""
        verdict = await self.verify(user, token)
        if verdict.error:
            raise NotAuthorized(verdict.error)
        return verdict

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

    async def scale_refusal(self, user: str | None, token: str | None) -> str | None:
        """Why ``user`` may not scale the pool (None: they may)."""
        denied = await self.identity_error(user, token)
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

    async def check_scale(
        self,
        user: str | None,
        token: str | None,
        asked: dict[str, int | None],
        audit: AuditStore,
        log_event: Callable[[str, dict[str, Any]], None],
    ) -> None:
        """Refuse a scale ``user`` may not ask for: audited when the caller proved who they are
        (a wrong token is not: anyone could fill the store with it)."""
        await self.check_identity(user, token)
        denied = await self.scale_refusal(user, token)
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

    @staticmethod
    def account_of(user: str) -> str:
        """The account ``user``'s sessions run as (``jupyter-gpu.session.accounts``)."""
        return session_account(user)

    def users_isolated(self, workers_run_as_users: Iterable[bool]) -> bool:
        """Whether every session runs as its user (as above, and every worker runs as root)."""
        workers = list(workers_run_as_users)
        return self.sessions_as_users() and bool(workers) and all(workers)
