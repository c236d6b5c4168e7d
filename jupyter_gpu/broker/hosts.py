"""Host memory and CPU cores: what each machine leaves to sessions, and what a session needs there.

Why the broker books them: every session on a GPU machine shares that machine's memory and cores,
and nothing else bounds their sum, so one notebook could take a whole machine down (issue 24). The
broker books each lease's host memory and cores on its machine when it grants it: a lease is placed
only where GPU memory, host memory and cores all fit, and the sum on a machine never exceeds what the
administrator leaves to sessions there.

A machine is one worker (``HostSlot.worker``): its GPU plugin reports the memory and cores it leaves
to sessions (``Ledger.set_host``). A worker that reports nothing is unbounded, as before: its
leases book what they need and nothing is refused for lack of host memory or cores there.

What a session needs (``host_need``): what its cell asked for (``--host-memory``, ``--cpus``,
``RequestSpec.host_memory``/``cpus``), else the pool's default (``SessionDefaults``), by default its
machine's part for the GPU share it holds: a quarter of a GPU on a machine with 4 GPUs and 256 GiB
for sessions gets 16 GiB. Defaults in proportion to the GPU share can never exhaust a machine's
memory or cores before its GPUs, so only requests that ask for more than their share make host
resources the limit.

Cores are booked in thousandths (``CPU_MILLI``) so that sums of fractional cores stay exact.

Idle sessions' variables parked in host memory (``/dev/shm``, ``worker/host_copies.py``) use the
same RAM, so they are booked on their machine too (``HostSlot.parked``), oldest first: a copy is
booked while it fits beside the leases, and the oldest copies are spilled to the pool's disk folder
when a new lease (or a newer copy) needs the memory. Placement counts parked memory as free (a copy
never keeps a session from starting: it moves to disk), and the sum of leases and parked copies on a
machine never exceeds what it leaves to sessions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from jupyter_gpu.common.protocol import RequestSpec
from jupyter_gpu.common.units import format_bytes

CPU_MILLI = 1000  # bookkeeping unit: a thousandth of a core


def cpu_milli(cpus: float) -> int:
    """Cores as thousandths, rounded up (a request never gets less than it asked for)."""
    return int(math.ceil(cpus * CPU_MILLI - 1e-9))


def format_cpus(milli: float) -> str:
    return f"{milli / CPU_MILLI:g} CPU core" + ("" if milli == CPU_MILLI else "s")


@dataclass
class HostSlot:
    """One machine (a worker) as the broker sees it: what it leaves to sessions (None: not
    reported, unbounded), how many GPUs it has, and what its live leases hold."""

    worker: str
    memory: int | None = None  # bytes left to sessions
    cpu_milli: int | None = None  # thousandths of a core left to sessions
    gpu_count: int = 0
    leased_memory: int = 0
    leased_cpu_milli: int = 0
    leases: set[str] = field(default_factory=set)
    # ended leases whose variables are parked in this machine's memory -> their bytes, oldest first
    parked: dict[str, int] = field(default_factory=dict)
    parked_memory: int = 0

    def park(self, lease: str, nbytes: int) -> None:
        self.parked[lease] = nbytes
        self.parked_memory += nbytes

    def unpark(self, lease: str) -> bool:
        """Stop booking ``lease``'s copy here; False if it was not booked here."""
        nbytes = self.parked.pop(lease, None)
        if nbytes is None:
            return False
        self.parked_memory -= nbytes
        return True

    def overbooked(self) -> int:
        """Bytes by which leases and parked copies together exceed what the machine leaves to
        sessions (0: they fit)."""
        if self.memory is None:
            return 0
        return max(0, self.leased_memory + self.parked_memory - self.memory)

    def to_spill(self, room: int = 0) -> list[str]:
        """The parked copies, oldest first, to move to disk so that leases, the remaining copies
        and ``room`` more bytes fit."""
        if self.memory is None:
            return []
        excess = self.leased_memory + self.parked_memory + room - self.memory
        spill: list[str] = []
        for lease, nbytes in self.parked.items():
            if excess <= 0:
                break
            spill.append(lease)
            excess -= nbytes
        return spill

    @property
    def bounded(self) -> bool:
        return self.memory is not None or self.cpu_milli is not None

    @property
    def free_memory(self) -> float:
        return math.inf if self.memory is None else self.memory - self.leased_memory

    @property
    def free_cpu_milli(self) -> float:
        return math.inf if self.cpu_milli is None else self.cpu_milli - self.leased_cpu_milli

    def fits(self, memory: int, milli: int) -> bool:
        return memory <= self.free_memory and milli <= self.free_cpu_milli

    def lacks(self, memory: int, milli: int) -> str | None:
        """What the machine lacks for ``memory`` bytes and ``milli`` thousandths of a core (None:
        nothing)."""
        if memory > self.free_memory:
            return (
                f"its machine has {format_bytes(self.free_memory)} of host memory free for "
                f"sessions, not {format_bytes(memory)}"
            )
        if milli > self.free_cpu_milli:
            return (
                f"its machine has {format_cpus(self.free_cpu_milli)} free for sessions, not "
                f"{format_cpus(milli)}"
            )
        return None


