"""Single-GPU ``%%gpu`` cells (also ``--async`` and ``--fresh``): one rank, in the kernel's own
session.

A cell gets the kernel's session (queueing with a live badge when it needs a new one), runs in it
through ``RankRunner`` and finishes through ``results.finish_cell``. Two recoveries are
particular to one session:

- the session ended between cells (reclaimed, suspended, crashed while idle): the cell says why and runs
  in a new session, which starts with the old one's variables when the pool moved them to host memory;
- a batch cell whose session was preempted while it ran is requeued and reruns from its start in a new
  session, up to ``--retries`` times.
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, cast

from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import ExecuteReply
from jupyter_gpu.common.rightsizing import OverUse, RightSize, over_use, right_size
from jupyter_gpu.errors import CellTimeout, GpuPoolError, SessionLost
from jupyter_gpu.kernelext.badge import JobStatus, StatusLine
from jupyter_gpu.kernelext.connection import PoolConnection, RemoteSession
from jupyter_gpu.kernelext.jobs import AsyncJob
from jupyter_gpu.kernelext.options import CellOptions
from jupyter_gpu.kernelext.pipeline import CellJob
from jupyter_gpu.kernelext.rank_runner import RankOutcome, RankRunner
from jupyter_gpu.kernelext.rendering import CellRenderer
from jupyter_gpu.kernelext.results import finish_cell
from jupyter_gpu.kernelext.runs import RunBook
from jupyter_gpu.kernelext.session_choice import acquire_session, check_remote_refs

# : a cell that used less than this on its GPU, in less than this time, says nothing about the size
# a session : needs (``x = 1`` measures the session's own few MiB): no right-size hint after it
HINT_AFTER_PEAK = 8 << 20
HINT_AFTER_SECONDS = 1.0


class SessionCells:
    """The single-GPU cells of one kernel. They share its one remote session, so they run one at a
    time: a cell started while an ``--async`` job runs waits for it, visibly."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.jobs: dict[str, AsyncJob] = {}
        self._job_ids = itertools.count(1)
        self.lock = threading.Lock()
        # lease id -> the largest cell peak measured in that session
        self.peaks: dict[str, int] = {}
        self.hinted: set[str] = set()  # sessions whose badge has given the right-size hint

    # ------------------------------------------------------------------ a cell the notebook waits for
    def run(self, conn: PoolConnection, opts: CellOptions, job: CellJob, runs: RunBook) -> Any:
        """Run the cell with its badge and its outputs in the cell; return its value or raise its
        error."""
        __tracebackhide__ = True
        deadline = time.monotonic() + opts.timeout if opts.timeout else None
        renderer = CellRenderer()
        badge = StatusLine(note=job.plan.resume_note)
        runs.started(job.plan)
        with self._turn(deadline):
            try:
                session = acquire_session(conn, opts, job.label, deadline, badge)
            # cancelled, refused, timed out or interrupted while queued
            except BaseException as exc:
                badge.not_started(exc)
                raise
            badge.running(session)

            def show(msg: dict) -> None:
                badge.flush()  # the badge stays above the cell's output
                renderer.handle(msg)

            try:
                done, session = self._run(conn, session, opts, job, show, deadline, tick=badge.tick)
            except BaseException as exc:
                badge.finished(session, f"{type(exc).__name__}")
                raise
            finally:
                renderer.close()
                if session.fresh:
                    conn.release(session, reason="--fresh cell finished")
        err = done.get("error") or {}
        badge.finished(
            session,
            None if done.get("status") == "ok" else err.get("type", "error").split(".")[-1],
            done.get("elapsed"),
            done.get("peak_bytes"),
            self._right_size(session, done),
        )
        runs.finished(job.plan, done.get("status") == "ok")
        return finish_cell(self.shell, done, session, opts)

    def _right_size(self, session: RemoteSession, done: ExecuteReply) -> RightSize | OverUse | None:
        """Far more reserved than the session ever used? Then the badge says what to ask next time:
        once per session, and only after a cell that did some work on its GPU (``x = 1`` says
        nothing about how much a session needs; the panel keeps showing the hint for as long as it
        holds)."""
        peak = done.get("peak_bytes")
        if peak is None:
            return None
        # over its share where nothing enforces it (a virtual GPU): said after every such cell
        if session.lease.get("isolation", "none") == "none":
            over = over_use(int(peak), session.lease.get("bytes"))
            if over is not None:
                return over
        peak = self.peaks[session.id] = max(self.peaks.get(session.id, 0), int(peak))
        worked = (
            int(done.get("peak_bytes") or 0) >= HINT_AFTER_PEAK
            or (done.get("elapsed") or 0) >= HINT_AFTER_SECONDS
        )
        if session.id in self.hinted or not worked:
            return None
        sizing = right_size(peak, session.lease.get("bytes"))
        if sizing is not None:
            self.hinted.add(session.id)
        return sizing

    @contextmanager
    def _turn(self, deadline: float | None) -> Iterator[None]:
        """This kernel's session runs one cell at a time: wait (visibly) for a running --async
        job."""
        if not self.lock.acquire(blocking=False):
            busy = [j.id for j in self.jobs.values() if not j.done()]
            print(
                f"Waiting for your running --async job {', '.join(busy) or ''} to finish "
                "(interrupt to stop waiting; --fresh runs a cell in a separate session)."
            )
            while not self.lock.acquire(timeout=0.2):
                if deadline is not None and time.monotonic() > deadline:
                    raise CellTimeout(
                        "--timeout ran out while waiting for your --async job to finish"
                    )
        try:
            yield
        finally:
            self.lock.release()

    # ------------------------------------------------------------------ --async
    def start_async(self, conn: PoolConnection, opts: CellOptions, job: CellJob) -> AsyncJob:
        """Return a handle at once; the cell waits for its turn and runs on a thread of its own."""
        handle = AsyncJob(f"J{next(self._job_ids)}", job.label)
        self.jobs[handle.id] = handle
        deadline = time.monotonic() + opts.timeout if opts.timeout else None
        handle.show()

        def runner() -> None:
            try:
                while not self.lock.acquire(timeout=0.2):
                    if handle.cancel_requested.is_set():
                        raise KeyboardInterrupt("cancelled before it started")
                try:
                    handle.set_state("queued", "waiting for a GPU")
                    session = acquire_session(conn, opts, job.label, deadline, JobStatus(handle))
                    handle.set_state("running", session.describe())
                    done, session = self._run(
                        conn,
                        session,
                        opts,
                        job,
                        handle.handle,
                        deadline,
                        cancel=handle.cancel_requested.is_set,
                    )
                    try:
                        value = finish_cell(self.shell, done, session, opts)
                    finally:
                        if session.fresh:
                            conn.release(session, reason="--fresh cell finished")
                finally:
                    self.lock.release()
                handle.outputs = {n: self.shell.user_ns.get(n) for n in (done.get("outputs") or {})}
                handle.finish(value)
            except BaseException as exc:  # noqa: BLE001 - delivered through the handle, never lost
                handle.finish(error=exc)

        threading.Thread(target=runner, daemon=True, name=f"jupyter-gpu-{handle.id}").start()
        return handle

    # ------------------------------------------------------------------ running, and the two recoveries
    def _run(
        self,
        conn: PoolConnection,
        session: RemoteSession,
        opts: CellOptions,
        job: CellJob,
        show: Callable[[dict], None],
        deadline: float | None,
        cancel: Callable[[], bool] | None = None,
        tick: Callable[[], float | None] | None = None,
    ) -> tuple[ExecuteReply, RemoteSession]:
        """Run the cell; returns its outcome and the session it finally ran in (a new one when the
        old session had ended between cells, or when a preempted batch cell was requeued)."""
        done = _attempt(conn, session, job, show, deadline, cancel, tick)
        if done.get("status") == "lost" and not done.get("started", True) and not session.fresh:
            session = _replace_ended_session(conn, session, opts, job.label, deadline)
            done = _attempt(conn, session, job, show, deadline, cancel, tick)
        attempt = 0
        while (
            done.get("status") == "lost"
            and opts.spec.priority == "batch"
            and attempt < opts.retries
        ):
            # batch cells are retryable: preempted (not crashed), the cell is requeued and reruns
            # from its start
            ended = conn.ended_lease(session.id)
            if not ended.get("preempted"):
                break
            attempt += 1
            if conn.session is session:
                conn.session = None
            conn.ended_sessions[session.id] = ended.get("end_reason") or "preempted"
            print(
                f"This batch cell was preempted (lease {session.id}): {ended.get('end_reason')}. "
                "Requeued "
                f"(retry {attempt} of --retries {opts.retries}): it reruns from its start in a new "
                "session "
                "when the pool has room; the variables of the old session are gone.",
                flush=True,
            )
            session = acquire_session(conn, opts, job.label, deadline, StatusLine())
            try:
                done = _attempt(conn, session, job, show, deadline, cancel, tick)
            except BaseException:
                # the caller only knows the first session: free the requeued one here
                if session.fresh:
                    conn.release(session, reason="--fresh cell finished")
                raise
        raise_for_outcome(done, conn, session, opts.timeout)
        return cast(ExecuteReply, done), session  # ok or error: the others raised


