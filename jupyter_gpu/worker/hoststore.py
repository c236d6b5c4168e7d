"""The worker's store of sessions' variables in host memory: one folder per session, owned by its
user.

Layout: ``<base>/<lease>/`` per session (``base`` is the worker's private folder in ``/dev/shm``,
``common/hostmem.py``); the session writes its standby copy (``standby``) and, when it is moved off
its GPU, its offload (``offload.pkl``) there. When sessions run as their users, a session's folder
belongs to its user (0700) and its files are 0600: no other account can read or replace them, and
the session sees no other session's folder (its /dev/shm is private; ``session/account.py``).

A restore hands a file to the new session of the same kernel: moved (never copied) into the new
session's folder, and only if it is a plain file that belongs to that session's account and nobody
else may read or write, so that no session ever loads a file another account could have written.
"""

from __future__ import annotations

import os
import shutil
import stat

from jupyter_gpu.common.hostmem import offload_dir
from jupyter_gpu.common.protocol import Account

OFFLOAD = "offload.pkl"
STANDBY = "standby"


class UnsafeFile(PermissionError):
    """A file in the store is not what it must be (owner, mode, type): it is not used."""


class HostStore:
    """See the module docstring. Folders are made on first use."""

    def __init__(self) -> None:
        self._base: str | None = None

    @property
    def base(self) -> str:
        if self._base is None:
            self._base = offload_dir()
        return self._base

    @property
    def started(self) -> bool:
        return self._base is not None

    def folder(self, lease: str, account: Account | None = None) -> str:
        """The session's folder (made if missing), owned by its account when it has one."""
        path = os.path.join(self.base, lease)
        os.makedirs(path, mode=0o700, exist_ok=True)
        if account is not None:
            os.chown(path, account["uid"], account["gid"])
        os.chmod(path, 0o700)
        return path

    def offload_path(self, lease: str) -> str:
        return os.path.join(self.base, lease, OFFLOAD)

    def standby_path(self, lease: str) -> str:
        return os.path.join(self.base, lease, STANDBY)

    def owns(self, path: str) -> bool:
        """Whether ``path`` names a file of this store (no symlinks, no ``..``)."""
        if not self.started:
            return False
        real = os.path.realpath(path)
        return os.path.commonpath([real, self.base]) == self.base and real == os.path.abspath(path)

    def check(self, path: str, uid: int) -> None:
        """Raise ``UnsafeFile`` unless ``path`` is a regular file of ``uid`` that only its owner can
        access."""
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{path} is not a plain file")
        if st.st_uid != uid:
            raise UnsafeFile(f"{path} belongs to uid {st.st_uid}, not {uid}")
        if st.st_mode & 0o077:
            raise UnsafeFile(
                f"{path} can be read or written by others (mode {stat.S_IMODE(st.st_mode):o})"
            )

    def hand_over(self, path: str, lease: str, account: Account | None) -> str:
        """Move a parked offload into the new session's folder (checked first); returns its new
        path."""
        uid = account["uid"] if account is not None else os.geteuid()
        self.check(path, uid)
        target = os.path.join(self.folder(lease, account), OFFLOAD)
        os.replace(path, target)
        return target

    def receive(self, data: bytes, lease: str, account: Account | None) -> str:
        """Write an offload fetched from another machine into the new session's folder (0600, its
        owner)."""
        target = os.path.join(self.folder(lease, account), OFFLOAD)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if account is not None:
            os.chown(target, account["uid"], account["gid"])
        return target

    def forget(self, lease: str) -> None:
        """Remove a session's folder and everything in it."""
        if self.started:
            shutil.rmtree(os.path.join(self.base, lease), ignore_errors=True)

    def close(self) -> None:
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
