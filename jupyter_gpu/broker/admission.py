"""What one user may put in the queue: requests of a live kernel, and not too many of them.

Why: one user's flood must not become everyone's wait. 10,000 queued requests from one user took
another user's trivial cell from 0.3 s to 171 s (every scheduling pass walks the queue), and a
request or lease with no live kernel behind it (none named, or a made-up one) outlived its user's
kernel, holding a whole GPU. So, in a pool shared by several people, a request must name the Dask
client of a kernel connected now, which acts for one user only (the first it asked for), and is
cancelled with its leases when that client goes (``LeaseKeeper.client_gone``); and each user may
have ``jupyter-gpu.max-queued-per-user`` requests waiting at once. A refusal is said to the caller
and audited after the caller proved who they are (at most once a minute per user for a full queue,
so that a flood does not fill the audit store either).

Refusals are paced per user (``PACE``): the scheduler answers one user's refused requests at most
``1 / PACE`` a second, the others wait their turn in the event loop (a timer each, no work), so
that a flood's calls cost the scheduler a bounded share of its time however many are sent at once:
with the cap alone, 10,000 refused calls (64 in flight) still moved another user's first cell by
1.5 s. What is paced is the answer to a call that is refused anyway, so nobody's accepted request
waits for it (a caller who forges another user's name without their token is refused and paced
under that name, which delays only refusals).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from typing import Any

from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.permissions import Permissions
from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import RequestSpec
from jupyter_gpu.common.refusals import Malformed, NotAuthorized, NotPossible, NotYours, Refused

AUDIT_EVERY = 60.0  # seconds between two audited "queue full" refusals of one user
PACE = 0.01  # seconds between two refused requests of one user: at most 100 a second


class Admission:
    """See the module docstring. ``clients``: the Dask clients connected now."""

    def __init__(
        self,
        ledger: Ledger,
        audit: AuditStore,
        permissions: Permissions,
        clients: Callable[[], Collection[str]] = lambda: (),
    ) -> None:
        self.ledger, self.audit, self.permissions = ledger, audit, permissions
        self.clients = clients
        self.client_users: dict[str, str] = {}  # a kernel's client -> the user it acts for
        self._audited: dict[str, float] = {}
        self._next_refusal: dict[str, float] = {}  # user -> when their next refusal may be said

    async def admitted(
        self, user: str, token: str | None, client: str | None, spec: dict[Any, Any]
    ) -> RequestSpec:
        """The request ``spec`` of ``user`` (with ``token``, through ``client``), checked; or the
        refusal, raised (and audited once the caller proved who they are: a wrong token is not,
        anyone could fill the store with it)."""
        try:
            await self.permissions.check_identity(user, token)
            self.check(user, client, spec)
            try:
                return RequestSpec.from_wire(spec)
            except (TypeError, ValueError) as exc:
                self.audit.refused(None, user, None, spec, f"not valid: {exc}")
                raise Malformed(f"The request is not valid: {exc}.") from None
        except Refused:
            await self.paced(user)
            raise

    async def paced(self, user: str) -> None:
        """Wait for ``user``'s turn to be refused (see the module docstring)."""
        now = time.monotonic()
        turn = max(now, self._next_refusal.get(user, now))
        self._next_refusal[user] = turn + PACE
        if len(self._next_refusal) > 10_000:  # forget the users whose turn has come
            self._next_refusal = {u: t for u, t in self._next_refusal.items() if t > now}
        if turn > now:
            await asyncio.sleep(turn - now)

    def check(self, user: str, client: str | None, spec: Any) -> None:
        """Raise the refusal if ``user`` may not queue a request now through ``client``."""
        if self.permissions.shared:
            if client is None or client not in self.clients():
                raise NotAuthorized(
                    "a request must come from a kernel connected to the pool (its Dask client); "
                    "reconnect with %gpu connect and run the cell again"
                )
            if self.client_users.setdefault(client, user) != user:
                raise NotYours("that kernel's connection acts for another user")
        cap = config.get("max-queued-per-user")
        if not cap:
            return
        waiting = self.ledger.queue.waiting_of(user)
        if waiting >= int(cap):
            reason = (
                f"you have {waiting} requests waiting in this pool, as many as one user may "
                "(jupyter-gpu.max-queued-per-user): cancel some (%gpu queue, %gpu cancel ID) or "
                "wait for them to start"
            )
            now = time.monotonic()
            if now - self._audited.get(user, -AUDIT_EVERY) >= AUDIT_EVERY:
                self._audited[user] = now
                self.audit.refused(None, user, None, spec, reason)
            raise NotPossible(reason)

    def client_gone(self, client: str) -> None:
        self.client_users.pop(client, None)
