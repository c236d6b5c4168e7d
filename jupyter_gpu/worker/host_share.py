"""What a GPU worker leaves to sessions of its machine's host memory and CPU cores.

Why the worker says it: the broker books each lease's host memory and cores on its worker
(``broker/hosts.py``) and places a lease only where they fit, so that the sessions of one machine
can never together take more than the machine has. Only the machine knows what it has: its memory
and cores, capped by the limits of the control groups the worker runs in (a container's, a Slurm
job's). The administrator keeps part of it for the system (``jupyter-gpu.worker.reserved-memory``,
a size or a share of the machine, and ``reserved-cpus``, cores): the rest is left to sessions,
shared among the machine's GPU workers in proportion to their GPUs (``jupyter-gpu worker`` runs one
per GPU).

What the broker books is enforced on the session itself (its cgroup's ``memory.max`` and
``cpu.max``: ``launcher/cgroups.py``), so a report here is a bound, not a hope.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import psutil

from jupyter_gpu.common import config
from jupyter_gpu.launcher.cgroups import host_memory_limit, mounts

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


def _read_first(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _ancestors(mount: str, path: str) -> list[str]:
    """The folders of ``path``'s group and of every group above it, up to the mount's root.
    Where ``path`` is not under the mount as seen here (a container that sees only its own
    subtree, without a cgroup namespace), the mount's root alone: that is the container's group."""
    folders = [mount]
    parts = [p for p in path.split("/") if p]
    for depth in range(1, len(parts) + 1):
        folder = os.path.join(mount, *parts[:depth])
        if not os.path.isdir(folder):
            break
        folders.append(folder)
    return folders


def own_limits(cgroup_file: str = "/proc/self/cgroup") -> tuple[int | None, float | None]:
    """(bytes, cores) the control groups this process runs in allow it, or None where nothing
    limits it: the smallest ``memory.max`` (v1: ``memory.limit_in_bytes``) and ``cpu.max`` quota
    (v1: ``cpu.cfs_quota_us``) along its groups' paths up to the root.

        Why: a worker inside a container or a Slurm job sees the whole machine in ``/proc/meminfo``
        and ``os.cpu_count()``, but may use only what its groups allow; reporting the machine
        would let the broker book sessions the job's limit then kills."""
    v2, v1 = mounts()
    memories: list[int] = []
    cores: list[float] = []
    try:
        with open(cgroup_file) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return None, None
    for _, controllers, path in lines:
        names = set(controllers.split(",")) if controllers else set()
        if not controllers and v2 is not None:  # the v2 line: "0::/path"
            for folder in _ancestors(v2, path):
                text = _read_first(os.path.join(folder, "memory.max"))
                if text and text != "max":
                    memories.append(int(text))
                quota = (_read_first(os.path.join(folder, "cpu.max")) or "max").split()
                if quota[0] != "max" and len(quota) == 2:
                    cores.append(int(quota[0]) / int(quota[1]))
        if "memory" in names and "memory" in v1:
            for folder in _ancestors(v1["memory"], path):
                text = _read_first(os.path.join(folder, "memory.limit_in_bytes"))
                if text and int(text) < 2**62:  # v1 writes "unlimited" as about 2**63
                    memories.append(int(text))
        if "cpu" in names and "cpu" in v1:
            for folder in _ancestors(v1["cpu"], path):
                quota_us = _read_first(os.path.join(folder, "cpu.cfs_quota_us"))
                period_us = _read_first(os.path.join(folder, "cpu.cfs_period_us"))
                if quota_us and period_us and int(quota_us) > 0:
                    cores.append(int(quota_us) / int(period_us))
    return min(memories, default=None), min(cores, default=None)


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
