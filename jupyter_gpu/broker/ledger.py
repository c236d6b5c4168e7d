"""The broker's bookkeeping as a plain class: GPUs, requests, the queue and leases; granting and
ending.

Why a class without asyncio or Dask: the same bookkeeping must run in three places and mean the same
in each, the broker plugin (``broker/plugin.py``, which adds the Dask handlers, the audit store and
the session starts around it), the pool simulator (``bench/pool_sim.py``) and the property tests. A
figure the simulator prints is then a figure of the broker's own code, not of a copy of it.

The ledger keeps these invariants: a GPU's ``leased_bytes`` is the sum of its leases' allocations
and never exceeds its memory (packing only places into free memory); a machine's booked host
memory and cores are the sums of its leases' and never exceed what it leaves to sessions
(``hosts.py``), idle sessions' copies parked in host memory included (the oldest are spilled to
disk to make room: ``parking.py``); a lease is counted by the fair-share policy from its grant to
its end, once; the queue holds only requests in state ``queued``.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable

from jupyter_gpu.broker import packing
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.fragmentation import Workload
from jupyter_gpu.broker.hosts import HostSlot, SessionDefaults, cpu_milli
from jupyter_gpu.broker.model import GpuSlot, Lease, Request, new_id
from jupyter_gpu.broker.parking import ParkedCopies
from jupyter_gpu.broker.queue_view import QueueView
from jupyter_gpu.broker.scheduling import PreemptFn, schedule_pass
from jupyter_gpu.broker.waiting import WaitingRoom
from jupyter_gpu.common.protocol import LeaseState, RequestSpec, RequestState

log = logging.getLogger(__name__)

ENDED_KEPT = 2000  # ended leases and finished requests kept so a kernel can read how they ended


class Ledger:
    """See the module docstring. ``clock`` and ``new_id`` are injectable so a simulation runs on its
    own time and ids. ``sessions_start_idle``: a simulation whose sessions start the instant they
    are granted counts a new lease as idle from its grant; the broker counts it busy until its
    session says it is idle."""

    def __init__(
        self,
        policy: FairSharePolicy,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[str], str] = new_id,
        sessions_start_idle: bool = False,
    ):
        self.policy = policy
        self.sessions_start_idle = sessions_start_idle
        self.clock = clock
        self.new_id = new_id
        self.gpus: dict[str, GpuSlot] = {}
        self.worker_gpus: dict[str, list[str]] = {}
        # each worker's machine: host memory and cores left to sessions, and what leases hold
        self.hosts: dict[str, HostSlot] = {}
        # the request shapes seen: what fragmentation-aware placement measures against
        self.workload = Workload(policy.quotas.session_defaults)
        self.packer = packing.Packer(self.gpus, self.hosts, self.workload)
        self.fit_memo = packing.NeverFitsMemo()  # forgets all when workers come, go or report
        # GPUs of workers lost recently (a Nanny restarting one, a node rebooting): a request that
        # needs them waits for them instead of being refused as impossible
        self.recently_lost: dict[str, tuple[GpuSlot, float]] = {}
        self.requests: dict[str, Request] = {}
        # the queued requests, indexed by team, user and shape (waiting.py)
        self.queue = WaitingRoom(policy.team_of)
        self.leases: dict[str, Lease] = {}
        self.ended: collections.OrderedDict[str, Lease] = collections.OrderedDict()
        # workers being drained (broker/draining.py): nothing new is placed on their GPUs
        self.draining: set[str] = set()
        self.parking = ParkedCopies(self.hosts, self.ended)  # idle sessions' copies (parking.py)
        self.view = QueueView(policy, self.queue, self.packer, clock)  # reasons, estimates

    @property
    def defaults(self) -> SessionDefaults:
        return self.workload.defaults

    # ------------------------------------------------------------------ GPUs and machines
    def set_worker_gpus(self, worker: str, slots: list[GpuSlot]) -> list[str]:
        """A worker offers ``slots`` (replacing what it offered before); returns their ids."""
        for gpu_id in self.worker_gpus.pop(worker, []):
            self.gpus.pop(gpu_id, None)
        ids = []
        for slot in slots:
            self.gpus[slot.id] = slot
            self.recently_lost.pop(slot.uuid, None)
            ids.append(slot.id)
        self.worker_gpus[worker] = ids
        self.hosts.setdefault(worker, HostSlot(worker=worker)).gpu_count = len(ids)
        self.packer.reindex(worker, [] if worker in self.draining else slots)
        self.fit_memo.clear()
        return ids

    def set_host(self, worker: str, memory: int | None = None, cpus: float | None = None) -> None:
        """What ``worker``'s machine leaves to sessions: host memory (bytes) and CPU cores (None:
        not reported, unbounded). A report below what its leases hold already takes nothing
        from them; new leases wait until it fits again."""
        host = self.hosts.setdefault(worker, HostSlot(worker=worker))
        host.memory = None if memory is None else int(memory)
        host.cpu_milli = None if cpus is None else cpu_milli(cpus)
        self.parking.spill_over(host)
        self.packer.touch(worker)
        self.fit_memo.clear()

    def remove_worker(self, worker: str) -> tuple[list[str], list[Lease]]:
        """Forget a worker's GPUs (remembered as recently lost) and its machine; returns their ids
        and the live leases on it, which the caller ends with its reason."""
        gone = self.worker_gpus.pop(worker, [])
        self.draining.discard(worker)
        for gpu_id in gone:
            slot = self.gpus.pop(gpu_id, None)
            if slot is not None:
                self.recently_lost[slot.uuid] = (slot, self.clock())
        self.hosts.pop(worker, None)
        self.packer.reindex(worker, [])
        self.fit_memo.clear()
        return gone, [ls for ls in self.leases.values() if ls.worker == worker]

    def capacity(self, remember: float = 120.0) -> list[GpuSlot]:
        """The GPUs the pool has, plus those lost in the last ``remember`` seconds (likely to come
        back)."""
        self._forget_lost(remember)
        return list(self.gpus.values()) + [lost_copy(s) for s, _ in self.recently_lost.values()]

    def _forget_lost(self, remember: float = 120.0) -> None:
        now = self.clock()
        for uuid, (_, lost_at) in list(self.recently_lost.items()):
            if now - lost_at > remember:
                del self.recently_lost[uuid]
                self.fit_memo.clear()

    def never_fits(self, spec: RequestSpec, headroom: list[GpuSlot] | None = None) -> str | None:
        """``packing.never_fits`` on the pool's capacity, its machines and ``headroom`` (what a
        cluster manager could add), once per request shape until the pool changes."""
        self._forget_lost()
        return self.fit_memo.check(
            spec, lambda: self.capacity() + (headroom or []), self.hosts, self.defaults, headroom
        )

    # ------------------------------------------------------------------ requests
    def submit(self, req: Request) -> None:
        """Put ``req`` in the queue (it is considered at the next ``schedule``)."""
        req.state = "queued"
        self.requests[req.id] = req
        self.queue.append(req)
        self.workload.observe(req.spec)

    def record(self, req: Request) -> None:
        """Keep a request that never queues (refused at once) so its outcome can be read."""
        self.requests[req.id] = req

    def queued(self) -> list[Request]:
        return list(self.queue)

    def ordered_queue(self) -> list[Request]:
        """The waiting requests in the policy's order."""
        return self.policy.order(self.queued())

    def finish_request(self, req: Request, state: RequestState, reason: str) -> None:
        """``req`` leaves the queue for good: granted, refused, cancelled or failed."""
        req.state = state
        if state != "granted":
            req.error = reason
        req.reason = reason
        if req in self.queue:
            self.queue.remove(req)
        # finished requests are kept briefly so a waiting kernel can read the outcome
        if len(self.requests) > ENDED_KEPT:
            finished = [
                r for r, q in self.requests.items() if q.state not in ("queued", "starting")
            ]
            for rid in finished[: ENDED_KEPT // 2]:
                self.requests.pop(rid, None)

    # ------------------------------------------------------------------ scheduling
    def schedule(
        self,
        preempt: PreemptFn | None,
        now: float | None = None,
        eta_for: int = 0,
        fail: Callable[[Request, str], None] | None = None,
    ) -> list[tuple[Request, list[Lease]]]:
        """One scheduling pass (``scheduling.schedule_pass``) over the queue: grants, in policy
        order, what fits; ``preempt(lease_id, reason, req)`` takes a lease back for a waiting
        request (it must end the lease through ``end``). Returns the grants made, each request with
        its new leases (estimated starts are left to a view: ``queue_view.py``). A request that
        makes the pass raise (it should never get in: handlers validate what they accept) is taken
        out with the reason, through ``fail`` (default: ``finish_request(req, "failed", ...)``), and
        the pass runs again without it: one bad request never stops scheduling for everybody else."""
        grants: list[tuple[Request, list[Lease]]] = []

        def grant(req: Request, placement: packing.Placement, preemptible: bool) -> None:
            grants.append((req, self.grant(req, placement, preemptible)))

        for _attempt in range(len(self.queue) + 1):
            try:
                schedule_pass(
                    self.policy,
                    self.queue,
                    self.packer,
                    grant,
                    preempt,
                    now=self.clock() if now is None else now,
                    eta_for=eta_for,
                )
                return grants
            except Exception:
                log.exception(
                    "a scheduling pass failed; looking for the request that makes it fail"
                )
                culprits = faulty_requests(self)
                if not culprits:
                    return grants  # not a request's fault: the next event tries again
                for req, why in culprits:
                    reason = (
                        f"The pool could not schedule this request ({why}). This is a jupyter-gpu "
                        "error, "
                        "not your code's: the pool's log has the details; other requests were not "
                        "affected."
                    )
                    if fail is not None:
                        fail(req, reason)
                    else:
                        self.finish_request(req, "failed", reason)
        return grants

    def grant(self, req: Request, placement: packing.Placement, preemptible: bool) -> list[Lease]:
        """Book ``placement`` for ``req``: one lease per rank, the GPUs' bytes, the policy's
        accounting."""
        self.queue.remove(req)
        req.state = "starting"
        req.reason = "starting the session process"
        req.eta, req.eta_basis, req.eta_note = None, None, None
        now = self.clock()
        team = req.team or self.policy.quotas.team_of(req.user)
        leases = []
        for rank, (worker, allocations) in enumerate(placement):
            fraction = sum(a.bytes / self.gpus[a.gpu].total_bytes for a in allocations)
            lease = Lease(
                id=self.new_id("L"),
                request=req.id,
                user=req.user,
                kernel=req.kernel,
                client=req.client,
                worker=worker,
                allocations=allocations,
                fraction=round(fraction, 4),
                priority=req.spec.priority,
                notebook=req.notebook,
                cell=req.cell,
                team=req.team,
                rank=rank,
                world_size=len(placement),
                started=now,
                preemptible=preemptible,
            )
            lease.host_memory, lease.cpu_milli = self.packer.host_need(
                req.spec, worker, allocations
            )
            self._book(lease, +1)
            self.parking.spill_over(self.hosts.get(worker))
            self.leases[lease.id] = lease
            req.leases.append(lease.id)
            leases.append(lease)
            # the exact share is what quotas count (the lease shows it rounded)
            self._count(lease, team, fraction, now, idle=self.sessions_start_idle)
        return leases

    def adopt(self, lease: Lease, idle: bool) -> str | None:
        """Book a live lease this ledger did not grant (its session outlived a scheduler restart).
        Returns None when booked, else why it cannot be (its GPUs are gone, or the memory is booked
        by others)."""
        if lease.id in self.leases:
            return f"lease {lease.id} is already live"
        for a in lease.allocations:
            slot = self.gpus.get(a.gpu)
            if slot is None:
                return f"its GPU {a.gpu} is not in the pool"
            if slot.free_bytes < a.bytes:
                return f"its GPU {a.gpu} has only {slot.free_bytes} bytes free, not {a.bytes}"
        host = self.hosts.get(lease.worker)
        short = host.lacks(lease.host_memory, lease.cpu_milli) if host is not None else None
        if short:
            return short
        self._book(lease, +1)
        self.leases[lease.id] = lease
        team = lease.team or self.policy.quotas.team_of(lease.user)
        self._count(lease, team, lease.fraction, lease.started, idle=idle)
        return None

    def _count(self, lease: Lease, team: str, fraction: float, now: float, idle: bool) -> None:
        """Have the policy count a booked lease against its user and team."""
        self.policy.lease_started(
            lease.id,
            lease.user,
            team,
            fraction,
            lease.preemptible,
            now=now,
            allocs={a.gpu: a.bytes for a in lease.allocations},
            request=lease.request,
            gang=lease.world_size > 1,
            priority=lease.priority,
            idle=idle,
            host=(lease.host_memory, lease.cpu_milli),
        )

    def set_state(
        self,
        lease_id: str,
        state: LeaseState,
        resident: int | None = None,
        step: float | None = None,
        total: float | None = None,
    ) -> Lease | None:
        """A lease's session started a cell (``running``), reported how far it is (``running`` with
        ``step`` of ``total``) or finished one (``idle``)."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return None
        lease.state = state
        self.policy.lease_state(
            lease_id, state, now=self.clock(), resident=resident, step=step, total=total
        )
        return lease

    def end(self, lease_id: str, reason: str, now: float | None = None) -> Lease | None:
        """End a live lease: free its GPU memory, stop counting it; None if it is not live."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return None
        self._book(lease, -1)
        lease.state, lease.ended, lease.end_reason = (
            "ended",
            self.clock() if now is None else now,
            reason,
        )
        self.policy.lease_ended(lease.id, now=lease.ended)
        self.ended[lease.id] = lease
        while len(self.ended) > ENDED_KEPT:
            self.parking.unpark(self.ended.popitem(last=False)[1])
        return lease

    def _book(self, lease: Lease, sign: int) -> None:
        """Add (+1) or take back (-1) a lease's GPU memory, host memory and cores."""
        for a in lease.allocations:
            slot = self.gpus.get(a.gpu)
            if slot is not None:
                slot.leased_bytes += sign * a.bytes
                (slot.leases.add if sign > 0 else slot.leases.discard)(lease.id)
        host = self.hosts.get(lease.worker)
        if host is not None:
            host.leased_memory += sign * lease.host_memory
            host.leased_cpu_milli += sign * lease.cpu_milli
            (host.leases.add if sign > 0 else host.leases.discard)(lease.id)
        if lease.worker in self.worker_gpus:
            self.packer.touch(lease.worker)

    def lease_or_ended(self, lease_id: str) -> Lease | None:
        return self.leases.get(lease_id) or self.ended.get(lease_id)

    # ------------------------------------------------------------------ queries (broker/scaling.py)
    def largest_gpu_bytes(self) -> int:
        """The memory of the pool's largest GPU (0: no GPU yet)."""
        return max((g.total_bytes for g in self.gpus.values()), default=0)

    def busy_workers(self) -> set[str]:
        """Workers holding a session (a live lease, starting ones included) or a session's variables
        in host memory (saved there, or being written there): a worker to keep."""
        busy = {ls.worker for ls in self.leases.values()}
        for ls in self.ended.values():
            if ls.offload is not None:
                busy.add(ls.offload.worker)
        return busy

    def note_end_on(self, workers: set[str], note: str) -> None:
        """Add ``note`` (how the machine they ran on ended) to the end reasons of the leases that
        ended on ``workers`` and do not say it yet."""
        for lease in self.ended.values():
            if lease.worker in workers and lease.end_reason and "ended:" not in lease.end_reason:
                lease.end_reason = f"{lease.end_reason} ({note})"

    def check(self) -> None:
        """Assert the invariants of the module docstring (tests and the simulator call it)."""
        check_invariants(self)


def check_invariants(ledger: Ledger) -> None:
    """The invariants of the module docstring, asserted."""
    for g in ledger.gpus.values():
        total = sum(
            a.bytes for ls in ledger.leases.values() for a in ls.allocations if a.gpu == g.id
        )
        assert total == g.leased_bytes, (g.id, total, g.leased_bytes)
        assert 0 <= g.leased_bytes <= g.total_bytes, (g.id, g.leased_bytes, g.total_bytes)
    for h in ledger.hosts.values():
        mine = [ls for ls in ledger.leases.values() if ls.worker == h.worker]
        assert h.leases == {ls.id for ls in mine}, (h.worker, h.leases)
        assert h.leased_memory == sum(ls.host_memory for ls in mine), h
        assert h.leased_cpu_milli == sum(ls.cpu_milli for ls in mine), h
        assert h.memory is None or h.leased_memory <= h.memory, h
        assert h.cpu_milli is None or h.leased_cpu_milli <= h.cpu_milli, h
    ledger.parking.check()
    assert all(r.state == "queued" for r in ledger.queue), [r.state for r in ledger.queue]
    assert set(ledger.policy.leases) == set(ledger.leases), set(ledger.policy.leases) ^ set(
        ledger.leases
    )


def faulty_requests(ledger: Ledger) -> list[tuple[Request, str]]:
    """The queued requests that the policy or the packing cannot handle, each with the error."""
    now = ledger.clock()
    gpus = list(ledger.gpus.values())
    faulty = []
    for req in ledger.queued():
        try:
            req.spec.validate()
            ledger.policy.key(req, now)
            ledger.policy.limit_reason(req)
            ledger.packer.place(req.spec)
            packing.why_waiting(req.spec, gpus, ledger.hosts, ledger.defaults)
        except Exception as exc:  # noqa: BLE001 - exactly what is looked for
            faulty.append((req, f"{type(exc).__name__}: {exc}"))
    return faulty


def lost_copy(slot: GpuSlot) -> GpuSlot:
    """A lost GPU as capacity counts it: on a worker that is not in the pool (nothing is placed
    there)."""
    return GpuSlot(
        worker=f"lost:{slot.worker}",
        index=slot.index,
        uuid=slot.uuid,
        name=slot.name,
        total_bytes=slot.total_bytes,
        virtual=slot.virtual,
        mig=slot.mig,
    )
