"""Taking back, after a scheduler restart, the sessions and host-memory copies its workers kept.

Why: a GPU worker outlives a restart of its scheduler (``worker/dask_worker.py``) and keeps its
sessions and their parked variables; when it joins the new scheduler it reports them
(``gpu_register_worker``'s ``sessions`` and ``parked``). The new broker books each live session as a
lease again (so its kernel carries on as if nothing had happened) and each parked copy as an ended
lease whose variables wait for their owner. A lease whose kernel does not reconnect within
``adopt-grace`` is an orphan: the broker ends it (its session is killed, its copy discarded).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import Allocation, Lease, Offload, ids_beyond
from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import LeaseView, LiveSession, ParkedCopy

log = logging.getLogger(__name__)


class Adoption:
    """The leases and copies adopted after a restart, until their kernels are back (or are not)."""

    def __init__(self, ledger: Ledger, audit: AuditStore) -> None:
        self.ledger, self.audit = ledger, audit
        # lease id -> when adopted (its kernel must come back)
        self.adopted: dict[str, float] = {}

    def adopt(
        self, worker: str, sessions: list[LiveSession], parked: list[ParkedCopy]
    ) -> list[str]:
        """Book the sessions and parked variables ``worker`` kept across a scheduler restart;
        returns the lease ids that could not be (the worker ends those sessions)."""
        now = time.time()
        refused = []
        ids_beyond(
            [s["lease"].get("id", "") for s in sessions]
            + [p["lease"].get("id", "") for p in parked]
        )
        for live in sessions:
            lease = self.lease_from(worker, live["lease"], live["client"])
            if lease is None:
                refused.append(str(live["lease"].get("id")))
                continue
            lease.state = "running" if live["busy"] else "idle"
            why = self.ledger.adopt(lease, idle=not live["busy"])
            if why is not None:
                log.warning("cannot adopt the session of lease %s on %s: %s", lease.id, worker, why)
                refused.append(lease.id)
                continue
            self.adopted[lease.id] = now
            self.audit.lease_started(lease.public(), lease.preemptible)
            log.info(
                "adopted lease %s of %s on %s (its session outlived the scheduler)",
                lease.id,
                lease.user,
                worker,
            )
        for copy in parked:
            lease = self.lease_from(worker, copy["lease"], copy["client"])
            if lease is None or lease.id in self.ledger.ended or lease.id in self.ledger.leases:
                continue
            lease.state, lease.ended = "ended", now
            lease.end_reason = (
                copy["lease"].get("end_reason") or "its session was moved to host memory"
            )
            lease.offload = Offload.saved_as(worker, lease.id, copy, seconds=None)
            lease.offload.spilled = bool(copy.get("spilled"))  # on disk: no host memory to book
            self.ledger.ended[lease.id] = lease
            self.ledger.parking.park(lease)
            self.adopted[lease.id] = now
        return refused

    def lease_from(self, worker: str, view: LeaseView, client: str | None) -> Lease | None:
        """A ``Lease`` rebuilt from the view a worker kept, on that worker's GPUs (None if it does
        not fit them)."""
        indices = view.get("gpu_indices") or []
        found = [self.ledger.gpus.get(f"{worker}#{i}") for i in indices]
        slots = [s for s in found if s is not None]
        if not indices or not view.get("id") or not view.get("user") or len(slots) != len(found):
            return None
        if len(slots) == 1:
            allocations = [
                Allocation(gpu=slots[0].id, index=slots[0].index, bytes=int(view.get("bytes") or 0))
            ]
        else:
            allocations = [Allocation(gpu=s.id, index=s.index, bytes=s.total_bytes) for s in slots]
        return Lease(
            id=view["id"],
            request=view.get("request") or "",
            user=view["user"],
            kernel=view.get("kernel", ""),
            client=client,
            worker=worker,
            allocations=allocations,
            fraction=float(view.get("fraction") or 0),
            priority=view.get("priority") or "interactive",
            notebook=view.get("notebook"),
            cell=view.get("cell"),
            team=view.get("team"),
            rank=int(view.get("rank") or 0),
            world_size=int(view.get("world_size") or 1),
            started=float(view.get("started") or time.time()),
            isolation=view.get("isolation") or "none",
            address=view.get("address"),
            pid=view.get("pid"),
            containment=view.get("containment"),
            host_memory_limit=view.get("host_memory_limit"),
            peak_bytes=view.get("peak_bytes"),
            resident_bytes=view.get("resident_bytes"),
            preemptible=bool(view.get("preemptible")),
        )

    def orphans(self, now: float, clients: Collection[str]) -> tuple[list[Lease], list[Lease]]:
        """Adopted leases and parked copies whose kernel did not reconnect within ``adopt-grace``
        of the restart: (live leases to end, ended leases whose copy to discard)."""
        grace = config.get_seconds("adopt-grace")
        live: list[Lease] = []
        parked: list[Lease] = []
        for lease_id, since in list(self.adopted.items()):
            if now - since < grace:
                continue
            del self.adopted[lease_id]
            lease = self.ledger.leases.get(lease_id)
            if lease is not None and lease.client is not None and lease.client not in clients:
                live.append(lease)
                continue
            copy = self.ledger.ended.get(lease_id)
            if (
                copy is not None
                and copy.client is not None
                and copy.client not in clients
                and copy.offload is not None
                and copy.offload.state == "saved"
            ):
                parked.append(copy)
        return live, parked
