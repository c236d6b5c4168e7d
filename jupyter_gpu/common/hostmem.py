"""Host memory that a worker and its sessions share: the folder where idle sessions' variables wait.

Why a module of its own: the worker owns the folder (it creates it, hands paths out, fetches and
deletes files in it) and the session writes into it (offloads, standby copies); both sides must
agree on where it is and how files in it are removed, without the session importing worker code.

The folder is ``jupyter-gpu-<worker pid>-<random>`` in ``/dev/shm`` (host memory) where the machine
has one: created fresh with ``mkdtemp`` (so mode 0700, owned by the worker, and never a folder
someone else made first under a name they could predict), and removed with the worker. A worker
killed without its teardown leaves its folder behind; the next worker on the machine removes folders
whose worker is gone (``sweep_stale``), so host memory does not fill with copies nobody can restore.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
import tempfile
import threading

from jupyter_gpu.common.processes import pid_alive

PREFIX = "jupyter-gpu-"


def host_memory_base() -> str:
    """``/dev/shm`` when the machine has a writable one (host memory), else the temporary folder."""
    return (
        "/dev/shm"
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        else tempfile.gettempdir()
    )


def spill_base() -> str:
    """The pool's disk folder where parked copies go when host memory is short
    (``jupyter-gpu.worker.spill-dir``; default ``/var/tmp``: on disk, unlike ``/tmp`` on many
    machines)."""
    from jupyter_gpu.common import config

    return str(config.get("worker.spill-dir") or "/var/tmp")


def spill_dir(tag: str | None = None) -> str:
    """A new private folder (0700, ``mkdtemp``) on disk for copies spilled out of host memory;
    named like the host-memory folders so that ``sweep_stale(spill_base())`` removes a dead
    worker's."""
    prefix = f"{PREFIX}{os.getpid()}-spill-" + (f"{tag}-" if tag else "")
    os.makedirs(spill_base(), exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=spill_base())


def copy_fd(source: int, target: int) -> int:
    """Copy everything from descriptor ``source`` (at its start) to ``target``; returns the bytes
    copied. ``copy_file_range`` in the kernel where it can, else through a buffer."""
    copied = 0
    try:
        while True:
            n = os.copy_file_range(source, target, 1 << 30)
            if n == 0:
                return copied
            copied += n
    except OSError:
        if copied:
            raise
    os.lseek(source, 0, os.SEEK_SET)
    while chunk := os.read(source, 1 << 22):
        os.write(target, chunk)
        copied += len(chunk)
    return copied


def offload_dir(tag: str | None = None) -> str:
    """A new private folder in host memory for a worker's offloaded namespaces (``tag``: what it is
    for)."""
    prefix = f"{PREFIX}{os.getpid()}-" + (f"{tag}-" if tag else "")
    return tempfile.mkdtemp(prefix=prefix, dir=host_memory_base())


def sweep_stale(base: str | None = None) -> list[str]:
    """Remove the host-memory folders of workers that are gone (their pid no longer runs) and that
    this account owns; returns what was removed."""
    base = base or host_memory_base()
    removed: list[str] = []
    if not os.path.isdir(base):  # a spill folder not made yet
        return removed
    for entry in os.scandir(base):
        if not entry.name.startswith(PREFIX):
            continue
        head = entry.name[len(PREFIX) :].split("-", 1)[0]
        if not head.isdigit() or int(head) == os.getpid():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or pid_alive(int(head)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def discard(path: str) -> None:
    """Remove a file of host memory (an offload, a standby copy, a partial write) that may already
    be gone."""
    try:
        os.unlink(path)
    except OSError:
        pass


_doomed = itertools.count()


def discard_soon(path: str) -> None:
    """Remove a file of host memory without waiting for its memory to be freed: it is renamed out
    of the way at once (its name is free for the next file) and unlinked on a thread.

        Why: unlinking a file in ``/dev/shm`` frees its pages then and there, some 0.1-0.2 s per
        GiB; a cell that arrives while its session's standby copy is being written, or just after
        (the copy is then of the namespace before the cell), must not wait for that."""
    doomed = f"{path}.discard-{os.getpid()}-{next(_doomed)}"
    try:
        os.rename(path, doomed)
    except OSError:
        return  # gone already
    threading.Thread(
        target=discard, args=(doomed,), name="jupyter-gpu-discard", daemon=True
    ).start()
