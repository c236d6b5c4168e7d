"""Sessions' folders in host memory, handled as root without ever following a name a user controls.

Layout: ``/dev/shm/jupyter-gpu-<launcher pid>-<random>/`` (root, 0700, made with ``mkdtemp``) holds
one folder per session (``<lease>-<random>``), owned by the session's user, 0700; the session writes
its standby copy and its offload there (``offload.pkl``), and sees the folder at the same path in
its private ``/dev/shm``. The worker never opens these files; it asks the launcher, which works on
descriptors only (the ``*at`` calls relative to an open folder, ``O_NOFOLLOW``, owner and mode
checked with ``fstat`` on what it opened):

- ``move``: a parked copy into the next session's folder of the same user (``renameat`` between two
  folder descriptors, after checking the source is a plain file of that user that nobody else may
  read or write);
- ``open_for_reading``: a descriptor on a parked copy (checked the same way), which the worker reads
  to send it to the machine of the next session;
- ``create_for_writing``: a new file in a session's folder (``O_CREAT | O_EXCL | O_NOFOLLOW``, 0600,
  given to its user), whose descriptor the worker writes a copy from another machine into;
- ``spill``: a parked copy out of host memory into the launcher's disk folder
  (``<spill-dir>/jupyter-gpu-<pid>-spill-<random>/``, root, 0700, one ``<folder name>`` file per
  copy, still its user's, 0600), copied between descriptors and then unlinked in its folder; ``move``
  and ``open_for_reading`` take a spilled copy from there (back into host memory for a restore).
  Users cannot reach the disk folder at all: nothing there can be swapped.

The old way checked a path and then opened it again as root: a user who owned the folder swapped in
a symlink between the two and read another user's variables (or any file root can read).
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile

from jupyter_gpu.common.hostmem import copy_fd, host_memory_base, spill_dir

COPY = "offload.pkl"


class UnsafeCopy(PermissionError):
    """A copy (or a folder) is not what it must be; the message says what."""


class HostFolders:
    """The launcher's base folder and its sessions' folders (see the module docstring)."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(
            prefix=f"jupyter-gpu-{os.getpid()}-launcher-", dir=host_memory_base()
        )
        self._base_fd = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self.spill_base: str | None = None  # made at the first spill
        self._spill_fd: int | None = None
        self.spilled: set[str] = set()  # folders whose copy is in the disk folder

    def _spill_folder(self) -> int:
        if self._spill_fd is None:
            self.spill_base = spill_dir("launcher")
            self._spill_fd = os.open(self.spill_base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        return self._spill_fd

    def _open_spilled(self, name: str, uid: int) -> int:
        """A descriptor to read the spilled copy of folder ``name`` (checked like a copy)."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self._spill_folder())
        try:
            self._check_copy(os.fstat(fd), uid, f"the spilled copy of {name}")
        except UnsafeCopy:
            os.close(fd)
            raise
        return fd

    def _drop_spilled(self, name: str) -> None:
        if name in self.spilled and self._spill_fd is not None:
            self.spilled.discard(name)
            try:
                os.unlink(name, dir_fd=self._spill_fd)
            except OSError:
                pass

    def spill(self, name: str, uid: int) -> int:
        """Move the copy in folder ``name`` (``uid``'s) to the disk folder; returns its bytes."""
        if name in self.spilled:
            return 0
        source = self.open_for_reading(name, uid)
        spill = self._spill_folder()
        try:
            out = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=spill
            )
            try:
                os.fchown(out, uid, os.fstat(source).st_gid)
                copied = copy_fd(source, out)
            except BaseException:
                os.unlink(name, dir_fd=spill)
                raise
            finally:
                os.close(out)
        finally:
            os.close(source)
        self.spilled.add(name)
        folder = self._folder(name, uid)
        try:
            os.unlink(COPY, dir_fd=folder)
        finally:
            os.close(folder)
        return copied

    def make(self, lease: str, uid: int, gid: int) -> str:
        """A new folder for a session of ``uid``; returns its name (under ``base``)."""
        name = f"{lease}-{secrets.token_hex(4)}"
        os.mkdir(name, 0o700, dir_fd=self._base_fd)
        fd = self._folder(name)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        return name

    def path(self, name: str) -> str:
        return os.path.join(self.base, name)

    def _folder(self, name: str, uid: int | None = None) -> int:
        """An open descriptor on the folder ``name`` (checked: a folder of ``uid``, 0700)."""
        if "/" in name or name in ("", ".", ".."):
            raise UnsafeCopy(f"{name!r} is not a session folder's name")
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self._base_fd)
        st = os.fstat(fd)
        if uid is not None and (st.st_uid != uid or stat.S_IMODE(st.st_mode) & 0o077):
            os.close(fd)
            raise UnsafeCopy(f"the folder {name} is not a private folder of uid {uid}")
        return fd

    @staticmethod
    def _check_copy(st: os.stat_result, uid: int, what: str) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeCopy(f"{what} is not a plain file")
        if st.st_uid != uid:
            raise UnsafeCopy(f"{what} belongs to uid {st.st_uid}, not {uid}")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise UnsafeCopy(f"{what} can be read or written by others")

    def move(self, source: str, target: str, uid: int) -> str:
        """Move the copy in folder ``source`` into folder ``target`` (both ``uid``'s); returns its
        new path."""
        if source in self.spilled:  # from disk back into host memory
            spilled = self._open_spilled(source, uid)
            try:
                out, path = self.create_for_writing(target, uid, os.fstat(spilled).st_gid)
                try:
                    copy_fd(spilled, out)
                finally:
                    os.close(out)
            finally:
                os.close(spilled)
            self._drop_spilled(source)
            return path
        src, dst = self._folder(source, uid), self._folder(target, uid)
        try:
            st = os.stat(COPY, dir_fd=src, follow_symlinks=False)
            self._check_copy(st, uid, f"the copy in {source}")
            os.rename(COPY, COPY, src_dir_fd=src, dst_dir_fd=dst)
        finally:
            os.close(src)
            os.close(dst)
        return os.path.join(self.path(target), COPY)

    def open_for_reading(self, name: str, uid: int) -> int:
        """A descriptor to read the copy in folder ``name`` (a plain 0600 file of ``uid``)."""
        if name in self.spilled:
            return self._open_spilled(name, uid)
        folder = self._folder(name, uid)
        try:
            fd = os.open(COPY, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
        finally:
            os.close(folder)
        try:
            self._check_copy(os.fstat(fd), uid, f"the copy in {name}")
        except UnsafeCopy:
            os.close(fd)
            raise
        os.set_blocking(fd, True)
        return fd

    def create_for_writing(self, name: str, uid: int, gid: int) -> tuple[int, str]:
        """A new copy file in folder ``name`` (0600, ``uid``'s): its descriptor and its path."""
        folder = self._folder(name, uid)
        try:
            fd = os.open(
                COPY, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=folder
            )
        finally:
            os.close(folder)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
        return fd, os.path.join(self.path(name), COPY)

    def remove(self, name: str) -> None:
        """Remove a session's folder and what is in it (never following a link)."""
        self._drop_spilled(name)
        try:
            fd = self._folder(name)
        except UnsafeCopy:
            return
        except OSError:  # gone, or not a folder (a link): removed, never followed
            try:
                os.unlink(name, dir_fd=self._base_fd)
            except OSError:
                pass
            return
        try:
            _empty(fd)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=self._base_fd)
        except OSError:
            pass

    def close(self) -> None:
        for entry in os.listdir(self._base_fd):
            self.remove(entry)
        os.close(self._base_fd)
        try:
            os.rmdir(self.base)
        except OSError:
            pass
        if self._spill_fd is not None:
            _empty(self._spill_fd)
            os.close(self._spill_fd)
            try:
                os.rmdir(self.spill_base or "")
            except OSError:
                pass


def _empty(folder: int) -> None:
    """Remove everything in the open folder ``folder`` (links are removed, not followed)."""
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            try:
                sub = os.open(
                    entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder
                )
            except OSError:
                continue
            try:
                _empty(sub)
            finally:
                os.close(sub)
            try:
                os.rmdir(entry.name, dir_fd=folder)
            except OSError:
                pass
        else:
            try:
                os.unlink(entry.name, dir_fd=folder)
            except OSError:
                pass
