"""Running a cell in its remote session(s) and waiting for it: one loop for one session or N
ranks.

The network I/O runs on the Dask client's loop thread; every message lands in one queue that the
kernel's main thread empties here. The main thread is also where a kernel interrupt
(KeyboardInterrupt) lands, so this loop is where the user's ways of stopping a cell are carried
out, the same for a plain cell (one rank) and a ``--workers`` run (N ranks):

- first interrupt, ``--timeout`` reached, or an ``--async`` job cancelled: SIGINT to every rank still
  running, then ``interrupt-grace`` seconds for the code to stop;
- a second interrupt, or the grace period over: the ranks still running are killed (their sessions
  released, their state lost);
- with N ranks, one that fails or is lost stops the others (they would wait forever in a collective):
  after ``scaleout.error-grace`` (a moment to fail on their own), at once for a lost one.

A rank is lost when its connection breaks (its worker or machine died) or, every ``LEASE_CHECK``
seconds while it runs, when the broker says its lease ended (the pool gave its worker up): a
machine cut off from the network breaks no connection, and TCP would only give up on it after
``distributed.comm.timeouts.tcp``.

Outputs are shown inside the loop's ``try``: an interrupt that lands while one is being rendered
is still an interrupt, not a KeyboardInterrupt escaping while the remote code runs on.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypedDict, cast

from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import CellPayload, ExecuteReply, pool_error
from jupyter_gpu.common.refusals import from_text
from jupyter_gpu.kernelext.connection import PoolConnection, RemoteSession
from jupyter_gpu.kernelext.session_calls import interrupt, start_execute

log = logging.getLogger(__name__)

Show = Callable[[int, dict], None]  # (rank, message) -> render one output message of that rank
LEASE_CHECK = 2.0  # seconds between asking the broker whether the running ranks' leases still stand


class LostRank(TypedDict):
    """The kernel's outcome of a rank whose session went away (its connection broke, the broker
    ended its lease, or it was moved to host memory before the cell began)."""

    status: Literal["lost"]
    error: str | None
    started: bool  # whether the cell had begun (a cell that had not is run again elsewhere)


class KilledRank(TypedDict):
    """The kernel's outcome of a rank it killed (its code did not stop after SIGINT)."""

    status: Literal["killed"]
    cause: str | None  # "timeout", "interrupt", or None (another rank failed)


# a rank's outcome: the session's reply, or what the kernel made of a rank without one
RankOutcome = ExecuteReply | LostRank | KilledRank


@dataclass
class RunOutcome:
    """Each rank's final reply, in the order the ranks finished (the first failure is the root
    cause), and what stopped the run: ``"timeout"``, ``"interrupt"`` (also a cancelled --async job),
    or None."""

    replies: dict[int, RankOutcome]
    cause: str | None = None

    @property
    def stopped(self) -> bool:
        return self.cause is not None


def kill_reason(cause: str | None, grace: float) -> str:
    """Why a single cell's session was released when its code ignored SIGINT (the broker and the
    kernel keep it as the lease's end reason)."""
    return (
        f"killed after {'the --timeout' if cause == 'timeout' else 'an interrupt'}: "
        f"the running code did not stop within {grace:g} s"
    )