@dataclass(frozen=True)
class SessionDefaults:
    """What a session that does not say gets, per GPU it holds (a fraction of a GPU gets that
    share): a fixed amount, or None for its machine's part for one GPU (what the machine leaves to
    sessions divided by its GPUs); never less than ``min_host_memory``."""

    host_memory_per_gpu: int | None = None
    cpus_per_gpu: float | None = None
    # the least host memory a session that does not ask books (a Python process with its
    # libraries needs some whatever its GPU share: a 1/256 share of a machine is a few MiB)
    min_host_memory: int = 0

    def describe(self) -> str:
        mem = (
            "its machine's memory for sessions / its GPUs"
            if self.host_memory_per_gpu is None
            else format_bytes(self.host_memory_per_gpu)
        )
        cpus = (
            "its machine's cores for sessions / its GPUs"
            if self.cpus_per_gpu is None
            else f"{self.cpus_per_gpu:g} cores"
        )
        return f"per GPU held: host memory {mem}, CPU {cpus}"


def host_need(
    spec: RequestSpec,
    parts: Iterable[tuple[int, int]],
    host: HostSlot | None,
    defaults: SessionDefaults,
) -> tuple[int, int]:
    """(bytes, thousandths of a core) that one session of ``spec`` books on ``host`` when it holds
    ``parts`` there: (bytes leased, the GPU's total bytes) per GPU. Defaults round down, so that
    the shares of a machine's GPUs never add up to more than the machine."""
    parts = list(parts)
    gpus = max(1, host.gpu_count) if host is not None else 1
    if spec.host_memory is not None:
        memory = int(spec.host_memory)
    elif defaults.host_memory_per_gpu is not None:
        memory = sum(b * defaults.host_memory_per_gpu // t for b, t in parts)
    elif host is not None and host.memory is not None:
        memory = sum(b * host.memory // (t * gpus) for b, t in parts)
    else:
        memory = 0
    if spec.host_memory is None and memory and defaults.min_host_memory > memory:
        # the floor, but never more than the machine leaves to sessions (it must still fit)
        room = host.memory if host is not None and host.memory is not None else None
        memory = (
            defaults.min_host_memory
            if room is None
            else max(memory, min(room, defaults.min_host_memory))
        )
    if spec.cpus is not None:
        milli = cpu_milli(spec.cpus)
    elif defaults.cpus_per_gpu is not None:
        per_gpu = cpu_milli(defaults.cpus_per_gpu)
        milli = sum(b * per_gpu // t for b, t in parts)
    elif host is not None and host.cpu_milli is not None:
        milli = sum(b * host.cpu_milli // (t * gpus) for b, t in parts)
    else:
        milli = 0
    return memory, milli
