"""Large buffers between a kernel and its session on the same machine: one copy, straight into the
receiver.

Why: a 256 MiB array sent on the comm is copied several times (serialization frames, the socket both
ways, TLS in an embedded pool). When the kernel and its session run on the same machine under the
same account, the sender instead hands the pages of its buffer to pipes (``vmsplice``: the pipe
refers to the pages, it does not copy them) and the receiver reads them into fresh memory of its
own, several pipes in parallel. That is one copy, made by the receiver, at memory speed: as fast as
a ``memcpy`` of the same bytes on two cores or more. The receiver's copy is its own, so a cell that
changes its input never changes the kernel's object, exactly as on the comm.

The message carries only where the pipes are: ``/proc/<pid>/fd/<fd>`` of the sender, which only the
same account (and root) may open, nothing on disk. The sender waits until each pipe is empty (the
receiver has taken every byte) before it lets the buffer go, and closes its pipes when the call
ends; if the receiver never reads, the sender gives up after ``STALL`` seconds without progress.
Across machines or accounts the Dask frames go on the comm as before; each pair of processes proves
the way works first (``probe``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import select
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

MARK = "__jupyter_gpu_pipe__"
THRESHOLD = 1 << 20  # buffers smaller than this go on the comm (pipes cost more than they save)
PART = 16 << 20  # a frame larger than this is split over several pipes, read in parallel
STALL = 120.0  # seconds a sender waits for a receiver that reads nothing
PIPE_SIZE = 1 << 20  # the most an unprivileged process may ask (fs.pipe-max-size)
_PATH = re.compile(r"/proc/[0-9]{1,10}/fd/[0-9]{1,10}")  # the only place a marker may name
_F_SETPIPE_SZ = 1031
_FIONREAD = 0x541B
_SPLICE_F_NONBLOCK = 0x02


class TransferError(RuntimeError):
    """A buffer named by a marker could not be read; the message says why."""


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc: Any = None


def _vmsplice() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.vmsplice.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(_IoVec),
            ctypes.c_ulong,
            ctypes.c_uint,
        ]
        libc.vmsplice.restype = ctypes.c_ssize_t
        _libc = libc
    return _libc.vmsplice


def host_identity() -> str:
    """What two processes must share to reach each other's pipes: the same running kernel (boot id),
    the same network namespace (a test host made with ``ip netns`` is another machine) and pid
    namespace."""
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        for ns in ("net", "pid"):
            parts.append(str(os.stat(f"/proc/self/ns/{ns}").st_ino))
    except OSError:
        return ""
    return ":".join(parts)


def available() -> bool:
    try:
        _vmsplice()
    except (OSError, AttributeError):
        return False
    return bool(host_identity())


def _parallelism() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus))


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def _buffer_address(view: memoryview) -> int:
    """The address of a contiguous buffer, read-only ones too (``ctypes.from_buffer`` takes only
    writable ones). The caller keeps ``view`` alive while the address is used."""
    pybuf = _PyBuffer()
    get, release = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
    get.argtypes, get.restype = (
        [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int],
        ctypes.c_int,
    )
    release.argtypes, release.restype = [ctypes.POINTER(_PyBuffer)], None
    if get(view, ctypes.byref(pybuf), 0) != 0:  # PyBUF_SIMPLE: contiguous bytes
        raise TransferError("a frame whose memory cannot be addressed")
    try:
        return int(pybuf.buf or 0)
    finally:
        release(ctypes.byref(pybuf))


@dataclass
class Sending:
    """The pipes of one message and the threads that feed them; ``close`` ends them (never blocks
    long)."""

    frames: list[memoryview] = field(default_factory=list)  # kept alive until every pipe is drained
    pipes: list[tuple[int, int]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _closed: threading.Event = field(default_factory=threading.Event)

    def _feed(self, write_fd: int, address: int, length: int) -> None:
        """Hand ``length`` bytes at ``address`` to the pipe, then wait until the receiver has read
        them all: the pipe refers to the pages, so they must stay as they are until then."""
        vmsplice = _vmsplice()
        sent, last, left = 0, time.monotonic(), -1
        while not self._closed.is_set():
            if sent < length:
                iov = _IoVec(address + sent, length - sent)
                n = vmsplice(write_fd, ctypes.byref(iov), 1, _SPLICE_F_NONBLOCK)
                if n > 0:
                    sent, last = sent + n, time.monotonic()
                    continue
                err = ctypes.get_errno()
                if n < 0 and err not in (errno.EAGAIN, errno.EINTR):
                    self.errors.append(f"vmsplice: {os.strerror(err)}")
                    return
                select.select([], [write_fd], [], 0.05)  # until the receiver has made room
            else:
                pending = _pending(write_fd)
                if pending == 0:
                    return
                if pending != left:
                    left, last = pending, time.monotonic()
                time.sleep(0.0005)
            if time.monotonic() - last > STALL:
                self.errors.append(f"the receiver read nothing for {STALL:.0f} s")
                return

    def wait(self, timeout: float | None = None) -> None:
        """Until every pipe is empty: the receiver has its copy, the buffers may change or go."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self.threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self._closed.set()
        for t in self.threads:
            t.join(1.0)
        for r, w in self.pipes:
            for fd in (r, w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.pipes.clear()
        self.frames.clear()


def _pending(write_fd: int) -> int:
    buf = ctypes.c_int(0)
    try:
        fcntl.ioctl(write_fd, _FIONREAD, buf)
    except OSError:
        return 0
    return buf.value


def _new_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # the default size works, more slowly
    return r, w


def send(
    header: dict[str, Any], frames: list[Any], sending: Sending, threshold: int = THRESHOLD
) -> dict[str, Any]:
    """A marker for ``frames``: small ones inline, large ones fed to pipes by ``sending``'s threads
    (started now; they end when the receiver has read everything, or ``sending.close()``)."""
    pid = os.getpid()
    out: list[dict[str, Any]] = []
    for frame in frames:
        view = memoryview(frame).cast("B")
        if view.nbytes < threshold or not view.nbytes:
            out.append({"inline": bytes(view)})
            continue
        sending.frames.append(view)
        address = _buffer_address(view)
        parts = max(1, min(_parallelism(), view.nbytes // PART))
        step = -(-view.nbytes // parts // mmap.PAGESIZE) * mmap.PAGESIZE
        spans = []
        for offset in range(0, view.nbytes, step):
            length = min(step, view.nbytes - offset)
            r, w = _new_pipe()
            sending.pipes.append((r, w))
            spans.append([f"/proc/{pid}/fd/{r}", length])
            t = threading.Thread(
                target=sending._feed,
                args=(w, address + offset, length),
                daemon=True,
                name="jupyter-gpu-pipe-feed",
            )
            sending.threads.append(t)
            t.start()
        out.append({"parts": spans, "size": view.nbytes})
    return {MARK: {"frames": out, "header": header}}


def is_marker(obj: Any) -> bool:
    return isinstance(obj, dict) and MARK in obj


def _open(path: Any) -> int:
    if not isinstance(path, str) or not _PATH.fullmatch(path):
        raise TransferError(
            f"a transfer marker may name only /proc/<pid>/fd/<fd>, not {str(path)[:80]!r}"
        )
    try:
        # our own open: the sender's is untouched
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TransferError(f"the sender's pipe is not readable here ({exc.strerror})") from None
    import stat

    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise TransferError("a transfer marker names something that is not a pipe")
    return fd


def _fill(fd: int, view: memoryview, timeout: float) -> None:
    """Read the pipe until ``view`` is full: straight away while the pipe has data (a non-blocking
    read), waiting (``select``, at most ``timeout`` s) only when it is empty."""
    got = 0
    while got < view.nbytes:
        try:
            n = os.readv(fd, [view[got:]])
        except BlockingIOError:
            if not select.select([fd], [], [], timeout)[0]:
                raise TransferError(
                    f"the sender sent nothing for {timeout:.0f} s ({got} of {view.nbytes} bytes)"
                )
            continue
        if n == 0:
            raise TransferError(f"the sender's pipe closed after {got} of {view.nbytes} bytes")
        got += n


def fresh_buffer(size: int) -> memoryview:
    """Writable memory of our own, in huge pages where the machine allows (as NumPy asks for its
    arrays)."""
    return memoryview(_fresh_map(size))


def _fresh_map(size: int) -> mmap.mmap:
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return m


class ReceiveBuffers:
    """Receive buffers a process hands out and takes back for its next transfer of the same size.

    Why: writing into fresh memory costs a page fault per page (the OS zeroes each page first),
    which on a VM is as much again as the copy itself (256 MiB: 41 ms into fresh memory, 19 ms
    into memory already touched). A notebook sends the same arrays cell after cell, so a session
    keeps the buffer of an input the next cell replaced and reads the next input of that size
    into it. A buffer is reused only when nothing refers to it any more (its reference count: no
    array, view or frame of it is alive), so a value a cell kept is never overwritten. At most
    ``max_free`` unused buffers are kept, and ``trim()`` (an idle session calls it) gives them
    all back, so the memory stays the user's own for a few seconds, not for the session's life.
    """

    def __init__(self, max_free: int = 1) -> None:
        self.max_free = max_free
        # every buffer handed out and not yet given back to the OS
        self._given: list[mmap.mmap] = []
        self._lock = threading.Lock()
        # how many takes found a buffer (for tests and benchmarks)
        self.reused = 0

    def _unused(self, i: int) -> bool:
        # references: the list's, and getrefcount's argument; any memoryview, array or frame adds
        # its own
        return sys.getrefcount(self._given[i]) == 2

    def take(self, size: int) -> memoryview:
        """Writable memory for ``size`` bytes: an unused buffer of exactly that size, or fresh
        memory."""
        with self._lock:
            found = next(
                (
                    i
                    for i in range(len(self._given))
                    if len(self._given[i]) == size and self._unused(i)
                ),
                None,
            )
            if found is not None:
                self.reused += 1
                m = self._given.pop(found)
            else:
                m = _fresh_map(size)
            self._given.append(m)  # the newest last
            self._drop_unused(keep=self.max_free)
            return memoryview(m)

    def unused_bytes(self) -> int:
        with self._lock:
            return sum(len(self._given[i]) for i in range(len(self._given)) if self._unused(i))

    def trim(self) -> int:
        """Give every unused buffer back to the OS; returns the bytes given back."""
        with self._lock:
            return self._drop_unused(keep=0)

    def _drop_unused(self, keep: int) -> int:
        unused = [i for i in range(len(self._given)) if self._unused(i)]
        drop = unused[: max(0, len(unused) - keep)]  # the oldest first
        freed = sum(len(self._given[i]) for i in drop)
        for i in reversed(drop):
            self._given.pop(i)  # unmapped here: nothing else refers to it
        return freed


_readers: Any = None


def _executor() -> Any:
    """Reader threads (made on first use: the zygote forks sessions and must stay
    single-threaded)."""
    global _readers
    if _readers is None:
        from concurrent.futures import ThreadPoolExecutor

        _readers = ThreadPoolExecutor(_parallelism(), thread_name_prefix="jupyter-gpu-pipe-read")
    return _readers


def receive(
    marker: dict[str, Any], timeout: float = STALL, buffers: ReceiveBuffers | None = None
) -> tuple[dict[str, Any], list[Any]]:
    """(header, frames) of a marker: every pipe read, in parallel, into memory of this process:
    fresh, or an unused buffer of ``buffers``."""
    try:
        spec = marker[MARK]
        header, frames = spec["header"], list(spec["frames"])
    except (KeyError, TypeError):
        raise TransferError("a transfer marker without frames and a header") from None
    if not isinstance(header, dict):
        raise TransferError("a transfer marker whose header is not a mapping")
    out: list[Any] = []
    jobs = []
    fds: list[int] = []
    try:
        for frame in frames:
            if isinstance(frame, dict) and isinstance(
                frame.get("inline"), (bytes, bytearray, memoryview)
            ):
                out.append(frame["inline"])
                continue
            try:
                parts = [(p, int(n)) for p, n in frame["parts"]]
                size = int(frame["size"])
            except (KeyError, TypeError, ValueError):
                raise TransferError(
                    "a transfer marker with a frame neither inline nor in parts"
                ) from None
            if (
                size <= 0
                or size > 1 << 40
                or any(n <= 0 for _, n in parts)
                or sum(n for _, n in parts) != size
            ):
                raise TransferError("a transfer marker whose parts do not add up to its frame")
            buf = buffers.take(size) if buffers is not None else fresh_buffer(size)
            out.append(buf)
            offset = 0
            for path, length in parts:
                fd = _open(path)
                fds.append(fd)
                jobs.append((fd, buf[offset : offset + length]))
                offset += length
        futures = [_executor().submit(_fill, fd, view, timeout) for fd, view in jobs]
        for f in futures:
            f.result()
    finally:
        for fd in fds:
            os.close(fd)
    return header, out


PROBE = b"jupyter-gpu same-host transfer probe"


def probe(sending: Sending) -> dict[str, Any]:
    """A small marker the other side reads to prove that it can (same machine, same account, /proc
    open)."""
    return send({"probe": True}, [PROBE], sending, threshold=1)


def check_probe(marker: Any) -> bool:
    """Whether a peer's probe can be read here."""
    try:
        _, frames = receive(marker, timeout=5)
        return bytes(frames[0]) == PROBE
    except (TransferError, OSError, IndexError, TypeError):
        return False


def pack(serialized: Any, sending: Sending) -> Any:
    """A ``Serialized`` value as a marker when its frames are large enough to be worth pipes."""
    frames = getattr(serialized, "frames", None)
    if frames is None or sum(memoryview(f).nbytes for f in frames) < THRESHOLD:
        return serialized
    return send(serialized.header, list(frames), sending)


def unpack(obj: Any) -> tuple[dict[str, Any], list[Any]]:
    """(header, frames) of a ``Serialized`` value or of a marker."""
    if is_marker(obj):
        return receive(obj)
    return obj.header, obj.frames
