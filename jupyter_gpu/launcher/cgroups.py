"""Every process of a session in one control group: ended as a whole, and capped in host memory.

Why: a cell can start processes of its own (``subprocess.Popen(..., start_new_session=True)``, a
data loader's workers, a server), and killing the session's process must end them all; and a cell
that allocates more host memory than the machine has must be stopped alone, not leave the host's OOM
killer to pick among everyone's processes. A cgroup does both: ``cgroup.kill`` (or killing every pid
it lists) ends all its processes, and its memory limit makes the kernel kill inside the group only.

The worker creates one group per session under a folder of its own (``jupyter-gpu-<worker pid>``)
and moves the session's process into it when the session gets its lease; what the session starts
inherits the group. Machines differ: a pure cgroup v2 hierarchy gives both (``memory.max``,
``cgroup.kill``); a hybrid one (v1 memory controller next to an empty v2 hierarchy) gives the v1
memory limit plus v2 grouping. Creating groups needs root (or a delegated subtree). Without either,
sessions run in a process group of their own (killed as a whole, but a process that leaves the group
escapes) and host memory is capped with ``RLIMIT_DATA`` on virtual GPUs only (CUDA maps more than it
uses); ``kind`` says which, and the lease shows it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field

from jupyter_gpu.common.processes import pid_alive

log = logging.getLogger(__name__)


def _mounts() -> tuple[str | None, str | None]:
    """(the cgroup v2 mount, the cgroup v1 memory controller's mount) of this machine, from
    mountinfo."""
    v2 = v1_memory = None
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
                elif fstype == "cgroup" and "memory" in options.split(",") and v1_memory is None:
                    v1_memory = mount
    except OSError:
        pass
    return v2, v1_memory


def _own_group(hierarchy: str) -> str:
    """This process's group in a hierarchy: '' for v2, else the v1 controller's name."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == hierarchy:
                    return path
    except OSError:
        pass
    return "/"


@dataclass
class SessionGroup:
    """One session's control group(s); ``memory_limit`` in bytes (None: none)."""

    name: str
    paths: list[str] = field(default_factory=list)
    kill_file: str | None = None  # cgroup.kill (v2), when the kernel has it
    memory_events: str | None = None  # where OOM kills are counted
    memory_limit: int | None = None

    def add(self, pid: int) -> None:
        for path in self.paths:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.paths:
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    found.update(int(x) for x in f.read().split())
            except OSError:
                pass
        return found

    def kill(self, wait: float = 2.0) -> int:
        """End every process in the group; returns how many were still there."""
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
            # also the fallback when there is no cgroup.kill (a fork racing the kill is caught by
            # the next round)
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
        if self.memory_events is None:
            return False
        try:
            with open(self.memory_events) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
        except (OSError, ValueError):
            pass
        return False

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
    """Makes ``SessionGroup``s for one worker; ``kind`` names the mechanism this machine allows."""

    def __init__(self, tag: str | None = None):
        self.tag = tag or f"jupyter-gpu-{os.getpid()}"
        self.v2_base: str | None = None
        self.v2_memory = False
        self.v1_memory_base: str | None = None
        v2, v1_memory = _mounts()
        if v2 is not None:
            self.v2_base = self._make(os.path.join(v2, self.tag))
            if self.v2_base is not None:
                self.v2_memory = self._enable_v2_memory(v2)
        if v1_memory is not None and not self.v2_memory:
            self.v1_memory_base = self._make(os.path.join(v1_memory, self.tag))
        self.kind = self._kind()
        log.info("session containment: %s", self.kind)

    def _kind(self) -> str:
        if self.v2_base and self.v2_memory:
            return "cgroup v2"
        if self.v2_base and self.v1_memory_base:
            return "cgroup v2 + v1 memory"
        if self.v2_base:
            return "cgroup v2 (no memory controller)"
        if self.v1_memory_base:
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

    def _enable_v2_memory(self, mount: str) -> bool:
        """Turn the memory controller on for our groups (pure v2, at the root of the hierarchy, as
        root)."""
        assert self.v2_base is not None  # called once our group is made
        try:
            with open(os.path.join(mount, "cgroup.controllers")) as f:
                if "memory" not in f.read().split():
                    return False
            for parent in (mount, self.v2_base):
                with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory")
            return True
        except OSError as exc:
            log.info("cgroup v2 memory controller not available: %s", exc)
            return False

    def group(self, name: str, memory_limit: int | None) -> SessionGroup | None:
        """A new group for one session (None when the machine gives none)."""
        grp = SessionGroup(name=name, memory_limit=memory_limit)
        try:
            if self.v2_base is not None:
                path = os.path.join(self.v2_base, name)
                os.makedirs(path, exist_ok=True)
                grp.paths.append(path)
                if os.path.exists(os.path.join(path, "cgroup.kill")):
                    grp.kill_file = os.path.join(path, "cgroup.kill")
                if self.v2_memory and memory_limit:
                    with open(os.path.join(path, "memory.max"), "w") as f:
                        f.write(str(memory_limit))
                    grp.memory_events = os.path.join(path, "memory.events")
            if self.v1_memory_base is not None:
                path = os.path.join(self.v1_memory_base, name)
                os.makedirs(path, exist_ok=True)
                grp.paths.append(path)
                if memory_limit:
                    with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
                        f.write(str(memory_limit))
                    grp.memory_events = os.path.join(path, "memory.oom_control")
        except OSError as exc:
            log.warning(
                "could not make a cgroup for session %s (%s): its processes are not contained",
                name,
                exc,
            )
            grp.remove()
            return None
        return grp if grp.paths else None

    @staticmethod
    def sweep_stale() -> int:
        """Kill and remove the groups of workers that died without cleaning up (their pid is gone);
        returns how many folders were removed. Run at worker start."""
        removed = 0
        for mount in _mounts():
            if mount is None or not os.path.isdir(mount):
                continue
            for entry in os.scandir(mount):
                pid = _pid_of(entry.name)
                if pid is None or not entry.is_dir() or pid_alive(pid):
                    continue
                removed += _sweep_group_folder(entry.path)
        return removed

    def close(self) -> None:
        """Remove this worker's folders (their groups must be gone: ``SessionGroup.remove``)."""
        for base in (self.v2_base, self.v1_memory_base):
            if base is not None:
                _sweep_group_folder(base)


def _sweep_group_folder(path: str) -> int:
    """End the groups in a worker's folder and remove it (a dead worker's at start, our own at
    close); 1 if this call removed it. The workers of a machine start together and sweep together: a
    folder or group another one removed first is not an error (it used to fail the worker's start
    with FileNotFoundError, and the pool had no GPUs)."""
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
    """The worker pid in a folder name ``jupyter-gpu-<pid>`` (or ``jupyter-gpu-<pid>-<random>``)."""
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
