"""The pool's workers as the broker knows them: the GPUs each offers, how many sessions it starts at
once, whether its sessions run as their users.

Why apart from the plugin: a worker's offer (``gpu_register_worker``) is checked field by field
before it becomes ``GpuSlot``s in the ledger, and a worker that joins a restarted scheduler brings
the sessions it kept, which ``adoption.py`` books again. The broker's handler only checks the
caller.
"""

from __future__ import annotations

import logging
from typing import Any

from jupyter_gpu.broker.adoption import Adoption
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import GpuSlot
from jupyter_gpu.broker.permissions import Permissions
from jupyter_gpu.broker.sampling import GpuSamples
from jupyter_gpu.common.protocol import GpuInfoMsg, LiveSession, ParkedCopy, WorkerRegistered
from jupyter_gpu.common.refusals import Malformed

log = logging.getLogger(__name__)


class WorkerRegistry:
    """Worker address -> what it said when it registered (its GPUs are in the ledger)."""

    def __init__(self, ledger: Ledger, samples: GpuSamples, adoption: Adoption) -> None:
        self.ledger, self.samples, self.adoption = ledger, samples, adoption
        self.start_slots: dict[str, int] = {}  # worker -> session processes it starts at once
        self.runs_as_users: dict[str, bool] = {}  # worker -> whether its sessions run as users

    def register(
        self,
        worker: str,
        gpus: list[GpuInfoMsg],
        sessions: list[LiveSession],
        parked: list[ParkedCopy],
        start_slots: int,
        accounts: bool,
    ) -> WorkerRegistered:
        """A worker's offer (replacing any earlier one), with the sessions and copies it kept
        across a scheduler restart, adopted."""
        slots = slots_offered(worker, gpus)
        ids = self.ledger.set_worker_gpus(worker, slots)
        self.start_slots[worker] = start_slots
        self.runs_as_users[worker] = accounts
        self.samples.track(ids)
        refused = self.adoption.adopt(worker, sessions, parked)
        log.info(
            "worker %s offers %d GPU(s)%s",
            worker,
            len(ids),
            f", with {len(sessions)} live session(s) and {len(parked)} parked"
            if sessions or parked
            else "",
        )
        return {"gpus": ids, "refused_sessions": refused}

    @staticmethod
    def tell_refused(scheduler: Any, worker: str, leases: list[str]) -> None:
        """Name the sessions the broker could not adopt back to their worker, on the scheduler's
        stream to it (the worker ends them)."""
        if leases and worker in scheduler.stream_comms:
            scheduler.stream_comms[worker].send({"op": "gpu_sessions_refused", "leases": leases})

    def users_isolated(self, permissions: Permissions) -> bool:
        """Whether every session of the pool runs as its user's account."""
        return permissions.users_isolated(
            self.runs_as_users.get(w, False) for w in self.ledger.worker_gpus
        )


def slots_offered(worker: str, gpus: list[GpuInfoMsg]) -> list[GpuSlot]:
    """The GPUs of an offer as the ledger keeps them (a GPU without its index, uuid, name or size,
    or two GPUs with one index, refuse the offer)."""
    for i, info in enumerate(gpus):
        missing = [k for k in ("index", "uuid", "name", "total_bytes") if k not in info]
        if missing:
            raise Malformed(f"gpu_register_worker: gpus[{i}] lacks {', '.join(missing)}")
    if len({int(info["index"]) for info in gpus}) != len(gpus):
        raise Malformed("gpu_register_worker: two GPUs have the same index")
    return [
        GpuSlot(
            worker=worker,
            index=int(info["index"]),
            uuid=info["uuid"],
            name=info["name"],
            total_bytes=int(info["total_bytes"]),
            virtual=bool(info.get("virtual")),
            mig=bool(info.get("mig")),
        )
        for info in gpus
    ]
