"""The worker's store of sessions' variables in host memory: one folder per session.

Layout: one folder per session (``<lease>``), where the session writes its standby copy
(``standby``) and, when it is moved off its GPU, its offload (``offload.pkl``). A restore hands the
file to the next session of the same kernel: moved (never copied) into its folder, or, from another
machine, written into it.

When host memory is short the broker has a parked copy spilled (``spill``): moved to a disk folder
of the pool's (``common/hostmem.py``'s ``spill_dir``), from where a restore (``move``, ``read``)
takes it transparently, back into the next session's folder in host memory.

Two stores, one interface, named by lease (never by a path someone gave):

- :class:`HostStore`: sessions that run as the worker's own account (users not isolated). The
  folders are in the worker's private folder in ``/dev/shm`` (``common/hostmem.py``); a file is
  opened with ``O_NOFOLLOW`` and checked on its descriptor (a plain file of this account that
  nobody else may read or write) before it is trusted.
- :class:`LaunchedStore`: sessions that run as their users. Their folders belong to them and to the
  launcher (``launcher/hostfiles.py``), which moves, opens and creates the files on descriptors; the
  worker only holds paths to hand to sessions, and descriptors the launcher hands it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from typing import TYPE_CHECKING

from jupyter_gpu.common.hostmem import copy_fd, offload_dir, spill_dir

if TYPE_CHECKING:
    from jupyter_gpu.worker.launcher_link import LauncherLink

OFFLOAD = "offload.pkl"
STANDBY = "standby"


class UnsafeFile(PermissionError):
    """A file in the store is not what it must be (owner, mode, type): it is not used."""


def _read_fd(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _write_fd(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class HostStore:
    """Folders of sessions that run as this worker's account (see the module docstring)."""

    def __init__(self) -> None:
        self._base: str | None = None
        self._spill_base: str | None = None
        self.spilled: set[str] = set()  # leases whose copy is on disk

    @property
    def spill_base(self) -> str:
        if self._spill_base is None:
            self._spill_base = spill_dir()
        return self._spill_base

    def spill_path(self, lease: str) -> str:
        return os.path.join(self.spill_base, f"{lease}.pkl")

    @property
    def base(self) -> str:
        if self._base is None:
            self._base = offload_dir()
        return self._base

    def folder(self, lease: str) -> str:
        """The session's folder (made if missing)."""
        path = os.path.join(self.base, lease)
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        return path

    def offload_path(self, lease: str) -> str:
        return os.path.join(self.base, lease, OFFLOAD)

    def standby_path(self, lease: str) -> str:
        return os.path.join(self.base, lease, STANDBY)

    def _open_copy(self, lease: str) -> int:
        """A descriptor on ``lease``'s copy (in memory, or on disk if spilled), checked on the
        descriptor itself (no check-then-open race)."""
        path = self.spill_path(lease) if lease in self.spilled else self.offload_path(lease)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            os.close(fd)
            raise UnsafeFile(f"the copy of {lease} is not a private plain file of this account")
        os.set_blocking(fd, True)
        return fd

    async def move(self, old: str, new: str) -> str:
        """Move ``old``'s copy into ``new``'s folder; returns its new path."""
        fd = self._open_copy(old)
        target = os.path.join(self.folder(new), OFFLOAD)
        if old not in self.spilled:
            os.close(fd)
            os.replace(self.offload_path(old), target)
            return target
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            await asyncio.get_running_loop().run_in_executor(None, copy_fd, fd, out)
        finally:
            os.close(fd)
            os.close(out)
        self._unspill(old)
        return target

    async def spill(self, lease: str) -> int:
        """Move ``lease``'s parked copy from host memory to the disk folder; returns its bytes."""
        if lease in self.spilled:
            return 0
        fd = self._open_copy(lease)
        out = os.open(
            self.spill_path(lease), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
        )
        try:
            copied = await asyncio.get_running_loop().run_in_executor(None, copy_fd, fd, out)
        except BaseException:
            os.close(out)
            os.unlink(self.spill_path(lease))
            raise
        finally:
            os.close(fd)
        os.close(out)
        self.spilled.add(lease)
        os.unlink(self.offload_path(lease))
        return copied

    def _unspill(self, lease: str) -> None:
        if lease in self.spilled:
            self.spilled.discard(lease)
            try:
                os.unlink(self.spill_path(lease))
            except OSError:
                pass

    async def read(self, lease: str) -> bytes:
        fd = self._open_copy(lease)
        return await asyncio.get_running_loop().run_in_executor(None, _read_fd, fd)

    async def write(self, data: bytes, lease: str) -> str:
        """A copy fetched from another machine, written into ``lease``'s folder (0600)."""
        target = os.path.join(self.folder(lease), OFFLOAD)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        await asyncio.get_running_loop().run_in_executor(None, _write_fd, fd, data)
        return target

    def forget(self, lease: str) -> None:
        """Remove a session's folder and everything in it."""
        self._unspill(lease)
        if self._base is not None:
            shutil.rmtree(os.path.join(self._base, lease), ignore_errors=True)

    def close(self) -> None:
        for base in (self._base, self._spill_base):
            if base is not None:
                shutil.rmtree(base, ignore_errors=True)


class LaunchedStore(HostStore):
    """Folders of sessions the launcher started as their users (see the module docstring)."""

    def __init__(self, link: LauncherLink) -> None:
        super().__init__()
        self.link = link
        self.folders: dict[str, str] = {}  # lease -> its folder, as the launcher made it

    def register(self, lease: str, folder: str) -> None:
        self.folders[lease] = folder

    def folder(self, lease: str) -> str:
        return self.folders[lease]

    def offload_path(self, lease: str) -> str:
        return os.path.join(self.folders[lease], OFFLOAD)

    def standby_path(self, lease: str) -> str:
        return os.path.join(self.folders[lease], STANDBY)

    async def move(self, old: str, new: str) -> str:
        return await self.link.move_copy(old, new)

    async def spill(self, lease: str) -> int:
        """The launcher moves the copy to its disk folder, on descriptors
        (``launcher/hostfiles.py``)."""
        return await self.link.spill_copy(lease)

    async def read(self, lease: str) -> bytes:
        fd = await self.link.open_copy(lease)
        return await asyncio.get_running_loop().run_in_executor(None, _read_fd, fd)

    async def write(self, data: bytes, lease: str) -> str:
        fd, path = await self.link.create_copy(lease)
        await asyncio.get_running_loop().run_in_executor(None, _write_fd, fd, data)
        return path

    def forget(self, lease: str) -> None:
        """A parked copy nobody will restore: its folder goes (a live session's goes when the
        launcher ends it)."""
        if self.folders.pop(lease, None) is not None:
            self.link.spawn(self.link.forget_copy(lease))

    def close(self) -> None:
        self.folders.clear()  # the launcher removes them when this worker's connection closes
