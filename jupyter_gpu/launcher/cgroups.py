"""Every process of a session in one control group: ended as a whole, and limited in host memory and
in how many processes it may start.

Why: a cell can start processes of its own (``subprocess.Popen(..., start_new_session=True)``, a
data loader's workers, a server), and killing the session's process must end them all; a cell that
allocates more host memory than the machine has must be stopped alone, not leave the host's OOM
killer to pick among everyone's processes; and a fork bomb must stop at the session's own limit,
not at the machine's. A cgroup does all three: ``cgroup.kill`` (or killing every pid it lists) ends
all its processes, ``memory.max`` makes the kernel kill inside the group only, ``pids.max`` refuses
the fork.

The launcher (root) makes one group per session under a folder of its own (``jupyter-gpu-<pid>``);
the session's process joins it before anything else runs (``confine.py``); what it starts inherits
it. A worker that does not run as root makes its groups here too where it may (a delegated
subtree). Machines differ: a pure cgroup v2 hierarchy gives everything; a hybrid one (v1
controllers next to a v2 hierarchy with none) gives v2 grouping plus the v1 memory and pids
controllers. Without either, sessions run in a process group of their own (killed as a whole, but a
process that leaves the group escapes) and host memory is capped with ``RLIMIT_DATA`` on virtual
GPUs only; ``kind`` says which, and the lease shows it.

Limits are a table (``LIMITS``: a v2 file, its controller, its v1 file if v1 has one): a new limit
is a row there and a value in ``Containment.group(limits=...)``. What a session gets is what the
broker booked for it on its machine (``session_limits``: ``memory.max``, ``memory.high`` below it
so that it slows before it is killed, ``cpu.max`` for its cores); the launcher takes those from the
broker's signed grant, never from the worker. A limit this machine has no controller for (v1 has
no ``memory.high``) is neither written nor claimed: ``SessionGroup.limits`` holds what was.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field

from jupyter_gpu.common.processes import pid_alive

log = logging.getLogger(__name__)

# v2 file -> (controller, the v1 file of that controller, or None where v1 has none)
LIMITS: dict[str, tuple[str, str | None]] = {
    "memory.max": ("memory", "memory.limit_in_bytes"),
    "pids.max": ("pids", "pids.max"),
    "memory.high": ("memory", None),
    "cpu.max": ("cpu", "cpu.cfs_quota_us"),  # microseconds of CPU per CPU_PERIOD
}
CONTROLLERS = ("memory", "pids", "cpu")  # enabled for every session's group
CPU_PERIOD = 100_000  # microseconds: cpu.max's period (v1's cpu.cfs_period_us default)
MIN_CPU_QUOTA = 1_000  # the kernel's smallest quota (1 ms per period)
HIGH_SHARE = 0.9  # memory.high: the kernel slows a session down there, before memory.max kills


def session_limits(
    host_memory: int, cpu_milli: int, cap: int | None, pids: int | None, min_cpu_milli: int = 0
) -> dict[str, int | None]:
    """The cgroup limits of a session the broker booked ``host_memory`` bytes and ``cpu_milli``
    thousandths of a core for on this machine (0: nothing booked, its machine reports no bound):
    ``memory.max`` is what it booked (never above ``cap``, ``session.host-memory-limit``),
    ``memory.high`` is ``HIGH_SHARE`` of it (the kernel reclaims and slows the session there, so
    it slows before it is killed), ``cpu.max`` its cores (as a quota per ``CPU_PERIOD``), never
    below ``min_cpu_milli`` (``session.min-cpus``: CPU time is not lost by sharing, unlike
    memory, and a session held below a core is slow at everything)."""
    memory = min((m for m in (host_memory or None, cap) if m), default=None)
    milli = max(cpu_milli, min_cpu_milli) if cpu_milli > 0 else 0
    quota = max(MIN_CPU_QUOTA, milli * CPU_PERIOD // 1000) if milli > 0 else None
    return {
        "memory.max": memory,
        "memory.high": int(memory * HIGH_SHARE) if memory else None,
        "cpu.max": quota,
        "pids.max": pids,
    }


@dataclass(frozen=True)
class MemoryUse:
    """What a session's group counted of its host memory: its peak (bytes; None: this kernel does
    not count it), its limit, how many of its processes the kernel's OOM killer killed (for any
    reason: a machine-wide OOM kill counts there too), and how often an allocation failed at its
    own limit (``memory.events``' ``oom``, v1's ``memory.failcnt``)."""

    peak: int | None
    limit: int | None
    oom_kills: int
    limit_hits: int = 0

    @property
    def over_its_limit(self) -> bool:
        """Killed by the OOM killer after reaching its own limit: its own over-use, not the
        machine's (whose OOM kills count in ``oom_kills`` too)."""
        return bool(self.oom_kills and self.limit_hits and self.limit)


