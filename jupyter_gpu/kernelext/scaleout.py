"""``%%gpu --workers N``: one cell, N ranks on N distinct GPUs, with torch.distributed
initialised.

The kernel asks the broker for a gang of N leases (all or nothing, one per GPU), picks the
rendezvous (rank 0's host, a port free there), sends the inputs to rank 0 only (it broadcasts
them) and runs the cell on every rank at once through the same ``RankRunner`` as a single-GPU
cell. Rank 0's output is the cell's output; other ranks' output appears prefixed with their rank,
and their errors are reported, never swallowed. Metrics from any rank drive the progress display.
If a rank's session is lost (its worker died), every rank is stopped, the gang is scheduled again
and the cell reruns, so that ``jupyter_gpu.restore()`` resumes from the last checkpoint, up to
--retries times. An interrupt or
--timeout stops every rank and frees every lease. A new run of the cell (a rerun) starts afresh, unless
it says ``--resume`` (``runs.py``); the badge says so, and ends with the run's steps, time and
each rank's last progress.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from typing import Any, cast

from IPython.core.error import UsageError

from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import CellPayload, ExecuteReply
from jupyter_gpu.errors import CellTimeout, GpuPoolError, SessionLost
from jupyter_gpu.kernelext.badge import StatusLine
from jupyter_gpu.kernelext.connection import PoolConnection, RemoteSession
from jupyter_gpu.kernelext.options import CellOptions
from jupyter_gpu.kernelext.pipeline import CellJob, notebook_name
from jupyter_gpu.kernelext.progress_bar import duration
from jupyter_gpu.kernelext.rank_runner import RankRunner, RunOutcome
from jupyter_gpu.kernelext.rendering import CellRenderer, rebuild_exception
from jupyter_gpu.kernelext.results import finish_cell
from jupyter_gpu.kernelext.runs import RunBook
from jupyter_gpu.kernelext.session_calls import session_call

RANKS_STOPPED = "stopped: another rank failed, or the run was interrupted"


def run_scaleout(
    shell: Any, conn: PoolConnection, opts: CellOptions, job: CellJob, runs: RunBook
) -> Any:
    """Run a prepared cell on ``opts.spec.workers`` ranks, resuming after a lost worker; return rank
    0's value or raise the error of the rank that failed first."""
    __tracebackhide__ = True
    if job.remote_refs:
        names = ", ".join(sorted(job.remote_refs))
        raise UsageError(
            f"%%gpu --workers: {names} live(s) in this notebook's own GPU session, and a --workers "
            "run "
            "starts sessions of its own. Create it inside this cell, or bring a copy back first "
            "(%gpu pull NAME) so that it is sent to the ranks."
        )
    deadline = time.monotonic() + opts.timeout if opts.timeout else None
    renderer = CellRenderer()
    attempt = 0
    began = time.monotonic()
    waited = 0.0
    runs.started(job.plan)
    try:
        while True:
            badge = StatusLine(note=job.plan.resume_note)
            schedule_deadline = time.monotonic() + config.get_seconds("scaleout.schedule-timeout")
            if deadline is not None:
                schedule_deadline = min(schedule_deadline, deadline)
            asked = time.monotonic()
            sessions = _gang(conn, opts, job.label, badge, schedule_deadline)
            waited += time.monotonic() - asked
            conn.scheduler_call(
                "gpu_run_update",
                run=job.run_id,
                user=conn.user,
                notebook=notebook_name(),
                cell=job.label,
                world_size=len(sessions),
                attempt=attempt,
                state="running",
                leases=[s.id for s in sessions],
                resumes=job.plan.resumes,
            )
            try:
                outcome, lost = _run_ranks(conn, sessions, job, renderer, deadline, attempt)
            finally:
                for s in sessions:
                    try:
                        conn.release(s, reason="--workers run finished")
                    except Exception:  # noqa: BLE001 - releasing one lease never stops releasing the others
                        pass
            if lost and not outcome.stopped and attempt < opts.retries:
                attempt += 1
                rank, reason = next(iter(lost.items()))
                print(
                    f"[jupyter-gpu] rank {rank}'s session was lost ({reason}); scheduling the run "
                    "again "
                    f"(retry {attempt} of {opts.retries}) to resume from the last checkpoint.",
                    flush=True,
                )
                continue
            break
    finally:
        renderer.close()
    final = _state(outcome)
    conn.scheduler_call(
        "gpu_run_update", run=job.run_id, user=conn.user, state=final, attempt=attempt
    )
    runs.finished(job.plan, final == "done")
    badge.show(
        final_badge(
            final,
            len(sessions),
            time.monotonic() - began,
            waited,
            attempt,
            renderer,
            job.plan.resume_note,
        ),
        final,
        None,
    )
    return _finish(shell, outcome, lost, sessions, opts)


