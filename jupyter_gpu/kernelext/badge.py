"""The cell's badge: one display line that says where a ``%%gpu`` cell is (queued, running, done,
failed).

It is a single display updated in place, so a headless run records its last state; the panel reads
the ``jupyter-gpu`` metadata. An ``--async`` job shows the same text in its own handle instead.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from IPython.display import DisplayHandle

from jupyter_gpu.common.rightsizing import OverUse, RightSize
from jupyter_gpu.common.units import format_bytes
from jupyter_gpu.kernelext.connection import RemoteSession
from jupyter_gpu.kernelext.jobs import AsyncJob
from jupyter_gpu.kernelext.status_view import estimated_start


def where(session: RemoteSession) -> str:
    """The GPU(s), share, lease and isolation level of a session, as the badge names them."""
    lease = session.lease
    names = ", ".join(lease.get("gpu_names") or [f"GPU {i}" for i in lease.get("gpu_indices", ())])
    share = f"{lease['fraction']:g} of a GPU, lease {session.id}, isolation {lease.get('isolation', 'none')}"
    return f"{names} ({share}){host_share(lease)}"


def host_share(lease: dict) -> str:
    """What the lease booked on its machine (``--host-memory``, ``--cpus`` or the pool's
    default), as the badge says it; nothing where its machine reports no bound."""
    parts = []
    if lease.get("host_memory"):
        parts.append(f"{format_bytes(lease['host_memory'])} host memory")
    if lease.get("cpus"):
        cores = lease["cpus"]
        parts.append(f"{cores:g} CPU core" + ("" if cores == 1 else "s"))
    return f" with {' and '.join(parts)}" if parts else ""


class StatusLine:
    """The cell's badge: queued (position, reason, estimated start) -> starting (its session
    process) -> running on GPU n (share) -> done or failed, saying how long the cell waited for its
    GPU. One display, updated in place, so it is also what a headless run records. ``note`` (e.g.
    what ``--resume`` continues) is said while it runs and at the end."""

    # : a cell's "running" line is shown once the cell has run this long (or sent output): a cell
    # done sooner : shows its final line only, one display message instead of two on the warm path
    RUNNING_AFTER = 0.2

    def __init__(self, note: str | None = None) -> None:
        self.handle: DisplayHandle | None = None
        self._pending: tuple[str, str, RemoteSession | None] | None = None
        self._due = 0.0
        self.waited_since: float | None = None
        # seconds from the request to a running session (None: no wait)
        self.waited: float | None = None
        self.new_session: RemoteSession | None = None
        self.note = note

    def waiting(self, status: dict) -> None:
        """A report from the broker while the request waits (queued, then its session starting), and
        once more when it is granted."""
        if self.waited_since is None:
            self.waited_since = time.monotonic()
        waited = f"[{time.monotonic() - self.waited_since:.0f} s]"
        if status["state"] == "starting":
            # granted: its worker is starting the session process (a few at a time): say so, not
            # nothing
            self.show(
                f"starting a GPU session ({status['id']}, {status.get('request')}): "
                f"{status.get('reason') or 'starting the session process'} {waited}",
                "queued",
                None,
            )
        elif status["state"] == "queued":
            pos = status.get("position")
            text = (
                f"queued ({status['id']}, {status.get('request')}): position {pos} of "
                f"{status.get('queue_length')}, {status.get('reason')}"
            )
            text += f", estimated start {estimated_start(status, time.time())}"
            self.show(f"{text} {waited}", "queued", None)

    def started(self, session: RemoteSession) -> None:
        """The request got a new session (the running line says so)."""
        self.new_session = session

    def not_started(self, exc: BaseException) -> None:
        """The request ended without a session: the badge must not go on saying "queued"."""
        if self.handle is None:
            return  # it never waited visibly: the error alone says it
        if isinstance(exc, KeyboardInterrupt):
            why = "interrupted while queued"
        else:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            why = f"{type(exc).__name__}: {first[:200]}"
        self.show(f"not started ({why})", "failed", None)

    def waited_text(self) -> str:
        """``waited 3.2 s for its GPU`` (a new session was asked for), or nothing (it ran in the
        session)."""
        if self.waited is None:
            return ""
        return (
            f"waited {self.waited:.1f} s for its GPU"
            if self.waited >= 0.05
            else "no wait for its GPU"
        )

    def running(self, session: RemoteSession) -> None:
        if self.waited_since is not None and self.waited is None:
            self.waited = time.monotonic() - self.waited_since
        new = f" (new session, {self.waited_text()})" if self.new_session is session else ""
        text = f"running on {where(session)}{new}{self.note_text()}"
        if self.handle is None:  # nothing shown yet: wait and see whether the cell is over first
            self._pending, self._due = (
                (text, "running", session),
                time.monotonic() + self.RUNNING_AFTER,
            )
        else:  # it was queued visibly: say at once that it runs
            self.show(text, "running", session)

    def flush(self) -> None:
        """Show the "running" line now if it waits (before the cell's first output, so it stays on
        top)."""
        if self._pending is not None:
            self.show(*self._pending)

    def tick(self) -> float | None:
        """Show the "running" line once it is due; seconds until it is, or None (nothing waits)."""
        if self._pending is None:
            return None
        left = self._due - time.monotonic()
        if left <= 0:
            self.flush()
            return None
        return left

    def finished(
        self,
        session: RemoteSession,
        error: str | None,
        elapsed: float | None = None,
        peak: int | None = None,
        sizing: RightSize | OverUse | None = None,
    ) -> None:
        took = f" in {elapsed:.2f} s" if elapsed is not None else ""
        waited = f" ({self.waited_text()})" if self.waited is not None else ""
        peak_text = f", peak {format_bytes(peak)}" if peak else ""
        hint = f". {sizing.label}: {sizing.hint()}" if sizing is not None else ""
        if error is None:
            self.show(
                f"done{took}{waited} on {where(session)}{peak_text}{self.note_text()}{hint}",
                "done",
                session,
            )
        else:
            self.show(
                f"failed ({error}){took}{waited} on {where(session)}{self.note_text()}",
                "failed",
                session,
            )

    def note_text(self) -> str:
        return f"; {self.note}" if self.note else ""

    def show(self, text: str, state: str, session: RemoteSession | None) -> None:
        """Show ``%%gpu {text}`` (the first call displays the badge, later ones update it)."""
        self._pending = None
        bundle = {"text/plain": f"%%gpu {text}"}
        meta = {"jupyter-gpu": {"state": state, "lease": session.id if session else None}}
        with _no_idle_flush():
            if self.handle is None:
                self.handle = DisplayHandle()
                self.handle.display(bundle, metadata=meta, raw=True)
            else:
                self.handle.update(bundle, metadata=meta, raw=True)


_publishing = threading.Lock()


def _streams_idle() -> bool:
    """Whether neither ``sys.stdout`` nor ``sys.stderr`` holds text not yet handed to ipykernel's
    I/O thread (its ``OutStream``: a write sets ``_flush_pending`` until the thread takes the
    buffers). Anything else (a terminal IPython, a captured stream) counts as not idle."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "_flush_pending", True) or getattr(
            stream, "_subprocess_flush_pending", False
        ):
            return False
        lock, buffers = getattr(stream, "_buffer_lock", None), getattr(stream, "_buffers", None)
        if lock is None or buffers is None:
            return False
        with lock:
            if any(b.tell() for b in buffers.values()):
                return False
    return True


