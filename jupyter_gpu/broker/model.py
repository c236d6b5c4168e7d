"""The broker's state: GPUs in the pool, requests waiting for them, and leases granted on them.

Plain dataclasses with no Dask in them, so that the packing, the queue policy and the pool simulator
run the real code on their own.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import time
from dataclasses import dataclass, field

from jupyter_gpu.common.protocol import (
    EtaBasis,
    Isolation,
    LeaseState,
    LeaseView,
    LostVariable,
    OffloadResult,
    OffloadState,
    OffloadView,
    Priority,
    RequestSpec,
    RequestState,
    RestoreResult,
)


@dataclass
class GpuSlot:
    """One GPU as the broker sees it: where it is, how big it is, what is leased on it."""

    worker: str
    index: int
    uuid: str
    name: str
    total_bytes: int
    virtual: bool = False
    mig: bool = False
    leased_bytes: int = 0
    leases: set[str] = field(default_factory=set)

    @functools.cached_property
    def id(self) -> str:  # cached: placement and scheduling read it for every GPU
        return f"{self.worker}#{self.index}"

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.leased_bytes


_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    """A new request or lease id (``R12``, ``L13``): short, for people to read and type."""
    return f"{prefix}{next(_ids)}"


def ids_beyond(taken: list[str]) -> None:
    """Make ``new_id`` never hand out ``taken`` ids again (leases adopted from before a scheduler
    restart)."""
    global _ids
    numbers = [int(t[1:]) for t in taken if t[1:].isdigit()]
    if numbers:
        current = next(_ids)
        _ids = itertools.count(max(current, max(numbers) + 1))


@dataclass
class Offload:
    """Where a reclaimed session's variables went: ``pending`` while its session writes them to
    host memory on its worker, then ``saved`` there (``path`` never leaves the pool: kernels and the
    panel see ``view()``). Built here only: from a worker's ``OffloadResult``, whether the broker
    just asked for it or a worker reported it after a scheduler restart."""

    state: OffloadState
    worker: str
    lease: str  # the ended lease whose session wrote it: what the worker knows it by
    path: str | None = None
    saved: list[str] = field(default_factory=list)
    lost: list[LostVariable] = field(default_factory=list)
    bytes: int = 0
    standby: bool = False  # handed over from a standby copy (moving it was a rename)
    seconds: float | None = None  # how long moving it took (None: adopted after a restart)
    # moved to the pool's disk folder on its worker to leave host memory to sessions (hosts.py)
    spilled: bool = False

    @classmethod
    def pending(cls, worker: str, lease: str) -> Offload:
        return cls(state="pending", worker=worker, lease=lease)

    @classmethod
    def saved_as(
        cls, worker: str, lease: str, result: OffloadResult, seconds: float | None
    ) -> Offload:
        return cls(
            state="saved",
            worker=worker,
            lease=lease,
            path=result["path"],
            saved=list(result["saved"]),
            lost=list(result["lost"]),
            bytes=int(result["bytes"]),
            standby=bool(result["standby"]),
            seconds=seconds,
        )

    def view(self) -> OffloadView:
        return {
            "state": self.state,
            "worker": self.worker,
            "saved": self.saved,
            "lost": self.lost,
            "bytes": self.bytes,
            "standby": self.standby,
            "seconds": self.seconds,
        }


@dataclass
class Request:
    """A request waiting in (or just leaving) the queue."""

    id: str
    user: str
    kernel: str
    client: str | None
    spec: RequestSpec
    notebook: str | None = None
    cell: str | None = None
    team: str | None = None
    submitted: float = field(default_factory=time.time)
    state: RequestState = "queued"
    reason: str = ""
    error: str | None = None
    eta: float | None = None
    # what the estimate rests on (broker/estimates.py), and the same in words
    eta_basis: EtaBasis | None = None
    eta_note: str | None = None
    leases: list[str] = field(default_factory=list)
    # the offload of an earlier lease this request's session starts with
    restore: Offload | None = None
    restored: RestoreResult | None = None  # what the new session got back from it
    # proof enough to withdraw it (its kernel got it with the request's first status: owner only),
    # even when the identity source no longer accepts the kernel's token
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)


@dataclass
class Allocation:
    gpu: str  # GpuSlot.id
    index: int  # GPU index on its worker
    bytes: int


@dataclass
class Lease:
    """Memory on one or more GPUs of one worker, held by one session process of one kernel."""

    id: str
    request: str
    user: str
    kernel: str
    client: str | None
    worker: str
    allocations: list[Allocation]
    fraction: float
    priority: Priority = "interactive"
    notebook: str | None = None
    cell: str | None = None
    team: str | None = None
    rank: int = 0
    world_size: int = 1
    started: float = field(default_factory=time.time)
    state: LeaseState = "starting"
    isolation: Isolation = "none"
    # how its processes are kept together and capped (launcher/cgroups.py)
    containment: str | None = None
    host_memory_limit: int | None = None  # the host memory its processes may use together
    host_memory: int = 0  # host memory booked for it on its machine (broker/hosts.py)
    cpu_milli: int = 0  # thousandths of a CPU core booked for it on its machine
    address: str | None = None  # the session process's comm address
    # what its session asks of every call: owner only
    secret: str | None = field(default=None, repr=False)
    pid: int | None = None
    cell_started: float | None = None
    peak_bytes: int | None = None  # the largest cell peak so far (right-sizing, audit)
    gpu_utilization: float | None = None  # the last cell's mean SM utilization (real GPUs, NVML)
    # what the session held when it last went idle (what suspending moves)
    resident_bytes: int | None = None
    preemptible: bool = False  # granted beyond its team's guarantee: may be reclaimed
    preempted: bool = False  # ended to give its memory to a request owed by a guarantee
    # where its variables went when it was reclaimed
    offload: Offload | None = None
    # its worker was drained: the request whose session carries on with its variables
    moved_to: str | None = None
    ended: float | None = None
    end_reason: str | None = None

    @property
    def bytes(self) -> int:
        return sum(a.bytes for a in self.allocations)

    def public(self) -> LeaseView:
        """The lease as the kernel, the CLI and the panel see it."""
        return {
            "id": self.id,
            "request": self.request,
            "user": self.user,
            "kernel": self.kernel,
            "worker": self.worker,
            "gpus": [a.gpu for a in self.allocations],
            "gpu_indices": [a.index for a in self.allocations],
            "bytes": self.bytes,
            "fraction": self.fraction,
            "priority": self.priority,
            "notebook": self.notebook,
            "cell": self.cell,
            "rank": self.rank,
            "world_size": self.world_size,
            "started": self.started,
            "state": self.state,
            "isolation": self.isolation,
            "address": self.address,
            "pid": self.pid,
            "containment": self.containment,
            "host_memory_limit": self.host_memory_limit,
            "host_memory": self.host_memory,
            "cpus": self.cpu_milli / 1000,
            "cell_started": self.cell_started,
            "peak_bytes": self.peak_bytes,
            "end_reason": self.end_reason,
            "gpu_utilization": self.gpu_utilization,
            "resident_bytes": self.resident_bytes,
            "preempted": self.preempted,
            "preemptible": self.preemptible,
            "offload": self.offload.view() if self.offload else None,
            "moved_to": self.moved_to,
            "team": self.team,
        }
