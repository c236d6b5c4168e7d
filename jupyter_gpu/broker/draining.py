"""Draining workers: a GPU machine's service is stopping (an upgrade, a restart), and its sessions
move to other workers with their variables instead of ending.

Why here, with the broker's existing moves: a session's variables already travel between workers
when an idle session is suspended (written to host memory on its worker, ``gpu_session_offload``)
and brought back by its owner's next cell on any worker (``gpu_offload_fetch`` from the first
one). A drain does the same at once, while the drained worker is still there to hand the copy
over: for each of its sessions, once it is idle, the variables go to host memory, a request on
the kernel's behalf (``Lease.moved_to``) starts a session elsewhere with them, and the kernel's
next cell, which finds its old session gone and asks to restore it, is given that session
(``gpu_request(restore=...)``) and told where it went.

What a drain does, in order: the workers take no new leases (``Ledger.draining``); running cells
finish, for at most ``timeout`` seconds (``jupyter-gpu.worker.drain-timeout``); each idle session
moves; a rank of a ``--workers`` run, a cell still running at the bound, or a session for which no
other worker has room within the bound, is ended with the reason. The worker then exits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

from jupyter_gpu.broker import packing
from jupyter_gpu.broker.leasing import LeaseKeeper
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import GpuSlot, Lease, Offload, Request, new_id
from jupyter_gpu.broker.permissions import Permissions
from jupyter_gpu.common import config, poolkey
from jupyter_gpu.common.handlers import handler
from jupyter_gpu.common.protocol import DrainReport, RequestSpec
from jupyter_gpu.common.refusals import CallError, NotAuthorized
from jupyter_gpu.common.validation import Address, MaxLen, Range

log = logging.getLogger(__name__)

POLL = 0.2  # how often a drain looks at its workers' leases (their states come in reports)


def worker_label(address: str) -> str:
    """A worker as users read it: its host and port (several workers share a machine)."""
    return address.split("://", 1)[-1]


def spec_of(lease: Lease, original: Request | None) -> RequestSpec:
    """What a moved session asks for: what its request asked (a fraction stays a fraction), else
    the memory it holds."""
    if original is not None and original.spec.workers == 1:
        return RequestSpec(**{**original.spec.__dict__})
    return RequestSpec(memory=lease.bytes, priority=lease.priority)


def drain_worker(ledger: Ledger, worker: str) -> None:
    """``worker`` is being drained: its GPUs still count (it comes back after its upgrade), but
    the packer places nothing new on them (``Ledger.draining``, kept when it registers again)."""
    ledger.draining.add(worker)
    ledger.packer.reindex(worker, [])
    ledger.fit_memo.clear()


def placeable(ledger: Ledger) -> list[GpuSlot]:
    """The GPUs a new lease may be placed on: not those of a worker being drained."""
    return [g for g in ledger.gpus.values() if g.worker not in ledger.draining]


class Drain:
    """One drain of ``workers`` (see the module docstring)."""

    def __init__(self, keeper: LeaseKeeper, workers: set[str], timeout: float) -> None:
        self.keeper, self.workers, self.timeout = keeper, workers, timeout
        self.moved: list[str] = []
        self.ended: list[str] = []
        self._moves: dict[str, asyncio.Task[None]] = {}

    @property
    def ledger(self) -> Ledger:
        return self.keeper.ledger

    def _mine(self) -> list[Lease]:
        return [ls for ls in self.ledger.leases.values() if ls.worker in self.workers]

    async def run(self) -> DrainReport:
        started = time.monotonic()
        deadline = started + self.timeout
        for worker in self.workers:
            drain_worker(self.ledger, worker)
        log.info(
            "draining %s: no new leases there; %d session(s) to move or end",
            ", ".join(sorted(self.workers)),
            len(self._mine()),
        )
        while True:
            left = [ls for ls in self._mine() if ls.id not in self._moves]
            for lease in left:
                if lease.world_size == 1 and config.get("reclaim-offload"):
                    if lease.state in ("idle", "running"):  # a running cell finishes first
                        self._moves[lease.id] = asyncio.ensure_future(self.move(lease, deadline))
                elif lease.state == "idle":
                    self._end(lease, "it was a rank of a --workers run")
            if not left or time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL)
        for lease in [ls for ls in self._mine() if ls.id not in self._moves]:
            self._end(
                lease,
                f"its cell was still running when the drain's {self.timeout:g} s ran out "
                "(jupyter-gpu.worker.drain-timeout)",
            )
        await asyncio.gather(*self._moves.values(), return_exceptions=True)
        waited = time.monotonic() - started
        log.info(
            "drained %s in %.1f s: %d session(s) moved, %d ended",
            ", ".join(sorted(self.workers)),
            waited,
            len(self.moved),
            len(self.ended),
        )
        return {"moved": self.moved, "ended": self.ended, "waited": waited}

    def _end(self, lease: Lease, why: str) -> None:
        self.ended.append(lease.id)
        self.keeper.end_lease(
            lease,
            f"the pool worker {worker_label(lease.worker)} was drained for maintenance ({why}); "
            "the session's variables are gone",
            kill=True,
        )

    async def move(self, lease: Lease, deadline: float) -> None:
        """Move one session: its variables to host memory on its worker (after its running cell,
        if any: the session queues the copy behind it), then a session on another worker that
        starts with them, on its kernel's behalf. The lease stands until the copy is saved, so
        that a running cell is not taken for lost; a kernel that asks meanwhile waits for the copy
        (``offload`` pending), whose end it reads with ``moved_to`` set in the same step."""
        keeper, source = self.keeper, lease.worker
        here = worker_label(source)
        lease.offload = Offload.pending(source, lease.id)
        asked = time.monotonic()
        bound = max(deadline - asked, 0.0) + config.get_seconds("offload-timeout")
        try:
            result = await keeper.workers.offload(lease, bound)
        except Exception as exc:  # noqa: BLE001 - refused, gone or too slow: the variables are lost
            why = str(exc) if isinstance(exc, CallError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, asyncio.TimeoutError):
                why = f"its cell was still running when the drain's {self.timeout:g} s ran out"
            lease.offload = None
            self._end(lease, f"its variables could not be kept: {why}")
            return
        offload = Offload.saved_as(source, lease.id, result, time.monotonic() - asked)
        gone = lease.client is not None and lease.client not in keeper.clients()
        if gone or lease.id not in self.ledger.leases:
            # its kernel went away meanwhile (its lease ended with it): nobody will restore them
            lease.offload = offload
            keeper.end_lease(lease, "its kernel disconnected from the pool", kill=True)
            await keeper.discard(lease)
            return
        req = Request(
            id=new_id("R"),
            user=lease.user,
            kernel=lease.kernel,
            client=lease.client,
            spec=spec_of(lease, self.ledger.requests.get(lease.request)),
            notebook=lease.notebook,
            cell=lease.cell,
            team=lease.team,
            restore=offload,
        )
        # in the same step as the copy is saved: a kernel reading the lease sees it moving
        lease.offload, lease.moved_to = offload, req.id
        keeper.end_lease(
            lease, f"the pool worker {here} is being drained; your session is moving", kill=True
        )
        keeper.admit(req, [])
        # where no other worker could ever hold it (the pool's only machine), do not wait for room
        elsewhere = placeable(self.ledger)
        if req.state == "starting" or (elsewhere and not packing.never_fits(req.spec, elsewhere)):
            await keeper.wait(req, max(deadline - time.monotonic(), 0.0) + 60.0)
        if req.state == "granted" and req.restored is not None and req.leases:
            new = self.ledger.leases.get(req.leases[0])
            there = worker_label(new.worker) if new is not None else "another worker"
            self.moved.append(lease.id)
            lease.end_reason = (
                f"your session moved from worker {here} to worker {there} for maintenance; "
                "your variables came with it"
            )
            log.info("lease %s moved from %s to %s (%s)", lease.id, here, there, req.leases)
            return
        # no room elsewhere in time, or the new session could not start or read them: the copy
        # goes with the drained worker, and a new session without it is not kept
        why = req.reason or req.state
        if req.state in ("queued", "starting"):
            why = (
                "no other worker had room for it in time"
                if elsewhere
                else "the pool has no other worker to move it to"
            )
        elif req.state == "granted":
            why = "the new session could not read them"
        lease.moved_to, lease.offload = None, None
        for lease_id in req.leases:
            if lease_id in self.ledger.leases:
                keeper.end_lease(self.ledger.leases[lease_id], f"its move failed: {why}", True)
        if req.state in ("queued", "starting"):
            keeper.finish_request(req, "cancelled", f"the move of {lease.id} failed: {why}")
            keeper.schedule()
        self.ended.append(lease.id)
        lease.end_reason = (
            f"the pool worker {here} was drained for maintenance; its variables could not be "
            f"moved ({why})"
        )
        log.warning("lease %s could not be moved off %s: %s", lease.id, here, why)


def moved_session(keeper: LeaseKeeper, restore: str, user: str, kernel: str) -> Request | None:
    """The request carrying on ``restore``'s session after a drain, for its own kernel's next
    cell (``gpu_request(restore=...)``); None when there is none (the caller restores as usual)."""
    old = keeper.ledger.ended.get(restore)
    if old is None or old.moved_to is None or old.user != user or old.kernel != kernel:
        return None
    req = keeper.ledger.requests.get(old.moved_to)
    if req is None or req.user != user or req.kernel != kernel:
        return None
    if req.state in ("queued", "starting"):
        return req
    if req.state == "granted" and any(lid in keeper.ledger.leases for lid in req.leases):
        return req
    return None


def drain_subject(workers: list[str]) -> str:
    """What a drain's proof of the pool key is made over: the workers it names, in order."""
    return ",".join(sorted(workers))


