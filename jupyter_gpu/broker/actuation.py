"""What the broker asks of workers about sessions: start one for a lease, kill one, move one's
variables to host memory, forget such a copy.

Why apart from the plugin: these are the broker's only outgoing calls, each a ``gpu_session_*`` or
``gpu_offload_*`` handler of the lease's worker, with the pool key (``common/poolkey.py``; a worker
answers nobody else). A worker's refusal or failure comes back as a ``CallError``
(``common/refusals.py``) or a comm error; callers decide what that means for the lease.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

from jupyter_gpu.broker.grant_signer import grant_for
from jupyter_gpu.broker.model import Lease, Offload
from jupyter_gpu.common.protocol import OffloadResult, RestoreRef, SessionStarted

log = logging.getLogger(__name__)


class SessionActuator:
    """Calls on the workers of one scheduler (``rpc``: its pooled ``Scheduler.rpc``)."""

    def __init__(self, rpc: Callable[[str], Any], scheduler_address: str) -> None:
        self.rpc = rpc
        self.scheduler_address = scheduler_address
        self.pool_key: str | None = None
        self.signing_key: Any = None  # the grants' (broker/grant_signer.py); None: none signed

    async def start(
        self, lease: Lease, restore: Offload | None, account: str | None
    ) -> SessionStarted:
        """A session for ``lease`` on its worker (with ``restore``: an earlier session's variables);
        the lease gets its secret, which only the worker and the owner's kernel learn. ``account``:
        the user whose account it runs as (then with the signed grant the launcher asks for)."""
        ref: RestoreRef | None = None
        if restore is not None and restore.path is not None:
            ref = {"worker": restore.worker, "path": restore.path, "lease": restore.lease}
        lease.secret = secrets.token_urlsafe(24)
        grant = None
        if self.signing_key is not None:  # a launcher starts it (as the user, or the service)
            grant = grant_for(lease, self.signing_key, account)
        async with self.rpc(lease.worker) as worker:
            started: SessionStarted = await worker.gpu_session_start(
                lease=lease.public(),
                scheduler=self.scheduler_address,
                restore=ref,
                client=lease.client,
                secret=lease.secret,
                account=account,
                grant=grant,
                key=self.pool_key,
            )
        return started

    async def kill(self, lease: Lease) -> None:
        """End ``lease``'s session (best effort: its worker may be gone already)."""
        try:
            async with self.rpc(lease.worker) as worker:
                await worker.gpu_session_signal(lease=lease.id, signal="kill", key=self.pool_key)
        except Exception as exc:  # noqa: BLE001 - the worker may be gone already, failing in any way
            log.debug("could not kill session of %s on %s: %s", lease.id, lease.worker, exc)

    async def offload(self, lease: Lease, timeout: float) -> OffloadResult:
        """Move ``lease``'s session's variables to host memory on its worker (raises what went
        wrong: a ``CallError``, a comm error or a timeout)."""
        async with self.rpc(lease.worker) as worker:
            result: OffloadResult = await asyncio.wait_for(
                worker.gpu_session_offload(lease=lease.id, timeout=timeout, key=self.pool_key),
                timeout + 5,
            )
        return result

    async def discard(self, lease_id: str, offload: Offload) -> None:
        """Forget the copy of ended lease ``lease_id`` nobody will restore (best effort: the
        worker may be gone, and its files with it)."""
        if offload.path is None:
            return
        try:
            async with self.rpc(offload.worker) as worker:
                await worker.gpu_offload_discard(lease=lease_id, key=self.pool_key)
        except Exception as exc:  # noqa: BLE001 - the worker is gone, and its files with it
            log.debug("could not discard the offload of %s: %s", lease_id, exc)

    async def spill(self, lease: Lease) -> None:
        """Have the worker keeping ended ``lease``'s copy move it to its disk folder, to leave its
        host memory to sessions (``broker/hosts.py``); best effort: if it cannot, the copy stays in
        memory (the worker may be gone, and its files with it)."""
        if lease.offload is None:
            return
        try:
            async with self.rpc(lease.offload.worker) as worker:
                await worker.gpu_offload_spill(lease=lease.id, key=self.pool_key)
        except Exception as exc:  # noqa: BLE001 - best effort: the worker may be gone or refuse
            log.warning("could not spill the copy of %s to disk: %s", lease.id, exc)
