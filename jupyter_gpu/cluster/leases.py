"""The broker's state: GPUs in the pool, requests waiting for them, and leases granted on them.

Plain dataclasses with no Dask in them, so that the packing, the queue policy and the pool simulator run
the real code on their own.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

from ..units import format_bytes

PRIORITIES = ("interactive", "batch")


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

    @property
    def id(self) -> str:
        return f"{self.worker}#{self.index}"

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.leased_bytes


@dataclass
class RequestSpec:
    """What a cell asks for, as the magic sends it.

    Exactly one of ``fraction`` (of one GPU, 0 < f <= 1), ``memory`` (bytes on one GPU) or ``gpus`` (whole
    GPUs on one worker, >= 1) is set. ``workers`` > 1 asks for that many such allocations, each on a
    distinct GPU, granted together (a gang).
    """

    fraction: float | None = None
    memory: int | None = None
    gpus: int | None = None
    workers: int = 1
    priority: str = "interactive"

    def validate(self) -> None:
        """Raise ValueError, worded for the notebook user, for a spec that makes no sense."""
        set_fields = [n for n in ("fraction", "memory", "gpus") if getattr(self, n) is not None]
        if len(set_fields) != 1:
            raise ValueError("ask for exactly one of a fraction (--gpus 0.5), whole GPUs (--gpus 2) or "
                             "memory (--memory 8GiB)")
        if self.fraction is not None and not (0 < self.fraction <= 1):
            raise ValueError(f"a GPU fraction must be in (0, 1]; got {self.fraction}")
        if self.memory is not None and self.memory <= 0:
            raise ValueError(f"memory must be positive; got {self.memory}")
        if self.gpus is not None and (self.gpus < 1 or int(self.gpus) != self.gpus):
            raise ValueError(f"whole GPUs must be a whole number >= 1; got {self.gpus}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1; got {self.workers}")
        if self.gpus is not None and self.gpus > 1 and self.workers > 1:
            raise ValueError("--workers N runs one rank per GPU: use --gpus 1 (or a fraction) with --workers")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}; got {self.priority!r}")

    def need_on(self, gpu: GpuSlot) -> int:
        """Bytes this spec reserves on ``gpu`` for one allocation (whole GPUs reserve all of it)."""
        if self.memory is not None:
            return int(self.memory)
        if self.gpus is not None:
            return gpu.total_bytes
        return int(math.ceil(float(self.fraction) * gpu.total_bytes))

    def describe(self) -> str:
        if self.memory is not None:
            what = f"{format_bytes(self.memory)} of a GPU"
        elif self.gpus is not None:
            what = f"{self.gpus} whole GPU" + ("s" if self.gpus > 1 else "")
        else:
            what = f"{self.fraction:g} GPU"
        return what if self.workers == 1 else f"{self.workers} x {what}"

    def gpu_equivalents(self, gpu_bytes: int | None = None) -> float:
        """How many GPUs this spec is worth (for quotas and accounting)."""
        if self.gpus is not None:
            per = float(self.gpus)
        elif self.fraction is not None:
            per = float(self.fraction)
        else:
            per = float(self.memory) / float(gpu_bytes) if gpu_bytes else 1.0
        return per * self.workers


_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}{next(_ids)}"


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
    state: str = "queued"          # queued | starting | granted | refused | cancelled | failed
    reason: str = ""
    error: str | None = None
    eta: float | None = None
    leases: list[str] = field(default_factory=list)
    restore: dict | None = None    # the offload of an earlier lease this request's session starts with
    restored: dict | None = None   # what the new session got back from it


@dataclass
class Allocation:
    gpu: str          # GpuSlot.id
    index: int        # GPU index on its worker
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
    priority: str = "interactive"
    notebook: str | None = None
    cell: str | None = None
    team: str | None = None
    rank: int = 0
    world_size: int = 1
    started: float = field(default_factory=time.time)
    state: str = "starting"        # starting | idle | running | ended
    isolation: str = "none"
    address: str | None = None     # the session process's comm address
    pid: int | None = None
    cell_started: float | None = None
    peak_bytes: int | None = None   # the largest cell peak so far (right-sizing, audit)
    gpu_utilization: float | None = None  # the last cell's mean SM utilization (real GPUs, NVML)
    resident_bytes: int | None = None     # what the session held when it last went idle (what suspending moves)
    preempted: bool = False         # ended to give its memory to a request owed by a guarantee
    offload: dict | None = None     # where its variables went when it was reclaimed (worker, path, names)
    ended: float | None = None
    end_reason: str | None = None

    @property
    def bytes(self) -> int:
        return sum(a.bytes for a in self.allocations)

    def public(self) -> dict:
        """The lease as the kernel, the CLI and the panel see it."""
        return {
            "id": self.id, "request": self.request, "user": self.user, "kernel": self.kernel,
            "worker": self.worker, "gpus": [a.gpu for a in self.allocations],
            "gpu_indices": [a.index for a in self.allocations], "bytes": self.bytes,
            "fraction": self.fraction, "priority": self.priority, "notebook": self.notebook, "cell": self.cell,
            "rank": self.rank, "world_size": self.world_size, "started": self.started, "state": self.state,
            "isolation": self.isolation, "address": self.address, "pid": self.pid,
            "cell_started": self.cell_started, "peak_bytes": self.peak_bytes, "end_reason": self.end_reason,
            "gpu_utilization": self.gpu_utilization, "resident_bytes": self.resident_bytes,
            "preempted": self.preempted,
            "offload": ({k: v for k, v in self.offload.items() if k != "path"} if self.offload else None),
            "team": self.team,
        }