class DrainHandlers:
    """The broker's handler for drains (``GpuBroker`` inherits it): declared here, next to the
    drain itself."""

    keeper: LeaseKeeper
    ledger: Ledger
    permissions: Permissions
    _drain_proofs: poolkey.ProofChecker | None = None

    @handler("gpu_drain", caller="worker", check="pool-key-proof")
    async def gpu_drain(
        self,
        workers: Annotated[list[Address], MaxLen(1024)],
        timeout: Annotated[float, Range(0, 86_400)] = 600.0,
        proof: dict[Any, Any] | None = None,
    ) -> DrainReport:
        """A GPU machine's service is stopping (an upgrade, a restart): its workers take no new
        leases, running cells finish (at most ``timeout`` s), idle sessions move to other workers
        with their variables, and what cannot move ends with the reason."""
        if self._drain_proofs is None:
            self._drain_proofs = poolkey.ProofChecker()
        key = self.permissions.pool_key
        if not self._drain_proofs.check(proof, key, "drain", drain_subject(workers)):
            raise NotAuthorized(
                "only the pool's own worker services may drain workers: the call must carry a "
                "fresh proof of the pool key (poolkey.proof) over the workers it names"
            )
        known = {w for w in workers if w in self.ledger.worker_gpus}
        return await Drain(self.keeper, known, timeout).run()