def _attempt(
    conn: PoolConnection,
    session: RemoteSession,
    job: CellJob,
    show: Callable[[dict], None],
    deadline: float | None,
    cancel: Callable[[], bool] | None,
    tick: Callable[[], float | None] | None = None,
) -> RankOutcome:
    """One run of the cell in ``session``: a RankRunner with one rank."""
    check_remote_refs(conn, session, job.remote_refs)
    runner = RankRunner(conn, [session], lambda rank, msg: show(msg), deadline, cancel, tick=tick)
    return runner.run([job.payload]).replies[0]


def _replace_ended_session(
    conn: PoolConnection,
    session: RemoteSession,
    opts: CellOptions,
    label: str,
    deadline: float | None,
) -> RemoteSession:
    """The session ended between cells: say why, and start a new one (with the old one's variables
    when the pool moved them to host memory)."""
    ended = conn.ended_lease(session.id, wait=0.5)
    reason = ended.get("end_reason") or "the session process stopped answering"
    conn.session = None
    offload = ended.get("offload") or {}
    if offload.get("state") == "saved":
        print(
            f"Your previous GPU session (lease {session.id}) ended: {reason}. Starting a new one "
            "with "
            "its variables.",
            flush=True,
        )
        new = acquire_session(conn, opts, label, deadline, StatusLine(), restore=session.id)
        print(restored_text(new, offload), flush=True)
        return new
    print(
        f"Your previous GPU session (lease {session.id}) ended: {reason}. Starting a new one; "
        "the variables that lived there are gone."
    )
    return acquire_session(conn, opts, label, deadline, StatusLine())


