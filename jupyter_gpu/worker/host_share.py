"""What a GPU worker leaves to sessions of its machine's host memory and CPU cores.

Why the worker says it: the broker books each lease's host memory and cores on its worker
(``broker/hosts.py``) and places a lease only where they fit, so that the sessions of one machine
can never together take more than the machine has. Only the machine knows what it has; the
machine is what this worker may use of it (its memory and cores, capped by its control
groups' limits, such as a container's or a Slurm job's); the administrator keeps part of it for the system (``jupyter-gpu.worker.reserved-memory``, a size or a
share of the machine, and ``reserved-cpus``, cores): the rest is left to sessions, shared among the
machine's GPU workers in proportion to their GPUs (``jupyter-gpu worker`` runs one per GPU).

What the broker books is enforced on the session itself (its cgroup's ``memory.max`` and
``cpu.max``: ``launcher/cgroups.py``), so a report here is a bound, not a hope.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import psutil

from jupyter_gpu.common import config
from jupyter_gpu.launcher.cgroups import host_memory_limit, own_limits

log = logging.getLogger(__name__)


class HostShare(NamedTuple):
    """One worker's part of its machine for sessions (None: not reported, unbounded)."""

    memory: int | None  # bytes
    cpus: float | None  # cores


def machine_cpus() -> int:
    """The cores this process may run on (its affinity: a container's or a job's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine() -> tuple[int, float]:
    """(bytes, cores) of the machine as this worker may use it: the machine's memory and the
    cores of its affinity, each capped by its control groups' limits (a container's, a Slurm
    job's: ``own_limits``)."""
    total, cpus = psutil.virtual_memory().total, float(machine_cpus())
    limit_memory, limit_cpus = own_limits()
    if limit_memory is not None and limit_memory < total:
        total = limit_memory
    if limit_cpus is not None and limit_cpus < cpus:
        cpus = limit_cpus
    return total, cpus


def reserved(total_memory: int, cpus: float) -> tuple[int, float]:
    """(bytes, cores) the administrator keeps for the system: ``worker.reserved-memory`` (a size
    such as 4GiB or a share such as 10%) and ``worker.reserved-cpus``. A value that cannot be
    read raises ValueError naming the setting and the fix (the worker refuses to start on a typo
    rather than give sessions the memory the system needs)."""
    setting = config.get("worker.reserved-memory")
    try:
        memory = host_memory_limit(setting, total_memory) or 0
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"jupyter-gpu.worker.reserved-memory is {setting!r} ({exc}): write the host memory "
            "kept for the system as a size (4GiB), a share of the machine (10%) or 0"
        ) from None
    value = config.get("worker.reserved-cpus") or 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < cpus:
        raise ValueError(
            f"jupyter-gpu.worker.reserved-cpus is {value!r}: write the CPU cores kept for the "
            f"system as a number from 0 to below this machine's {cpus:g} cores (e.g. 0.5)"
        )
    return memory, float(value)


def left_to_sessions(my_gpus: int, machine_gpus: int) -> HostShare:
    """This worker's part (``my_gpus`` of the machine's ``machine_gpus``) of what its machine
    leaves to sessions. Cores are rounded down to thousandths, so the parts of one machine never
    add up to more than it has."""
    total, cpus = machine()
    kept_memory, kept_cpus = reserved(total, cpus)
    share = my_gpus / max(1, machine_gpus, my_gpus)
    memory = max(0, int((total - kept_memory) * share))
    cores = max(0.0, int((cpus - kept_cpus) * share * 1000) / 1000)
    return HostShare(memory, cores)
