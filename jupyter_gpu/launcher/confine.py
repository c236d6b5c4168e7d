"""What a session process becomes before it runs anything: done as root, in the single-threaded
child, in this order.

1. Every inherited descriptor is closed but the three the worker handed over (its private socket,
   the pipe on which it announces its address, the pipe its log goes to, as fds 1 and 2); stdin is
   ``/dev/null``. A session keeps nothing of the launcher's, the zygote's or another session's.
2. It joins its cgroup (memory and pids limits: ``cgroups.py``), so everything it starts is counted
   and killed with it.
3. A mount namespace of its own, with fresh ``/tmp`` and ``/dev/shm`` (tmpfs), and its own
   host-memory folder bound back at its path: names there are private to the session. Done while
   the process has one thread, so every thread it ever has lives in it (Linux keeps the namespace
   per task: entering it after the session's threads existed left 7 of 8 in the host's).
4. Resource limits: no core dumps, ``RLIMIT_NPROC`` as a backstop to the cgroup's ``pids.max``.
5. The user's groups, gid and uid (in that order; after ``setuid`` nothing else may change), checked,
   then ``PR_SET_DUMPABLE`` (the owner's kernel reads large results from the session's pipes:
   ``common/local_transfer.py``), umask 077, the environment a login gives plus what the session
   is configured with (no ``LD_*``, nothing of the worker's), and the home folder as working
   folder.

Nothing here is undone: the process is the user's from then on. A failure raises ``ConfinementError``
and the child exits without running the session.
"""

from __future__ import annotations

import ctypes
import os
import resource
from typing import Any, TypedDict

from jupyter_gpu.common.fds import keep_only

CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
PR_SET_DUMPABLE = 4

# what a session's environment may carry of what its worker asks for (its Dask settings: the
# worker's TLS, the pool's session settings), beside what a login gives
ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "DASK_", "JUPYTER_GPU_", "OMP_", "MKL_")
ENV_NAMES = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "MPLBACKEND", "PYTHONPATH"})
ENV_REFUSED = ("JUPYTER_GPU_LAUNCHER",)


class Account(TypedDict):
    user: str
    uid: int
    gid: int
    groups: list[int]
    home: str


class Confinement(TypedDict):
    """What the launcher decided for one session (all of it checked already)."""

    account: Account
    cgroup_procs: list[str]  # the cgroup.procs files of its group(s)
    folder: str | None  # its host-memory folder (under /dev/shm), bound back in its namespace
    nproc: int  # RLIMIT_NPROC
    env: dict[str, str]


class ConfinementError(RuntimeError):
    """The session could not be set up; the message says which step failed."""


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        raise ConfinementError(f"{what}: {os.strerror(ctypes.get_errno())}")


def join_cgroup(procs_files: list[str]) -> None:
    for path in procs_files:
        try:
            with open(path, "w") as f:
                f.write("0")  # this process
        except OSError as exc:
            raise ConfinementError(f"joining the session's cgroup ({path}): {exc}") from None


def private_mounts(folder: str | None) -> None:
    """A mount namespace with empty ``/tmp`` and ``/dev/shm``; ``folder`` (under ``/dev/shm``)
    bound back at its path."""
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW) if folder else None
    try:
        for target in ("/dev/shm", "/tmp"):
            if os.path.isdir(target):
                _check(
                    libc.mount(
                        b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=1777"
                    ),
                    f"mount tmpfs on {target}",
                )
        if folder is not None and fd is not None:
            os.makedirs(folder, mode=0o700, exist_ok=True)  # in the fresh tmpfs, as root
            _check(
                libc.mount(f"/proc/self/fd/{fd}".encode(), folder.encode(), None, MS_BIND, None),
                f"bind {folder}",
            )
    finally:
        if fd is not None:
            os.close(fd)


def become(account: Account) -> None:
    uid, gid = int(account["uid"]), int(account["gid"])
    if uid == 0 or gid == 0:
        raise ConfinementError("a session never runs as root")
    os.setgroups([int(g) for g in account["groups"] if int(g) != 0] or [gid])
    os.setgid(gid)
    os.setuid(uid)
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (uid, uid, gid, gid):
        raise ConfinementError(f"still uid {os.geteuid()} after setuid({uid})")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise ConfinementError("could take root back after dropping it")
    os.umask(0o077)
    _check(_libc().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def session_environment(asked: dict[str, str], account: Account) -> dict[str, str]:
    """A login's environment for ``account`` and what the worker may set of ``asked``."""
    env = {
        k: v
        for k, v in asked.items()
        if (k in ENV_NAMES or k.startswith(ENV_PREFIXES)) and not k.startswith(ENV_REFUSED)
    }
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(
        HOME=account["home"] or "/",
        USER=account["user"],
        LOGNAME=account["user"],
        SHELL=env.get("SHELL", "/bin/sh"),
    )
    return env


def confine(spec: Confinement, fds: list[int]) -> list[int]:
    """Steps 1 to 5 of the module docstring, in the current (single-threaded) process; returns
    where the kept descriptors are (all but the log pipe)."""
    kept = keep_only(fds)
    join_cgroup(spec["cgroup_procs"])
    private_mounts(spec["folder"])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (spec["nproc"], spec["nproc"]))
    account = spec["account"]
    env = session_environment(spec["env"], account)
    become(account)
    os.environ.clear()
    os.environ.update(env)
    try:
        os.chdir(env["HOME"])
    except OSError:
        os.chdir("/")
    return kept
