"""A session becomes its user: the user's account, and a private view of /tmp and /dev/shm.

Why: every user's cells run on the same machines, and a session that ran as the worker's account
could read or change every other session (``/proc/<pid>/mem``, ``environ``, signals) and everything
the worker can. When the pool checks tokens and its worker runs as root, a session therefore takes
its user's uid, gid, supplementary groups, home and a 077 umask before it runs a cell, exactly as a
login would; the kernel checks that its user may hold the lease, the worker looked the account up.

It also gets a mount namespace of its own with fresh ``/tmp`` and ``/dev/shm`` (tmpfs): names there
are private to the session, so nobody can plant a file another user's code would trust, and what the
session leaves there goes with it. Its own host-memory folder (offloads and standby copies, created
by the worker, owned by the user) stays reachable at the same path.

This runs in the session's main thread while it is still root: the mount namespace belongs to that
thread (Linux keeps it per task), and cells run in that thread and whatever it starts; the uid
change applies to the whole process.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
PR_SET_DUMPABLE = 4

KEPT_ENV = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "CONDA_PREFIX",
        "JUPYTER_GPU_VIRTUAL_GPUS",
        "MPLBACKEND",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "JUPYTER_GPU_SESSION_LOG",
    }
)


class AccountError(RuntimeError):
    """The session could not become its user; the message says why."""


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise AccountError(f"{what}: {os.strerror(err)}")


def private_mounts(keep: str | None) -> None:
    """A mount namespace for this thread with empty ``/tmp`` and ``/dev/shm``; ``keep`` (a folder
    under ``/dev/shm``) is bound back at its path."""
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    fd = os.open(keep, os.O_PATH | os.O_DIRECTORY) if keep else None
    try:
        for target in ("/dev/shm", "/tmp"):
            if os.path.isdir(target):
                _check(
                    libc.mount(
                        b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=1777"
                    ),
                    f"mount tmpfs on {target}",
                )
        if keep and fd is not None:
            os.makedirs(keep, exist_ok=True)
            _check(
                libc.mount(f"/proc/self/fd/{fd}".encode(), keep.encode(), None, MS_BIND, None),
                f"bind {keep}",
            )
    finally:
        if fd is not None:
            os.close(fd)


def become(account: dict) -> None:
    """Take the account's groups, gid and uid (in that order: after setuid nothing else may change),
    its home and name in the environment, and a umask that keeps new files private."""
    uid, gid = int(account["uid"]), int(account["gid"])
    groups = [int(g) for g in account.get("groups") or [gid]]
    try:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise AccountError(
            f"could not become user {account['user']!r} (uid {uid}): {exc}"
        ) from None
    if os.getuid() != uid or os.geteuid() != uid:
        raise AccountError(f"still uid {os.geteuid()} after setuid({uid})")
    os.umask(0o077)
    # setuid from root leaves the process undumpable, which also closes its /proc/<pid>/fd to its own user:
    # the owner's kernel (same account, same machine) reads large results from there
    # (local_transfer.py)
    _libc().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    home = account.get("home") or "/"
    # the worker's environment is not the user's: only what a login would give, and what cells rely
    # on (the GPU pinning and the pool's user-facing settings are set after this)
    keep = {
        k: v
        for k, v in os.environ.items()
        if k in KEPT_ENV or k.startswith(("LC_", "CUDA_", "NVIDIA_"))
    }
    os.environ.clear()
    os.environ.update(keep)
    os.environ.update({"HOME": home, "USER": account["user"], "LOGNAME": account["user"]})
    try:
        os.chdir(home)
    except OSError:
        os.chdir("/")
    log.info("session %d runs as %s (uid %d)", os.getpid(), account["user"], uid)