def restored_text(session: RemoteSession, offload: dict) -> str:
    """What came back from host memory, and what did not (by name, with why)."""
    restored = session.restored
    if restored is None:
        return (
            "Its variables could not be restored: the worker that kept them has left the pool, so "
            "they are "
            "gone. Rerun the cells that built them."
        )
    names = list(restored.get("restored") or ())
    text = f"Restored {len(names)} variable(s) from host memory" + (
        f": {', '.join(names[:12])}" if names else ""
    )
    text += "." if len(names) <= 12 else f", and {len(names) - 12} more."
    gone = [
        f"{x['name']} ({x.get('type') or x.get('why', '')})"
        for x in [*(offload.get("lost") or ()), *(restored.get("failed") or ())]
    ]
    if gone:
        text += (
            f" Not restored (they could not be moved to host memory): {', '.join(gone)}. Rerun the "
            "cells "
            "that made them."
        )
    return text


def raise_for_outcome(
    outcome: RankOutcome, conn: PoolConnection, session: RemoteSession, timeout: float | None
) -> None:
    """Turn a lost/killed outcome into the exception the user sees."""
    status = outcome.get("status")
    # the session's server failed to run the request
    if status not in ("ok", "error", "killed", "lost"):
        raise GpuPoolError(
            f"The GPU session could not run this cell ({outcome.get('exception') or status}). "
            "This is a jupyter-gpu error, not your code's: the pool's log has the details."
        )
    if status == "killed":
        what = (
            f"--timeout {timeout:g} s was reached"
            if outcome.get("cause") == "timeout"
            else "the kernel was interrupted"
        )
        message = (
            f"{what} and the remote code did not stop within "
            f"{config.get_seconds('interrupt-grace'):g} s "
            "of SIGINT, so its GPU session was killed: the session's state (its variables) is "
            "lost. "
            "The next %%gpu cell starts a new session."
        )
        if outcome.get("cause") == "timeout":
            raise CellTimeout(message)
        raise KeyboardInterrupt(message)
    if status == "lost":
        if conn.session is session:
            conn.session = None
        reason = conn.lease_end_reason(session.id)
        conn.ended_sessions[session.id] = reason
        raise SessionLost(
            f"Your GPU session (lease {session.id} on {session.lease['worker']}) ended while this "
            f"cell ran: {reason}. Its state is lost; the kernel and other sessions are fine. The "
            "next "
            "%%gpu cell starts a new session."
        )
