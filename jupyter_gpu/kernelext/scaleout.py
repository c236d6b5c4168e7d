"""``%%gpu --workers N``: one cell, N ranks on N distinct GPUs, with torch.distributed initialised.

The kernel asks the broker for a gang of N leases (all or nothing, one per GPU), picks the rendezvous
(rank 0's host, a port free there), sends the inputs to rank 0 only (it broadcasts them) and runs the cell
on every rank at once. Rank 0's output is the cell's output; other ranks' output appears prefixed with
their rank, and their errors are reported, never swallowed. Metrics from any rank drive the progress
display. If a rank's session is lost (its worker died), every rank is stopped, the gang is scheduled again
and the cell reruns, so that ``jupyter_gpu.restore()`` resumes from the last checkpoint, up to --retries
times. An interrupt or --timeout stops every rank and frees every lease.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import time
from typing import Any

from IPython.core.error import UsageError

from jupyter_gpu.common import config
from jupyter_gpu.errors import CellTimeout, GpuPoolError, SessionLost
from jupyter_gpu.kernelext.connection import PoolConnection, RemoteSession
from jupyter_gpu.kernelext.rendering import CellRenderer, rebuild_exception, register_cell_source


def run_scaleout(magics: Any, opts: Any, cell: str) -> Any:
    __tracebackhide__ = True
    from jupyter_gpu.kernelext.magics import StatusLine, _label, _notebook, cell_number

    conn: PoolConnection = magics._ensure_connection()
    count = cell_number(magics.shell)
    cell_name = f"<%%gpu cell In[{count}]>"
    register_cell_source(cell_name, cell)
    label = opts.name or _label(count, cell)
    inputs, remote_refs, outputs = magics._prepare(opts, cell)
    if remote_refs:
        names = ", ".join(sorted(remote_refs))
        raise UsageError(f"%%gpu --workers: {names} live(s) in this notebook's own GPU session, and a --workers run "
                         "starts sessions of its own. Create it inside this cell, or bring a copy back first "
                         "(%gpu pull NAME) so that it is sent to the ranks.")
    run_id = run_key(conn, opts.name, cell)
    checkpoint_dir = checkpoint_dir_for(conn, run_id)
    deadline = time.monotonic() + opts.timeout if opts.timeout else None
    renderer = CellRenderer()
    payload = {"code": cell, "outputs": outputs, "exact_outputs": opts.outputs is not None, "cell_name": cell_name,
               "label": label, "max_bytes": config.get_bytes("output-max-bytes"), "cwd": os.getcwd(),
               "checkpoint_dir": checkpoint_dir}
    attempt = 0
    try:
        while True:
            status = StatusLine()
            schedule_deadline = time.monotonic() + config.get_seconds("scaleout.schedule-timeout")
            if deadline is not None:
                schedule_deadline = min(schedule_deadline, deadline)
            sessions = _gang(conn, opts, label, status, schedule_deadline)
            conn.scheduler_call("gpu_run_update", run=run_id, user=conn.user, notebook=_notebook(), cell=label,
                                world_size=len(sessions), attempt=attempt, state="running",
                                leases=[s.id for s in sessions])
            try:
                outcome = _run_ranks(conn, sessions, payload, inputs, renderer, deadline, opts, run_id,
                                     checkpoint_dir, attempt)
            finally:
                for s in sessions:
                    try:
                        conn.release(s, reason="--workers run finished")
                    except Exception:
                        pass
            lost = outcome["lost"]
            if lost and not outcome["stopped"] and attempt < opts.retries:
                attempt += 1
                rank, reason = next(iter(lost.items()))
                print(f"[jupyter-gpu] rank {rank}'s session was lost ({reason}); scheduling the run again "
                      f"(retry {attempt} of {opts.retries}) to resume from the last checkpoint.", flush=True)
                continue
            break
    finally:
        renderer.close()
    final = _state(outcome)
    conn.scheduler_call("gpu_run_update", run=run_id, state=final, attempt=attempt)
    status._show(f"{final}: {len(sessions)} ranks" + (f" after {attempt} resume(s)" if attempt else ""), final, None)
    return _finish(magics, outcome, sessions, opts)


def run_key(conn: PoolConnection, name: str | None, cell: str) -> str:
    """Stable for one cell of one kernel (so a rerun after a lost worker finds its checkpoints), and
    different across kernels (so a notebook rerun from scratch does not resume someone's old run)."""
    base = name or hashlib.sha1(cell.encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in base)[:60]
    return f"{safe}-{conn.kernel[:8]}"


def checkpoint_dir_for(conn: PoolConnection, key: str) -> str:
    """Pool storage for one run's checkpoints (``jupyter-gpu.scaleout.checkpoint-dir``)."""
    return os.path.join(os.path.expanduser(config.get("scaleout.checkpoint-dir")), conn.user, key)


def _gang(conn: PoolConnection, opts: Any, label: str, status: Any, deadline: float) -> list[RemoteSession]:
    from jupyter_gpu.kernelext.magics import _notebook

    spec = dict(opts.spec.__dict__)
    try:
        granted = conn.request_lease(spec, _notebook(), label, status.waiting, deadline)
    except CellTimeout as exc:
        raise GpuPoolError(f"The {opts.spec.workers} ranks of this --workers run could not be scheduled in time: "
                           f"{exc}. Ask for fewer workers or smaller shares, or scale the pool out "
                           "(%gpu scale N).") from None
    sessions = [RemoteSession(lease=dict(ls), fresh=True) for ls in sorted(granted["leases"], key=lambda x: x["rank"])]
    status._show(f"{len(sessions)} ranks scheduled: " + "; ".join(f"rank {s.lease['rank']} on "
                                                               f"{', '.join(s.lease.get('gpu_names') or [])}"
                                                               for s in sessions), "running", None)
    return sessions


def _run_ranks(conn: PoolConnection, sessions: list[RemoteSession], payload: dict, inputs: dict,
               renderer: CellRenderer, deadline: float | None, opts: Any, run_id: str, checkpoint_dir: str,
               attempt: int) -> dict:
    """Run every rank; stop the others when one fails; return each rank's outcome."""
    world = len(sessions)
    rendezvous = conn.call(_free_port, sessions[0].address, conn.connection_args)
    events: queue.Queue = queue.Queue()
    for rank, session in enumerate(sessions):
        dist = {"rank": rank, "world_size": world, "master_addr": rendezvous["host"],
                "master_port": rendezvous["port"], "run": run_id, "checkpoint_dir": checkpoint_dir,
                "attempt": attempt, "startup_timeout": config.get_seconds("scaleout.startup-timeout")}
        rank_payload = {**payload, "inputs": inputs if rank == 0 else {},
                        "outputs": payload["outputs"] if rank == 0 else [], "dist": dist}
        conn.start_execute(session, rank_payload, lambda msg, r=rank: events.put((r, msg)))
    done: dict[int, dict] = {}  # in the order the ranks finished: the first failure is the root cause
    lost: dict[int, str] = {}
    grace = config.get_seconds("interrupt-grace")
    stop_at: float | None = None
    kill_at: float | None = None
    stopped = False
    while len(done) < world:
        now = time.monotonic()
        if stop_at is None and deadline is not None and now > deadline:
            stopped, stop_at = True, now
        if stop_at is not None and now >= stop_at and kill_at is None:
            for r, s in enumerate(sessions):
                if r not in done:
                    conn.interrupt(s)
            kill_at = now + grace
        if kill_at is not None and now > kill_at:
            for r, s in enumerate(sessions):
                if r not in done:
                    conn.release(s, reason="stopped: another rank failed, or the run was interrupted")
                    done[r] = {"status": "killed"}
            break
        try:
            rank, msg = events.get(timeout=0.1)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            stopped = True
            if stop_at is None:
                stop_at = time.monotonic()
            else:
                kill_at = time.monotonic()  # a second interrupt: kill now
            continue
        if isinstance(msg, dict):
            if msg.get("op") == "lost":
                lost[rank] = conn.lease_end_reason(sessions[rank].id, wait=2.0)
                done[rank] = {"status": "lost", "reason": lost[rank]}
            else:
                done[rank] = msg
            failed = done[rank].get("status") != "ok"
            if failed and stop_at is None:  # the others would wait forever in a collective: stop them
                # a lost rank never comes back: stop now; after an error, give the others a moment to fail too
                stop_at = time.monotonic() + (0 if rank in lost else config.get_seconds("scaleout.error-grace"))
            continue
        for item in msg:
            _show(renderer, rank, item)
    return {"done": done, "lost": lost, "stopped": stopped}


def _show(renderer: CellRenderer, rank: int, item: dict) -> None:
    if rank == 0 or item.get("op") == "metrics":
        renderer.handle(item)
    elif item.get("op") == "stream":
        text = "".join(f"[rank {rank}] {line}" for line in item["text"].splitlines(keepends=True))
        renderer.handle({**item, "text": text})


async def _free_port(address: str, connection_args: dict | None = None) -> dict:
    """A free port on rank 0's host for the rendezvous, asked over the kernel's (TLS) comm to the session."""
    from distributed.core import rpc

    r = rpc(address, connection_args=connection_args)
    try:
        return await r.free_port()
    finally:
        await r.close_rpc()


def _state(outcome: dict) -> str:
    statuses = [d.get("status") for d in outcome["done"].values()]
    if all(s == "ok" for s in statuses):
        return "done"
    return "stopped" if outcome["stopped"] else "failed"


def first_failure(errors: dict[int, dict]) -> tuple[int, dict]:
    """The rank whose cell failed first, by when its code ended (``finished``), not by which reply came
    first: a rank that raises tears its process group down before it replies, so the others' collective
    errors ("connection closed by peer") can arrive before the exception that caused them."""
    order = list(errors)
    return min(errors.items(), key=lambda item: (item[1].get("finished", math.inf), order.index(item[0])))


def _finish(magics: Any, outcome: dict, sessions: list[RemoteSession], opts: Any) -> Any:
    __tracebackhide__ = True
    done = outcome["done"]
    first = done.get(0, {})
    errors = {r: d for r, d in done.items() if d.get("status") == "error"}
    if outcome["lost"]:
        rank, reason = next(iter(outcome["lost"].items()))
        raise SessionLost(f"Rank {rank}'s GPU session was lost ({reason}) and --retries {opts.retries} were used "
                          "up. Every rank was stopped and every lease freed.")
    if errors:
        rank, err = first_failure(errors)  # the others mostly follow from it (a collective losing a peer)
        others = [f"rank {r}: {d['error'].get('type', '').split('.')[-1]}: {d['error'].get('message', '')}"
                  for r, d in errors.items() if r != rank]
        exc = rebuild_exception(err["error"])
        if rank != 0 or others:
            try:
                exc.add_note(f"[jupyter-gpu] raised by rank {rank} of {len(sessions)}"
                             + (f"; also {'; '.join(others)}" if others else ""))
            except Exception:
                pass
        if outcome["stopped"] and opts.timeout:
            raise CellTimeout(f"--timeout {opts.timeout:g} s was reached: every rank was stopped and every "
                              "lease freed.") from exc
        raise exc
    if outcome["stopped"] or any(d.get("status") == "killed" for d in done.values()):
        message = "every rank was stopped and every lease freed (the ranks did not stop within the grace period)"
        if opts.timeout:
            raise CellTimeout(f"--timeout {opts.timeout:g} s was reached: {message}.")
        raise KeyboardInterrupt(f"The --workers run was interrupted: {message}.")
    return magics._finish(first, sessions[0], opts)