@contextlib.contextmanager
def _no_idle_flush() -> Iterator[None]:
    """Publish the badge without ipykernel's stream flush when there is nothing to flush.

    Why: ipykernel flushes stdout and stderr before every display, and each flush is a round
    trip to its I/O thread (schedule, then wait for an event), 0.4-0.5 ms of a warm cell's 5 ms
    on two cores, paid even when nothing was printed. With nothing pending the order of outputs
    cannot change: the display goes out through the same I/O thread, after anything it already
    took. Text still buffered is flushed as before."""
    shell: Any = None
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except Exception:  # noqa: BLE001 - no IPython: nothing to skip
        pass
    pub = getattr(shell, "display_pub", None)
    if pub is None or not hasattr(pub, "_flush_streams") or not _publishing.acquire(blocking=False):
        yield
        return
    try:
        if _streams_idle():
            pub._flush_streams = _nothing
            try:
                yield
            finally:
                del pub._flush_streams
        else:
            yield
    finally:
        _publishing.release()


def _nothing() -> None:
    return None


class JobStatus(StatusLine):
    """The badge of an ``--async`` job: its text goes into the job's own display, which stays in the
    cell that started it while other cells run."""

    def __init__(self, job: AsyncJob) -> None:
        super().__init__()
        self.job = job

    def show(self, text: str, state: str = "", session: RemoteSession | None = None) -> None:
        self.job.set_state(self.job.state, text)