class RankRunner:
    """Runs one execute request per session (rank) and drives them to an end from the main
    thread."""

    def __init__(
        self,
        conn: PoolConnection,
        sessions: list[RemoteSession],
        show: Show,
        deadline: float | None = None,
        cancel: Callable[[], bool] | None = None,
        release_reason: Callable[[str | None, float], str] = kill_reason,
        tick: Callable[[], float | None] | None = None,
    ) -> None:
        self.conn, self.sessions, self.show = conn, sessions, show
        # called on the main thread while waiting; returns seconds until it wants a call again
        self.tick = tick
        self.deadline, self.cancel = deadline, cancel
        self.release_reason = release_reason
        self.grace = config.get_seconds("interrupt-grace")

    def run(self, payloads: list[CellPayload]) -> RunOutcome:
        """Start every rank (payload i on session i) and wait until each has replied or was
        killed."""
        events: queue.Queue = queue.Queue()
        cwd = os.getcwd()
        for rank, (session, payload) in enumerate(zip(self.sessions, payloads)):

            def sink(msg: Any, r: int = rank) -> None:
                events.put((r, msg))

            start_execute(self.conn, session, {**payload, "cwd": cwd}, sink)
        world = len(self.sessions)
        replies: dict[int, RankOutcome] = {}
        cause: str | None = None
        # when to SIGINT the ranks still running (a rank failed, or stop now)
        stop_at: float | None = None
        # set once SIGINT was sent: when the ranks still running are killed
        kill_at: float | None = None
        pending: collections.deque = collections.deque()
        # ranks whose cell sent output: they started, whatever comes next
        heard: set[int] = set()
        next_check = time.monotonic() + LEASE_CHECK

        while len(replies) < world:
            try:
                while pending:
                    self.show(*pending.popleft())
                now = time.monotonic()
                if now >= next_check and kill_at is None:
                    next_check = now + LEASE_CHECK
                    for rank, reason in self._ended_leases(replies).items():
                        events.put((rank, {"op": "lost", "error": reason, "started": True}))
                if kill_at is None and stop_at is None:
                    if self.deadline is not None and now > self.deadline:
                        cause, stop_at = "timeout", now
                    elif self.cancel is not None and self.cancel():
                        cause, stop_at = "interrupt", now
                if kill_at is None and stop_at is not None and now >= stop_at:
                    # set first: an interrupt during the SIGINTs is a second one
                    kill_at = now + self.grace
                    for r, session in enumerate(self.sessions):
                        if r not in replies:
                            interrupt(self.conn, session)
                if kill_at is not None and now > kill_at:
                    self._kill(replies, cause)
                    break
                wait = 0.1 if (kill_at or stop_at or self.deadline or self.cancel) else 0.5
                if self.tick is not None:
                    due = self.tick()
                    if due is not None:
                        wait = min(wait, max(0.01, due))
                rank, msg = events.get(timeout=wait)
                if not isinstance(msg, dict):
                    heard.add(rank)  # its cell is running: whatever happens next, it started
                    pending.extend((rank, item) for item in msg)
                    continue
            except queue.Empty:
                continue
            except KeyboardInterrupt:  # acted on at the top of the loop, inside the try
                cause = "interrupt"
                if kill_at is None:
                    stop_at = time.monotonic()  # the first: SIGINT now
                else:
                    kill_at = -math.inf  # a second one: kill now
                continue
            while pending:  # outputs that came before the reply and were not shown yet
                self.show(*pending.popleft())
            # its connection broke after the broker had already said it was lost
            if rank in replies:
                continue
            replies[rank] = reply = self._reply(msg, cause)
            if (
                reply["status"] == "lost"
                and reply["started"]
                and rank not in heard
                and self._moved_out(rank)
            ):
                # its session had been moved to host memory: it ran no more cells
                reply["started"] = False
            if world > 1 and reply.get("status") != "ok" and stop_at is None and kill_at is None:
                lost = reply["status"] == "lost"
                stop_at = time.monotonic() + (
                    0 if lost else config.get_seconds("scaleout.error-grace")
                )
        return RunOutcome(replies, cause)

    def _ended_leases(self, replies: dict[int, RankOutcome]) -> dict[int, str]:
        """The ranks still running whose lease the broker has ended (their worker was given up),
        with why."""
        ended = {}
        for rank, session in enumerate(self.sessions):
            if rank in replies:
                continue
            try:
                # never held up by a restarting scheduler: the cell runs on without it
                info = self.conn.scheduler_call(
                    "gpu_lease_info", wait_for_restart=False, lease=session.id, user=self.conn.user
                )
            except Exception as exc:  # noqa: BLE001 - the pool does not answer now: the connections will tell
                log.debug("could not ask about lease %s: %s", session.id, exc)
                return {}
            if info.get("state") == "ended":
                ended[rank] = info.get("end_reason") or "the pool ended its lease"
        return ended

    def _moved_out(self, rank: int) -> bool:
        """Whether rank ``rank``'s lease ended by moving its session to host memory. Such a session
        runs no more cells, so a cell sent to it just then (its connection broke as the worker ended
        it, before any output) never ran: the caller brings the variables back in a new session and
        runs the cell there. A cell that had sent output was running when its session was taken
        back: it did start."""
        try:
            info = self.conn.scheduler_call(
                "gpu_lease_info",
                wait_for_restart=False,
                lease=self.sessions[rank].id,
                user=self.conn.user,
            )
        except Exception:  # noqa: BLE001 - the pool does not answer: keep what the connection said
            return False
        return info.get("state") == "ended" and (info.get("offload") or {}).get("state") in (
            "pending",
            "saved",
        )

    @staticmethod
    def _reply(msg: dict, cause: str | None) -> RankOutcome:
        """A rank's final message as an outcome: ``lost`` when its session went away (``started``
        says whether the cell had begun), the session's reply otherwise (its refusal, in Dask's
        error envelope, as a cell that was not run)."""
        if msg.get("op") == "lost":
            return {
                "status": "lost",
                "error": msg.get("error"),
                "started": msg.get("started", True),
            }
        # its variables were just offloaded: the cell did not run
        if msg.get("status") == "retired":
            return {"status": "lost", "error": "the session was retired", "started": False}
        refusal = (
            from_text(str(msg.get("exception_text")))
            if msg.get("status") == "uncaught-error"
            else None
        )
        if refusal is not None:  # the session refused the cell (its secret, a malformed field)
            return {"status": "error", "error": pool_error(f"The cell was not run: {refusal}.")}
        reply = cast(ExecuteReply, msg)
        if cause == "timeout" and reply.get("status") == "error":
            reply["timed_out"] = True
        return reply

    def _kill(self, replies: dict[int, RankOutcome], cause: str | None) -> None:
        """The code did not stop after SIGINT: end the sessions still running (their state is
        lost)."""
        for rank, session in enumerate(self.sessions):
            if rank not in replies:
                log.debug(
                    "killing rank %d (lease %s) after %s",
                    rank,
                    session.id,
                    cause or "a failed rank",
                )
                self.conn.release(session, reason=self.release_reason(cause, self.grace))
                replies[rank] = {"status": "killed", "cause": cause}
