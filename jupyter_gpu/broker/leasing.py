"""What happens to requests and leases over time: scheduling passes, grants started on workers,
leases ended, reclaimed or moved to host memory, and the audit of each step.

Why apart from the plugin: the plugin (``broker/plugin.py``) is Dask's side, hooks and handlers;
this is the broker's own work, which the hooks (a worker lost, a kernel gone) and the handlers (a
request, a cancel, a session that ended) all set going. The bookkeeping itself is the ``Ledger``
(pure); the calls to workers are ``SessionActuator``'s; what is kept here is what needs both and
the event loop: the waiters of ``gpu_wait``, the grants waiting for reclaimed sessions to be gone,
and the background tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from jupyter_gpu.broker.actuation import SessionActuator
from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.id_floor import IdFloor, floor_path
from jupyter_gpu.broker.identity import Verdict
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.metrics import PoolMetrics
from jupyter_gpu.broker.model import GpuSlot, Lease, Offload, Request
from jupyter_gpu.broker.permissions import Permissions
from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import CancelReply, RequestState
from jupyter_gpu.common.refusals import CallError, NotFound

log = logging.getLogger(__name__)


class LeaseKeeper:
    """See the module docstring. ``log_event``: the scheduler's event log (None until it starts);
    ``clients``: the Dask clients connected now."""

    def __init__(
        self,
        ledger: Ledger,
        audit: AuditStore,
        permissions: Permissions,
        actuator: SessionActuator | None = None,
    ) -> None:
        self.ledger, self.audit, self.permissions = ledger, audit, permissions
        self.actuator = actuator  # set when the broker starts
        self.metrics = PoolMetrics(ledger)  # Prometheus figures (broker/metrics.py)
        self.ids: IdFloor | None = None  # ids stay unique across restarts (broker/id_floor.py)
        self.log_event: Callable[[str, dict[str, Any]], None] | None = None
        self.clients: Callable[[], Collection[str]] = lambda: ()
        self.events: dict[str, asyncio.Event] = {}  # request id -> set when it leaves the queue
        self._tasks: set[asyncio.Task[None]] = set()
        # request id -> reclaimed sessions it waits to see gone
        self._drains: dict[str, list[asyncio.Task[None]]] = {}

    def attach(self, scheduler: Any, pool_key: str | None, key_path: str) -> None:
        """The broker started on ``scheduler``: its calls to workers, its event log, its clients;
        request and lease ids continue after those of this pool's earlier brokers
        (``broker/id_floor.py``: a mark next to the pool key at ``key_path``)."""
        self.actuator = SessionActuator(scheduler.rpc, scheduler.address)
        self.actuator.pool_key = pool_key
        self.log_event = scheduler.log_event
        self.clients = lambda: scheduler.clients
        self.ids = IdFloor(floor_path(key_path))
        self.ids.resume()
        # the copies the ledger spills to leave host memory to sessions go to disk on their worker
        self.ledger.parking.on_spill = lambda ls: self.spawn(self.workers.spill(ls))

    def close_ids(self, forget: bool) -> None:
        """Record the newest id when the broker stops; ``forget``: remove the mark (an embedded pool,
        whose sessions never outlive it)."""
        if self.ids is not None:
            self.ids.note(self.ledger)
            if forget:
                self.ids.remove()

    @property
    def workers(self) -> SessionActuator:
        assert self.actuator is not None, "the broker is not started"
        return self.actuator

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ requests
    def submit(self, req: Request) -> None:
        """A new request, recorded; it waits (``wait``) until it leaves the queue."""
        self.ledger.record(req)
        self.events[req.id] = asyncio.Event()

    async def wait(self, req: Request, timeout: float) -> None:
        """Until ``req`` leaves queued/starting, or ``timeout``."""
        event = self.events.get(req.id)
        if event is not None and req.state in ("queued", "starting"):
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def schedule(self) -> None:
        """Grant, in policy order, every queued request that fits now; give the others their
        reason."""

        def fail(req: Request, reason: str) -> None:
            self.finish_request(req, "failed", reason)

        for req, leases in self.ledger.schedule(self.preempt, fail=fail):
            for lease in leases:
                self.audit.lease_started(lease.public(), lease.preemptible)
            self.metrics.granted_leases(req, leases)
            self.spawn(self.start_sessions(req, leases))
        if self.ids is not None:
            self.ids.note(self.ledger)  # before any kernel hears of a new id

    def finish_request(self, req: Request, state: RequestState, reason: str) -> None:
        self.ledger.finish_request(req, state, reason)
        event = self.events.pop(req.id, None)
        if event is not None:
            event.set()
        if state == "refused":
            self.audit.refused(req.id, req.user, req.team, req.spec.__dict__, reason)
        if state != "granted" and self.log_event is not None:
            self.log_event(
                "jupyter-gpu-refused" if state == "refused" else "jupyter-gpu-requests",
                {"id": req.id, "user": req.user, "state": state, "reason": reason},
            )

    async def start_sessions(self, req: Request, leases: list[Lease]) -> None:
        """Start a session for each lease of a grant (once the sessions reclaimed for it are gone
        from their GPUs); the request is granted when all are up, failed if one is not."""
        drains = self._drains.pop(req.id, [])
        if drains:
            await asyncio.gather(*drains, return_exceptions=True)
        account_of = self.permissions.sessions_as_users()

        async def start_one(lease: Lease) -> None:
            restore = req.restore if lease.rank == 0 else None
            account = self.permissions.account_of(lease.user) if account_of else None
            asked = time.monotonic()
            try:
                started = await self.workers.start(lease, restore, account)
            except BaseException:
                self.metrics.session_started(lease, time.monotonic() - asked, False, False)
                raise
            back = restore is not None and started.get("restored") is not None
            self.metrics.session_started(lease, time.monotonic() - asked, True, back)
            lease.address, lease.pid = started["address"], started["pid"]
            lease.isolation = started.get("isolation", "none")
            lease.containment = started.get("containment")
            lease.host_memory_limit = started.get("host_memory_limit")
            if lease.state == "starting":
                self.ledger.set_state(lease.id, "idle")
            if restore is not None:
                req.restored = started.get("restored")

        try:
            await asyncio.gather(*(start_one(ls) for ls in leases))
        except Exception as exc:  # noqa: BLE001 - a worker's failure comes back as any remote error: free everything, say why
            log.warning("session start for %s failed: %s", req.id, exc)
            for lease in leases:
                if lease.id in self.ledger.leases:
                    self.end_lease(lease, f"its session process failed to start: {exc}", kill=True)
            self.finish_request(
                req, "failed", f"The GPU session could not be started on the pool: {exc}"
            )
            self.schedule()
            return
        if req.state == "starting":
            self.finish_request(req, "granted", "")
        else:  # cancelled while starting
            for lease in leases:
                if lease.id in self.ledger.leases:
                    self.end_lease(lease, "its request was cancelled", kill=True)

    # ------------------------------------------------------------------ leases
    def end_lease(self, lease: Lease, reason: str, kill: bool) -> None:
        if self.ledger.end(lease.id, reason) is None:
            return
        self.metrics.lease_ended(lease)
        self.audit.lease_ended(lease.id, lease.ended, reason, lease.peak_bytes)
        log.info("lease %s of %s ended: %s", lease.id, lease.user, reason)
        if kill and lease.worker in self.ledger.worker_gpus:
            self.spawn(self.workers.kill(lease))

    def preempt(self, lease_id: str, reason: str, req: Request | None = None) -> None:
        """End a lease for a waiting request (an over-quota lease reclaimed for a guarantee, or an
        idle session suspended for an interactive cell); its owner reads ``reason`` next cell."""
        lease = self.ledger.leases.get(lease_id)
        if lease is None:
            return
        log.info("taking lease %s of %s back: %s", lease_id, lease.user, reason)
        self.audit.preempted(
            lease.public(),
            {"id": req.id, "user": req.user, "team": req.team} if req else {},
            reason,
        )
        lease.preempted = True
        self.vacate(lease, reason, req)

    def vacate(self, lease: Lease, reason: str, req: Request | None = None) -> None:
        """End ``lease`` now: an idle session first moves its variables to host memory (its owner's
        next cell brings them back), anything else is ended at once."""
        if lease.state == "idle" and lease.world_size == 1 and config.get("reclaim-offload"):
            # the memory is booked for ``req`` now; its session starts once this one has written its
            # variables to host memory and exited (``start_sessions`` waits for that)
            # a kernel asking now waits for it
            lease.offload = Offload.pending(lease.worker, lease.id)
            self.metrics.suspended(lease)
            self.end_lease(lease, reason, kill=False)
            task = self.spawn(self.offload_then_end(lease))
            if req is not None:
                self._drains.setdefault(req.id, []).append(task)
            return
        self.end_lease(lease, reason, kill=True)

    async def offload_then_end(self, lease: Lease) -> None:
        """Move a reclaimed idle session's variables to host memory on its worker, then end its
        process."""
        timeout = config.get_seconds("offload-timeout")
        started = time.monotonic()
        try:
            result = await self.workers.offload(lease, timeout)
        except Exception as exc:  # noqa: BLE001 - the worker refused, is gone or too slow: the variables are lost
            why = str(exc) if isinstance(exc, CallError) else f"{type(exc).__name__}: {exc}"
            log.warning("could not offload lease %s: %s", lease.id, why)
            lease.offload = None
            lease.end_reason = f"{lease.end_reason}; its variables could not be kept ({why})"
        else:
            # ``standby``: the session had copied its variables while idle, so moving it was a
            # rename
            lease.offload = Offload.saved_as(
                lease.worker, lease.id, result, time.monotonic() - started
            )
            lease.end_reason = (
                f"{lease.end_reason}; its {len(result['saved'])} variable(s) were moved to host "
                "memory and come back with your next %%gpu cell"
            )
            log.info(
                "lease %s offloaded %d variable(s), %d byte(s) in %.2f s%s",
                lease.id,
                len(result["saved"]),
                result["bytes"],
                lease.offload.seconds,
                " (its standby copy)" if result["standby"] else "",
            )
            if lease.client is not None and lease.client not in self.clients():
                # its kernel went away meanwhile: nobody will restore them
                await self.discard(lease)
        self.ledger.parking.park(lease)  # booked in its machine's memory, or spilled to disk
        await self.workers.kill(lease)

    async def discard(self, lease: Lease) -> None:
        """Forget ``lease``'s copy in host memory: nobody will restore it."""
        self.ledger.parking.unpark(lease)
        offload, lease.offload = lease.offload, None
        if offload is not None:  # else: discarded already
            await self.workers.discard(lease.id, offload)

    def take_offload(self, lease_id: str, user: str, kernel: str) -> Offload | None:
        """The copy of ``offloaded``'s lease, for the one request that restores it."""
        old = self.offloaded(lease_id, user, kernel)
        if old is None:
            return None
        self.ledger.parking.unpark(old)
        offload, old.offload = old.offload, None  # restored once, by this request
        return offload

    def offloaded(self, lease_id: str, user: str, kernel: str) -> Lease | None:
        """The ended lease ``lease_id`` of this kernel whose variables wait in host memory on a live
        worker."""
        old = self.ledger.ended.get(lease_id)
        if (
            old is None
            or old.user != user
            or old.kernel != kernel
            or old.offload is None
            or old.offload.state != "saved"
        ):
            return None
        return old if old.worker in self.ledger.worker_gpus else None

    # ------------------------------------------------------------------ what hooks and handlers ask
    def worker_lost(self, worker: str, leases: list[Lease], note: str | None) -> None:
        """``worker`` left the pool: its leases end (their sessions died with it)."""
        for lease in leases:
            self.end_lease(
                lease,
                f"the pool worker {worker} holding this session was lost"
                + (f" ({note})" if note else ""),
                kill=False,
            )
        self.schedule()

    def client_gone(self, client: str) -> None:
        """A kernel's Dask client disconnected: its requests are cancelled, its leases end and
        their copies in host memory are discarded (nobody will restore them now)."""
        for req in [r for r in self.ledger.queue if r.client == client]:
            self.finish_request(req, "cancelled", "its kernel disconnected")
        for lease in [ls for ls in self.ledger.leases.values() if ls.client == client]:
            self.end_lease(lease, "its kernel disconnected from the pool", kill=True)
        for lease in [
            ls
            for ls in self.ledger.ended.values()
            if ls.client == client and ls.offload is not None and ls.offload.state == "saved"
        ]:
            self.spawn(self.discard(lease))
        self.schedule()

    def admit(self, req: Request, headroom: list[GpuSlot]) -> None:
        """A new request: refused at once (a state, with the fix) if no GPU of the pool, nor one
        its cluster manager could add (``headroom``), can ever satisfy it; queued otherwise."""
        self.submit(req)
        # (once per request shape until the pool changes; with the machines' host memory and cores)
        impossible = self.ledger.never_fits(
            req.spec, headroom
        ) or self.ledger.policy.never_within_limits(req.user, req.spec)
        if impossible:
            self.finish_request(
                req, "refused", f"No GPU in this pool can ever satisfy this request: {impossible}"
            )
            return
        self.ledger.submit(req)
        self.schedule()

    def cancel(self, item: str, user: str | None, verdict: Verdict | None = None) -> CancelReply:
        """Cancel a queued request, or end a lease (its session is killed): the caller's own, or
        anyone's for the pool's admins (``verdict``: the identity source's word on the caller,
        e.g. a JupyterHub admin)."""
        admin = verdict is not None and verdict.admin
        why = f"{item} belongs to %s; you can cancel only your own work"
        req = self.ledger.requests.get(item)

        def by(owner: str) -> str:
            if admin and owner != user:
                log.info("%s (an administrator of the pool) cancels %s of %s", user, item, owner)
                return f"cancelled by {user}, an administrator of the pool"
            self.permissions.check_acting_for(owner, user, why % owner)
            return "cancelled by its owner"

        if req is not None and req.state in ("queued", "starting"):
            reason = by(req.user)
            for lease_id in list(req.leases):
                if lease_id in self.ledger.leases:
                    self.end_lease(
                        self.ledger.leases[lease_id], "its request was cancelled", kill=True
                    )
            self.finish_request(req, "cancelled", reason)
            self.schedule()
            return {"cancelled": True, "what": f"queued request {item}"}
        lease = self.ledger.leases.get(item)
        if lease is None:
            raise NotFound(f"nothing queued or running is called {item}")
        self.end_lease(lease, by(lease.user), kill=True)
        self.schedule()
        return {"cancelled": True, "what": f"lease {item} (its session was ended)"}

    def housekeeping(self, now: float, orphans: tuple[list[Lease], list[Lease]]) -> None:
        """Once a second: adopted leases whose kernel did not come back (``orphans``: live ones to
        end, parked copies to discard), the admin's idle timeout, reservations that aged."""
        live, parked = orphans
        for lease in live:
            self.end_lease(
                lease,
                f"its kernel did not reconnect within {config.get_seconds('adopt-grace'):.0f} s of "
                "the pool's scheduler restarting",
                kill=True,
            )
        for lease in parked:
            self.spawn(self.discard(lease))
        expired = self.ledger.policy.idle_expired(now)
        for lease_id in expired:
            idle = self.ledger.leases.get(lease_id)
            if idle is not None and idle.state == "idle":
                self.vacate(
                    idle,
                    f"released by the pool after {self.ledger.policy.quotas.idle_timeout:g} s idle "
                    "(the admin's idle timeout)",
                )
        if expired or self.ledger.queue:
            self.schedule()