def final_badge(
    final: str,
    world: int,
    elapsed: float,
    waited: float,
    attempt: int,
    renderer: CellRenderer,
    note: str | None = None,
) -> str:
    """``done: 2 ranks in 8.1 s (waited 0.4 s for 2 GPUs); rank 0: 120/120 steps ...; rank 1: ...``:
    what the run did, how long it took and waited, and each rank's last progress line."""
    text = f"{final}: {world} ranks in {duration(elapsed)} (waited {waited:.1f} s for {world} GPUs)"
    if attempt:
        text += f", after {attempt} resume(s)"
    if note:
        text += f"; {note}"
    progress = renderer.progress
    for rank in range(world):
        line = progress.summary(rank) if progress is not None else None
        if line:
            text += f"; rank {rank}: {line}"
    return text


def _gang(
    conn: PoolConnection, opts: CellOptions, label: str, badge: StatusLine, deadline: float
) -> list[RemoteSession]:
    """N leases on N distinct GPUs, granted together, as sessions in rank order."""
    spec = dict(opts.spec.__dict__)
    try:
        granted = conn.request_lease(spec, notebook_name(), label, badge.waiting, deadline)
    except CellTimeout as exc:
        raise GpuPoolError(
            f"The {opts.spec.workers} ranks of this --workers run could not be scheduled in time: "
            f"{exc}. Ask for fewer workers or smaller shares, or scale the pool out "
            "(%gpu scale N)."
        ) from None
    sessions = [
        RemoteSession(lease=dict(ls), fresh=True)
        for ls in sorted(granted["leases"], key=lambda x: x["rank"])
    ]
    badge.show(
        f"{len(sessions)} ranks scheduled: "
        + "; ".join(
            f"rank {s.lease['rank']} on {', '.join(s.lease.get('gpu_names') or [])}"
            for s in sessions
        )
        + badge.note_text(),
        "running",
        None,
    )
    return sessions


def _run_ranks(
    conn: PoolConnection,
    sessions: list[RemoteSession],
    job: CellJob,
    renderer: CellRenderer,
    deadline: float | None,
    attempt: int,
) -> tuple[RunOutcome, dict[int, str]]:
    """Run every rank (the others stop when one fails). Returns each rank's outcome, in the order
    they ended, and the ranks whose sessions were lost, with the reason the pool gives (asked before
    the leases are released, which would overwrite it)."""
    world = len(sessions)
    # a free port on rank 0's host for the rendezvous, asked over the kernel's (TLS) comm
    rendezvous = session_call(conn, sessions[0], "free_port", timeout=None)
    store_key = secrets.token_urlsafe(24)
    payloads: list[CellPayload] = []
    for rank in range(world):
        dist = {
            "rank": rank,
            "world_size": world,
            "master_addr": rendezvous["host"],
            "master_port": rendezvous["port"],
            "run": job.run_id,
            # the rendezvous store answers only connections that prove they know this (a challenge:
            # it never crosses the wire), so only the run's ranks, of this attempt, reach it
            "store_key": store_key,
            "checkpoint_dir": job.payload["checkpoint_dir"],
            "attempt": attempt,
            "startup_timeout": config.get_seconds("scaleout.startup-timeout"),
        }
        payloads.append(
            {
                **job.payload,
                "inputs": job.inputs if rank == 0 else {},
                "outputs": job.outputs if rank == 0 else [],
                "dist": dist,
            }
        )
    runner = RankRunner(
        conn,
        sessions,
        lambda rank, item: _show(renderer, rank, item),
        deadline,
        release_reason=lambda cause, grace: RANKS_STOPPED,
    )
    outcome = runner.run(payloads)
    lost = {
        rank: conn.lease_end_reason(sessions[rank].id, wait=2.0)
        for rank, reply in outcome.replies.items()
        if reply.get("status") == "lost"
    }
    return outcome, lost