def mounts() -> tuple[str | None, dict[str, str]]:
    """(the cgroup v2 mount, {v1 controller: its mount}) of this machine, from mountinfo."""
    v2: str | None = None
    v1: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.rstrip("\n").partition(" - ")
                fstype, _, options = (
                    right.split(" ", 2) if right.count(" ") >= 2 else (right, "", "")
                )
                mount = left.split()[4]
                if fstype == "cgroup2" and v2 is None:
                    v2 = mount
                elif fstype == "cgroup":
                    for controller in CONTROLLERS:
                        if controller in options.split(","):
                            v1.setdefault(controller, mount)
    except OSError:
        pass
    return v2, v1


@dataclass
class SessionGroup:
    """One session's control group(s); ``limits`` as written (bytes, counts)."""

    name: str
    paths: list[str] = field(default_factory=list)
    kill_file: str | None = None  # cgroup.kill (v2), when the kernel has it
    memory_events: str | None = None  # where OOM kills are counted
    limits: dict[str, int] = field(default_factory=dict)

    @property
    def memory_limit(self) -> int | None:
        return self.limits.get("memory.max")

    @property
    def procs_files(self) -> list[str]:
        """What a process writes ``0`` to, to join the group (``confine.join_cgroup``)."""
        return [os.path.join(path, "cgroup.procs") for path in self.paths]

    def add(self, pid: int) -> None:
        for path in self.procs_files:
            with open(path, "w") as f:
                f.write(str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.procs_files:
            try:
                with open(path) as f:
                    found.update(int(x) for x in f.read().split())
            except OSError:
                pass
        return found

    def kill(self, wait: float = 2.0) -> int:
        """End every process in the group; returns how many were there."""
        alive = self.pids()
        if self.kill_file is not None:
            try:
                with open(self.kill_file, "w") as f:
                    f.write("1")
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while True:
            left = self.pids()
            # also the fallback without cgroup.kill (a fork racing the kill is caught next round)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not left or time.monotonic() > deadline:
                return len(alive)
            time.sleep(0.02)

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of this group for going over its memory limit."""
        return self.memory_use().over_its_limit

    def memory_use(self) -> MemoryUse:
        """Its peak, limit and OOM kills, as the group's own files count them (read before the
        group is removed: what an over-use message says comes from here, nothing else)."""
        kills, hits, peak = 0, 0, None
        if self.memory_events is not None:
            folder = os.path.dirname(self.memory_events)
            try:
                with open(self.memory_events) as f:
                    for line in f:
                        key, _, value = line.partition(" ")
                        if key == "oom_kill":
                            kills = int(value)
                        elif key == "oom":  # v2: an allocation failed at memory.max
                            hits = int(value)
            except (OSError, ValueError):
                pass
            try:  # v1: how often usage hit memory.limit_in_bytes
                with open(os.path.join(folder, "memory.failcnt")) as f:
                    hits = hits or int(f.read())
            except (OSError, ValueError):
                pass
            for name in ("memory.peak", "memory.max_usage_in_bytes"):  # v2 (5.19+), v1
                try:
                    with open(os.path.join(folder, name)) as f:
                        peak = int(f.read().split()[0])
                    break
                except (OSError, ValueError, IndexError):
                    continue
        return MemoryUse(peak=peak, limit=self.memory_limit, oom_kills=kills, limit_hits=hits)

    def remove(self) -> None:
        for path in reversed(self.paths):
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # processes are still leaving
                    time.sleep(0.02)


class Containment:
    """Makes ``SessionGroup``s for one launcher or worker; ``kind`` names what this machine
    allows."""

    def __init__(self, tag: str | None = None):
        self.tag = tag or f"jupyter-gpu-{os.getpid()}"
        self.v2_base: str | None = None
        self.v2_controllers: set[str] = set()
        self.v1_bases: dict[str, str] = {}
        v2, v1 = mounts()
        if v2 is not None:
            self.v2_base = self._make(os.path.join(v2, self.tag))
            if self.v2_base is not None:
                self.v2_controllers = self._enable_v2(v2)
        for controller, mount in v1.items():
            if controller not in self.v2_controllers:
                base = self._make(os.path.join(mount, self.tag))
                if base is not None:
                    self.v1_bases[controller] = base
        self.kind = self._kind()
        log.info("session containment: %s", self.kind)

    def _kind(self) -> str:
        memory = "memory" in self.v2_controllers or "memory" in self.v1_bases
        if self.v2_base and "memory" in self.v2_controllers:
            return "cgroup v2"
        if self.v2_base and memory:
            return "cgroup v2 + v1 memory"
        if self.v2_base:
            return "cgroup v2 (no memory controller)"
        if "memory" in self.v1_bases:
            return "cgroup v1 memory"
        return "process group"

    @staticmethod
    def _make(path: str) -> str | None:
        try:
            os.makedirs(path, exist_ok=True)
            return path
        except OSError as exc:
            log.info("no cgroup at %s: %s", path, exc)
            return None

    def _enable_v2(self, mount: str) -> set[str]:
        """Turn the controllers on for our groups (pure v2, at the root of the hierarchy, as
        root); the ones that could be."""
        assert self.v2_base is not None  # called once our group is made
        try:
            with open(os.path.join(mount, "cgroup.controllers")) as f:
                available = set(f.read().split())
        except OSError:
            return set()
        enabled = set()
        for controller in CONTROLLERS:
            if controller not in available:
                continue
            try:
                for parent in (mount, self.v2_base):
                    with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                        f.write(f"+{controller}")
                enabled.add(controller)
            except OSError as exc:
                log.info("cgroup v2 controller %s not available: %s", controller, exc)
        return enabled

    def group(self, name: str, limits: dict[str, int | None]) -> SessionGroup | None:
        """A new group for one session with ``limits`` (``LIMITS``' files; None: none), or None
        when the machine gives none."""
        grp = SessionGroup(name=name)
        try:
            if self.v2_base is not None:
                path = os.path.join(self.v2_base, name)
                os.makedirs(path, exist_ok=True)
                grp.paths.append(path)
                if os.path.exists(os.path.join(path, "cgroup.kill")):
                    grp.kill_file = os.path.join(path, "cgroup.kill")
                if "memory" in self.v2_controllers:
                    grp.memory_events = os.path.join(path, "memory.events")
            for controller, base in self.v1_bases.items():
                path = os.path.join(base, name)
                os.makedirs(path, exist_ok=True)
                grp.paths.append(path)
                if controller == "memory":
                    grp.memory_events = os.path.join(path, "memory.oom_control")
            for limit, value in limits.items():
                if value is not None:
                    self._limit(grp, limit, value)
        except OSError as exc:
            log.warning(
                "could not make a cgroup for session %s (%s): its processes are not contained",
                name,
                exc,
            )
            grp.remove()
            return None
        return grp if grp.paths else None

    def _limit(self, grp: SessionGroup, limit: str, value: int) -> None:
        controller, v1_file = LIMITS[limit]
        if controller in self.v2_controllers and self.v2_base is not None:
            target = os.path.join(self.v2_base, grp.name, limit)
        elif controller in self.v1_bases and v1_file is not None:
            target = os.path.join(self.v1_bases[controller], grp.name, v1_file)
        else:
            return  # this machine has no such controller for us: not enforced, not claimed
        text = str(value)
        if limit == "cpu.max" and target.endswith("cpu.max"):  # v2: "quota period"
            text = f"{value} {CPU_PERIOD}"
        with open(target, "w") as f:
            f.write(text)
        grp.limits[limit] = value

    @staticmethod
    def sweep_stale() -> int:
        """Kill and remove the groups of launchers and workers that died without cleaning up
        (their pid is gone); returns how many folders were removed. Run at start."""
        removed = 0
        v2, v1 = mounts()
        for mount in {v2, *v1.values()}:
            if mount is None or not os.path.isdir(mount):
                continue
            for entry in os.scandir(mount):
                pid = _pid_of(entry.name)
                if pid is None or not entry.is_dir() or pid_alive(pid):
                    continue
                removed += _sweep_group_folder(entry.path)
        return removed

    def close(self) -> None:
        """Remove our folders (their groups must be gone: ``SessionGroup.remove``)."""
        for base in (self.v2_base, *self.v1_bases.values()):
            if base is not None:
                _sweep_group_folder(base)


def _sweep_group_folder(path: str) -> int:
    """End the groups in a folder and remove it (a dead one's at start, our own at close); 1 if
    this call removed it. Workers of a machine start together and sweep together: a folder another
    one removed first is not an error."""
    try:
        subs = [sub for sub in os.scandir(path) if sub.is_dir()]
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("could not sweep the cgroup folder %s: %s", path, exc)
        return 0
    for sub in subs:
        grp = SessionGroup(name=sub.name, paths=[sub.path])
        grp.kill(wait=0.5)
        grp.remove()
    try:
        os.rmdir(path)
        return 1
    except OSError:
        return 0


def _pid_of(name: str) -> int | None:
    """The pid in a folder name ``jupyter-gpu-<pid>`` (or ``jupyter-gpu-<pid>-<random>``)."""
    if not name.startswith("jupyter-gpu-"):
        return None
    head = name[len("jupyter-gpu-") :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def host_memory_limit(setting: object, total: int) -> int | None:
    """``session.host-memory-limit`` in bytes: a size (``16GiB``), a share of this machine
    (``50%``), or None."""
    from jupyter_gpu.common.units import parse_size

    if setting is None or setting is False:
        return None
    if isinstance(setting, str) and setting.strip().endswith("%"):
        share = float(setting.strip()[:-1]) / 100.0
        if not 0 < share <= 1:
            raise ValueError(f"a share of host memory must be in (0%, 100%], not {setting}")
        return int(total * share)
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return int(setting)
    return parse_size(str(setting))