def _show(renderer: CellRenderer, rank: int, item: dict) -> None:
    if rank == 0 or item.get("op") == "metrics":
        renderer.handle(item)
    elif item.get("op") == "stream":
        text = "".join(f"[rank {rank}] {line}" for line in item["text"].splitlines(keepends=True))
        renderer.handle({**item, "text": text})


def _state(outcome: RunOutcome) -> str:
    statuses = [d.get("status") for d in outcome.replies.values()]
    if all(s == "ok" for s in statuses):
        return "done"
    return "stopped" if outcome.stopped else "failed"


def first_failure(errors: Mapping[int, ExecuteReply]) -> tuple[int, ExecuteReply]:
    """The rank whose cell failed first, by when its code ended (``finished``), not by which reply
    came first: a rank that raises tears its process group down before it replies, so the others'
    collective errors ("connection closed by peer") can arrive before the exception that caused
    them."""
    order = list(errors)
    return min(
        errors.items(), key=lambda item: (item[1].get("finished", math.inf), order.index(item[0]))
    )


def _finish(
    shell: Any,
    outcome: RunOutcome,
    lost: dict[int, str],
    sessions: list[RemoteSession],
    opts: CellOptions,
) -> Any:
    __tracebackhide__ = True
    done = outcome.replies
    first = done.get(0, cast(ExecuteReply, {}))
    errors: dict[int, ExecuteReply] = {r: d for r, d in done.items() if d["status"] == "error"}
    if lost:
        rank, reason = next(iter(lost.items()))
        raise SessionLost(
            f"Rank {rank}'s GPU session was lost ({reason}) and --retries {opts.retries} were used "
            "up. Every rank was stopped and every lease freed."
        )
    if errors:
        # the others mostly follow from it (a collective losing a peer)
        rank, err = first_failure(errors)
        others = [
            f"rank {r}: {d.get('error', {}).get('type', '').split('.')[-1]}: "
            f"{d.get('error', {}).get('message', '')}"
            for r, d in errors.items()
            if r != rank
        ]
        exc = rebuild_exception(err.get("error", {}))
        if rank != 0 or others:
            try:
                if hasattr(exc, "add_note"):  # Python 3.11+
                    exc.add_note(
                        f"[jupyter-gpu] raised by rank {rank} of {len(sessions)}"
                        + (f"; also {'; '.join(others)}" if others else "")
                    )
            except Exception:  # noqa: BLE001 - a note is a nicety: the user's exception is raised as it is
                pass
        if outcome.stopped and opts.timeout:
            raise CellTimeout(
                f"--timeout {opts.timeout:g} s was reached: every rank was stopped and every "
                "lease freed."
            ) from exc
        raise exc
    if outcome.stopped or any(d.get("status") == "killed" for d in done.values()):
        message = "every rank was stopped and every lease freed (the ranks did not stop within the grace period)"
        if opts.timeout:
            raise CellTimeout(f"--timeout {opts.timeout:g} s was reached: {message}.")
        raise KeyboardInterrupt(f"The --workers run was interrupted: {message}.")
    return finish_cell(shell, cast(ExecuteReply, first), sessions[0], opts)  # ok: the rest raised
