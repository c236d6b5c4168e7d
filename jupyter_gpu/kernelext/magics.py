"""The ``%gpu`` line magics and the ``%%gpu`` cell magic.

A ``%%gpu`` cell: parse options, find inputs from the syntax tree and serialize them (refusing bad input
before anything waits), get this kernel's session (queueing with a live reason if the pool is busy), run
the cell there with output streamed back, then bring back what it assigned and re-raise what it raised.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import DisplayHandle

from jupyter_gpu.common import config
from jupyter_gpu.common.datacontract import RemoteObject, cell_names, input_item
from jupyter_gpu.common.rightsizing import RightSize, right_size
from jupyter_gpu.common.units import format_bytes
from jupyter_gpu.errors import CellTimeout, GpuPoolError
from jupyter_gpu.kernelext.connection import CellRun, PoolConnection, RemoteSession, raise_for_outcome, resolve_address
from jupyter_gpu.kernelext.jobs import AsyncJob
from jupyter_gpu.kernelext.options import USAGE, CellOptions, parse_cell_options
from jupyter_gpu.kernelext.rendering import CellRenderer, rebuild_exception, register_cell_source

log = logging.getLogger(__name__)

LINE_HELP = """%gpu connect [ADDRESS] [--keep]   join a pool (no address: JUPYTER_GPU_SCHEDULER or the embedded pool)
%gpu status                        the pool, my sessions, my quota
%gpu queue                         the queue, with the reason each item waits
%gpu cancel ID                     cancel my queued request, lease or --async job
%gpu scale N                       scale the pool to N workers (if allowed)
%gpu pull NAME                     bring a remote-only object back (as a CPU copy)
%gpu release                       end my remote session now (its variables are lost)

""" + USAGE


class RemoteDisplay:
    """A cell's last value that stayed remote: shown with the representation computed remotely."""

    def __init__(self, bundle: dict):
        self.bundle = bundle

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        return dict(self.bundle.get("data") or {}), dict(self.bundle.get("metadata") or {})


@magics_class
class GpuMagics(Magics):
    """``%gpu`` and ``%%gpu``; see ``%gpu?``."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self.conn: PoolConnection | None = None
        self.jobs: dict[str, AsyncJob] = {}
        self._job_ids = itertools.count(1)
        self.session_lock = threading.Lock()
        self.session_peaks: dict[str, int] = {}  # lease id -> the largest cell peak measured in that session

    # ------------------------------------------------------------------ entry
    @line_cell_magic
    def gpu(self, line: str, cell: str | None = None) -> Any:
        """Run this cell on a fraction of a GPU in the shared pool (``%%gpu``), or manage the pool (``%gpu``).

        %%gpu [--gpus F] [--memory SIZE] [--workers N] [--timeout S] [--priority interactive|batch]
              [--in a,b] [--out x,y] [--fresh] [--async] [--name TEXT]

        --gpus F      a fraction in (0, 1] of one GPU, or a whole number of GPUs (default: the pool's default)
        --memory SIZE ask by bytes on one GPU instead, e.g. 8GiB, 500MB
        --workers N   run on N GPUs at once with torch.distributed initialised
        --timeout S   stop the cell after S seconds (5min, 2h also work)
        --priority    interactive (default) or batch
        --in a,b      ship exactly these local variables (default: the free names the cell uses)
        --out x,y     bring back exactly these (default: plain data the cell assigns; the rest stays remote)
        --fresh       run in a throwaway session, released after the cell
        --async       return a handle at once; the cell runs in the background
        --name TEXT   a label for the panel and the queue

        Line magics: connect, status, queue, cancel, scale, pull, release (see %gpu help).
        """
        __tracebackhide__ = True
        if cell is None:
            return self._line(line)
        return self._cell(line, cell)

    # ------------------------------------------------------------------ connection
    def connect(self, address: str | None = None, keep: bool = False, quiet: bool = False) -> PoolConnection:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        resolved, embedded = resolve_address(address, keep=keep)
        from jupyter_gpu.pool.discovery import address_reachable

        if not address_reachable(resolved, timeout=5):
            raise GpuPoolError(f"Could not reach the GPU pool at {resolved}: nothing answers there. Check the "
                               "address (the scheduler that `jupyter-gpu pool up` printed) and that this machine "
                               "can reach it; `%gpu connect` with no address uses an embedded pool on this "
                               "machine.")
        try:
            self.conn = PoolConnection(resolved, embedded)
        except OSError as exc:
            raise GpuPoolError(f"Could not reach the GPU pool at {resolved}: {exc}. Check the address (the "
                               "scheduler that `jupyter-gpu pool up` printed) and that this machine can reach "
                               "it; `%gpu connect` with no address uses an embedded pool on this machine.") from None
        if not quiet:
            snap = self.conn.scheduler_call("gpu_snapshot")
            kind = "embedded pool" if embedded else "pool"
            print(f"Connected to the {kind} at {resolved}: {len(snap['gpus'])} GPU(s)"
                  + (" (virtual)" if snap["pool"].get("virtual") else "") + f", user {self.conn.user}.")
        return self.conn

    def _ensure_connection(self) -> PoolConnection:
        if self.conn is None:
            self.connect(quiet=True)
        return self.conn

    # ------------------------------------------------------------------ line magics
    def _line(self, line: str) -> Any:
        parts = line.split()
        if not parts or parts[0] in ("help", "-h", "--help"):
            print(LINE_HELP)
            return None
        cmd, args = parts[0], parts[1:]
        handler = getattr(self, f"_cmd_{cmd}", None)
        if handler is None:
            raise UsageError(f"%gpu {cmd}: unknown command. Commands: connect, status, queue, cancel, scale, "
                             "pull, release. Run `%gpu help` for their arguments; `%%gpu` (two %) on the first "
                             "line of a cell runs the cell on a GPU.")
        return handler(args)

    def _cmd_connect(self, args: list[str]) -> None:
        keep = "--keep" in args
        rest = [a for a in args if a != "--keep"]
        if len(rest) > 1 or any(a.startswith("-") for a in rest):
            raise UsageError("%gpu connect takes at most one address, e.g. `%gpu connect tcp://10.0.0.5:8786`, "
                             "and the flag --keep (keep the embedded pool up across kernel restarts).")
        self.connect(rest[0] if rest else None, keep=keep)

    def _cmd_status(self, args: list[str]) -> Any:
        from jupyter_gpu.kernelext.status_view import StatusView

        conn = self._ensure_connection()
        snap = conn.scheduler_call("gpu_snapshot")
        return StatusView(snap, conn.user, conn.kernel, self.jobs, conn.session, conn.address)

    def _cmd_queue(self, args: list[str]) -> Any:
        from jupyter_gpu.kernelext.status_view import QueueView

        conn = self._ensure_connection()
        return QueueView(conn.scheduler_call("gpu_snapshot"), conn.user)

    def _cmd_cancel(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("%gpu cancel ID: give one id from `%gpu queue` or `%gpu status` (R.. for a queued "
                             "request, L.. for a lease, J.. for an --async job).")
        target = args[0]
        if target in self.jobs:
            self.jobs[target].cancel()
            print(f"Cancelling --async job {target}.")
            return
        conn = self._ensure_connection()
        reply = conn.scheduler_call("gpu_cancel", id=target, user=conn.user)
        if not reply.get("cancelled"):
            raise UsageError(f"%gpu cancel {target}: {reply.get('what')}.")
        if conn.session is not None and conn.session.id == target:
            conn.session = None
        print(f"Cancelled {reply['what']}.")

    def _cmd_scale(self, args: list[str]) -> None:
        if len(args) != 1 or not args[0].isdigit() or int(args[0]) < 1:
            raise UsageError("%gpu scale N: give the number of workers the pool should have, e.g. `%gpu scale 3`.")
        conn = self._ensure_connection()
        reply = conn.scheduler_call("gpu_scale", n=int(args[0]), user=conn.user)
        if reply.get("error"):
            raise UsageError(f"%gpu scale: {reply['error']}")
        print(f"The pool now has {reply['workers']} worker(s).")

    def _cmd_pull(self, args: list[str]) -> None:
        if len(args) != 1 or not args[0].isidentifier():
            raise UsageError("%gpu pull NAME: give the name of one variable that lives in your GPU session.")
        name = args[0]
        conn = self._ensure_connection()
        self.shell.user_ns[name] = conn.pull(name)
        print(f"{name} is now a local copy ({type(self.shell.user_ns[name]).__name__}).")

    def _cmd_release(self, args: list[str]) -> None:
        if self.conn is None or self.conn.session is None:
            print("This kernel holds no GPU session.")
            return
        lease = self.conn.session.id
        self.conn.release()
        print(f"Released your GPU session (lease {lease}); the next %%gpu cell starts a new one.")

    # ------------------------------------------------------------------ the cell magic
    def _cell(self, line: str, cell: str) -> Any:
        __tracebackhide__ = True
        opts = parse_cell_options(line)
        if opts.spec.workers > 1:
            from jupyter_gpu.kernelext.scaleout import run_scaleout

            return run_scaleout(self, opts, cell)
        conn = self._ensure_connection()
        count = cell_number(self.shell)
        cell_name = f"<%%gpu cell In[{count}]>"
        register_cell_source(cell_name, cell)
        label = opts.name or _label(count, cell)
        inputs, remote_refs, outputs = self._prepare(opts, cell)
        from jupyter_gpu.kernelext.scaleout import checkpoint_dir_for, run_key

        payload = {"code": cell, "inputs": inputs, "outputs": outputs, "exact_outputs": opts.outputs is not None,
                   "cell_name": cell_name, "label": label, "max_bytes": config.get_bytes("output-max-bytes"),
                   "checkpoint_dir": checkpoint_dir_for(conn, run_key(conn, opts.name, cell))}
        if opts.run_async:
            return self._start_async(conn, opts, payload, remote_refs, label)
        deadline = time.monotonic() + opts.timeout if opts.timeout else None
        renderer = CellRenderer()
        badge = StatusLine()
        with self._session_turn(deadline):
            try:
                session = self._session(conn, opts, label, deadline, badge)
            except BaseException as exc:  # cancelled, refused, timed out or interrupted while queued
                badge.not_started(exc)
                raise
            badge.running(session)
            try:
                done, session = self._run(conn, session, opts, payload, remote_refs, renderer.handle, deadline)
            except BaseException as exc:
                badge.finished(session, f"{type(exc).__name__}")
                raise
            finally:
                renderer.close()
                if session.fresh:
                    conn.release(session, reason="--fresh cell finished")
        err = done.get("error") or {}
        badge.finished(session, None if done.get("status") == "ok" else err.get("type", "error").split(".")[-1],
                       done.get("elapsed"), done.get("peak_bytes"), self._right_size(session, done))
        return self._finish(done, session, opts)

    def _right_size(self, session: RemoteSession, done: dict) -> RightSize | None:
        """Far more reserved than the session ever used? Then the badge says what to ask next time."""
        peak = done.get("peak_bytes")
        if peak is None:
            return None
        peak = self.session_peaks[session.id] = max(self.session_peaks.get(session.id, 0), int(peak))
        return right_size(peak, session.lease.get("bytes"))

    def _prepare(self, opts: CellOptions, cell: str) -> tuple[dict, dict, list[str]]:
        """Serialize the inputs now, so a bad one is refused before anything waits."""
        from distributed.protocol import serialize
        from distributed.protocol.serialize import Serialized

        ns = self.shell.user_ns
        free, assigned = cell_names(cell)
        if opts.inputs is not None:
            missing = [n for n in opts.inputs if n not in ns]
            if missing:
                raise UsageError(f"%%gpu --in: no variable named {', '.join(map(repr, missing))} exists in this "
                                 "kernel. List variables that exist here (or leave --in out to send the ones the "
                                 "cell uses).")
            names = opts.inputs
        else:
            names = [n for n in free if n in ns and not n.startswith("_")]
        inputs: dict[str, Any] = {}
        remote_refs: dict[str, RemoteObject] = {}
        for name in names:
            value = ns[name]
            if isinstance(value, RemoteObject):
                remote_refs[name] = value
                continue
            try:
                header, frames = serialize(input_item(value), serializers=("dask", "pickle"), on_error="raise")
            except Exception as exc:
                raise UsageError(
                    f"%%gpu: the input {name!r} ({type(value).__module__}.{type(value).__qualname__}) cannot be "
                    f"sent to the GPU session: it cannot be pickled ({type(exc).__name__}: {exc}). Create it "
                    f"inside the %%gpu cell instead, or leave it out by listing the names the cell needs with "
                    f"--in (e.g. --in {','.join(n for n in names if n != name) or 'x'}).") from None
            inputs[name] = Serialized(header, frames)
        outputs = opts.outputs if opts.outputs is not None else assigned
        return inputs, remote_refs, outputs

    def _session_turn(self, deadline: float | None):
        """This kernel's session runs one cell at a time: wait (visibly) for a running --async job."""
        magics = self

        class Turn:
            def __enter__(self) -> None:
                if magics.session_lock.acquire(blocking=False):
                    return
                busy = [j.id for j in magics.jobs.values() if not j.done()]
                print(f"Waiting for your running --async job {', '.join(busy) or ''} to finish "
                      "(interrupt to stop waiting; --fresh runs a cell in a separate session).")
                while not magics.session_lock.acquire(timeout=0.2):
                    if deadline is not None and time.monotonic() > deadline:
                        raise CellTimeout("--timeout ran out while waiting for your --async job to finish")

            def __exit__(self, *exc: Any) -> None:
                magics.session_lock.release()

        return Turn()

    def _session(self, conn: PoolConnection, opts: CellOptions, label: str, deadline: float | None,
                 status: StatusLine, restore: str | None = None) -> RemoteSession:
        """This kernel's session (or a fresh one), checking that it is big enough for this cell."""
        spec = opts.spec
        if conn.session is not None and not opts.fresh and opts.explicit_request:
            have = conn.session.lease
            if not _fits_lease(spec, have):
                raise UsageError(
                    f"%%gpu: your GPU session holds {have['fraction']:g} of a GPU ({format_bytes(have['bytes'])}, "
                    f"lease {have['id']}) and this cell asks for {spec.describe()}. A session keeps its lease for "
                    "its life: run `%gpu release` and rerun this cell to start a bigger session (the session's "
                    "variables are lost), or add --fresh to run only this cell in a separate session.")
        new = conn.session is None or opts.fresh
        session = conn.ensure_session(spec.__dict__, _notebook(), label, status.waiting, deadline, fresh=opts.fresh,
                                      restore=restore)
        if new:
            status.started(session, conn)
        return session

    def _run(self, conn: PoolConnection, session: RemoteSession, opts: CellOptions, payload: dict,
             remote_refs: dict, handle: Any, deadline: float | None, cancel: Any = None
             ) -> tuple[dict, RemoteSession]:
        """Run the cell; returns its outcome and the session it finally ran in (a new one when the old
        session had ended between cells, or when a preempted batch cell was requeued)."""
        self._check_remote_refs(session, remote_refs)
        payload = {**payload, "cwd": os.getcwd()}
        label = payload.get("label") or ""
        done = CellRun(conn, session, handle, deadline, opts.timeout, cancel=cancel).run(payload)
        if done.get("status") == "lost" and not done.get("started", True) and not session.fresh:
            # the session ended between cells: say why, and run this cell in a new one (with the old one's
            # variables when the pool moved them to host memory)
            ended = self._ended_lease(conn, session, wait=0.5)
            reason = ended.get("end_reason") or "the session process stopped answering"
            conn.session = None
            offload = ended.get("offload") or {}
            if offload.get("state") == "saved":
                print(f"Your previous GPU session (lease {session.id}) ended: {reason}. Starting a new one with "
                      "its variables.", flush=True)
                session = self._session(conn, opts, label, deadline, StatusLine(), restore=session.id)
                print(_restored_text(session, offload), flush=True)
            else:
                print(f"Your previous GPU session (lease {session.id}) ended: {reason}. Starting a new one; "
                      "the variables that lived there are gone.")
                session = self._session(conn, opts, label, deadline, StatusLine())
            self._check_remote_refs(session, remote_refs)
            done = CellRun(conn, session, handle, deadline, opts.timeout, cancel=cancel).run(payload)
        attempt = 0
        while done.get("status") == "lost" and opts.spec.priority == "batch" and attempt < opts.retries:
            # batch cells are retryable: preempted (not crashed), the cell is requeued and reruns from its start
            ended = self._ended_lease(conn, session)
            if not ended.get("preempted"):
                break
            attempt += 1
            if conn.session is session:
                conn.session = None
            conn.ended_sessions[session.id] = ended.get("end_reason") or "preempted"
            print(f"This batch cell was preempted (lease {session.id}): {ended.get('end_reason')}. Requeued "
                  f"(retry {attempt} of --retries {opts.retries}): it reruns from its start in a new session "
                  "when the pool has room; the variables of the old session are gone.", flush=True)
            session = self._session(conn, opts, label, deadline, StatusLine())
            try:
                self._check_remote_refs(session, remote_refs)
                done = CellRun(conn, session, handle, deadline, opts.timeout, cancel=cancel).run(payload)
            except BaseException:
                if session.fresh:  # the caller only knows the first session: free the requeued one here
                    conn.release(session, reason="--fresh cell finished")
                raise
        raise_for_outcome(done, conn, session, opts.timeout)
        return done, session

    @staticmethod
    def _ended_lease(conn: PoolConnection, session: RemoteSession, wait: float = 3.0) -> dict:
        """The broker's record of a lease that just ended (waiting briefly for the worker's report)."""
        deadline = time.monotonic() + wait
        offload_deadline = time.monotonic() + config.get_seconds("offload-timeout") + 5
        while True:
            info = conn.scheduler_call("gpu_lease_info", lease=session.id)
            pending = (info.get("offload") or {}).get("state") == "pending"  # its variables are being saved
            if (info.get("state") == "ended" and not pending) or time.monotonic() > (
                    offload_deadline if pending else deadline):
                return info
            time.sleep(0.1)

    def _check_remote_refs(self, session: RemoteSession, remote_refs: dict[str, RemoteObject]) -> None:
        alive = self.conn.lineage(session.id) if self.conn else {session.id}
        stale = {n: r for n, r in remote_refs.items() if r.lease and r.lease not in alive}
        if stale:
            name, ref = next(iter(stale.items()))
            reason = (self.conn.ended_sessions.get(ref.lease) if self.conn else None) or "that session has ended"
            raise GpuPoolError(
                f"{name!r} lived in an earlier GPU session (lease {ref.lease}) and is gone: {reason}. Rerun the "
                "cell that created it (in a %%gpu cell), or bring such objects back first with --out / %gpu pull.")

    def _finish(self, done: dict, session: RemoteSession, opts: CellOptions) -> Any:
        __tracebackhide__ = True
        from distributed.protocol import deserialize

        ns = self.shell.user_ns
        for name, item in (done.get("outputs") or {}).items():
            if item.get("kind") == "value":
                try:
                    ns[name] = deserialize(item["data"].header, item["data"].frames)
                    continue
                except Exception as exc:
                    item = {"kind": "remote", "type_name": "object", "summary": "",
                            "reason": f"it could not be rebuilt in this kernel ({type(exc).__name__}: {exc})",
                            "lease": session.id}
            ns[name] = RemoteObject(name=name, type_name=item.get("type_name", "object"),
                                    summary=item.get("summary", ""), nbytes=item.get("nbytes"),
                                    device=item.get("device"), reason=item.get("reason", ""),
                                    lease=item.get("lease"))
        if done.get("status") == "error":
            exc = rebuild_exception(done["error"])
            if done.get("timed_out"):
                raise CellTimeout(f"--timeout {opts.timeout:g} s was reached: the cell was interrupted (its "
                                  "session and its variables are kept).") from exc
            raise exc
        result = done.get("result")
        if not result:
            return None
        if result.get("value") is not None:
            try:
                return deserialize(result["value"].header, result["value"].frames)
            except Exception:
                pass
        return RemoteDisplay(result["bundle"])

    # ------------------------------------------------------------------ --async
    def _start_async(self, conn: PoolConnection, opts: CellOptions, payload: dict, remote_refs: dict,
                     label: str) -> AsyncJob:
        job = AsyncJob(f"J{next(self._job_ids)}", label)
        self.jobs[job.id] = job
        deadline = time.monotonic() + opts.timeout if opts.timeout else None
        job.show()

        def runner() -> None:
            try:
                while not self.session_lock.acquire(timeout=0.2):
                    if job.cancel_requested.is_set():
                        raise KeyboardInterrupt("cancelled before it started")
                try:
                    job.set_state("queued", "waiting for a GPU")
                    status = _JobStatus(job)
                    session = self._session(conn, opts, label, deadline, status)
                    job.set_state("running", session.describe())
                    done, session = self._run(conn, session, opts, payload, remote_refs, job.handle, deadline,
                                     cancel=job.cancel_requested.is_set)
                    try:
                        value = self._finish(done, session, opts)
                    finally:
                        if session.fresh:
                            conn.release(session, reason="--fresh cell finished")
                finally:
                    self.session_lock.release()
                job.outputs = {n: self.shell.user_ns.get(n) for n in (done.get("outputs") or {})}
                job.finish(value)
            except BaseException as exc:  # delivered through the handle, never lost
                job.finish(error=exc)

        threading.Thread(target=runner, daemon=True, name=f"jupyter-gpu-{job.id}").start()
        return job


class StatusLine:
    """The cell's badge: queued (position, reason, estimated start) -> running on GPU n (share) -> done or
    failed. One display, updated in place, so it is also what a headless run records."""

    def __init__(self) -> None:
        self.handle: DisplayHandle | None = None
        self.waited_since: float | None = None
        self.new_session: RemoteSession | None = None

    def waiting(self, status: dict) -> None:
        if status["state"] != "queued":
            return
        if self.waited_since is None:
            self.waited_since = time.monotonic()
        pos = status.get("position")
        text = (f"queued ({status['id']}, {status.get('request')}): position {pos} of "
                f"{status.get('queue_length')}, {status.get('reason')}")
        if status.get("eta"):
            text += f", estimated start in {max(0, status['eta'] - time.time()):.0f} s"
        text += f" [{time.monotonic() - self.waited_since:.0f} s]"
        self._show(text, "queued", None)

    def started(self, session: RemoteSession, conn: PoolConnection) -> None:
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
        self._show(f"not started ({why})", "failed", None)

    def running(self, session: RemoteSession) -> None:
        waited = f" after {time.monotonic() - self.waited_since:.1f} s in the queue" if self.waited_since else ""
        new = f" (new session{waited})" if self.new_session is session else ""
        self._show(f"running on {_where(session)}{new}", "running", session)

    def finished(self, session: RemoteSession, error: str | None, elapsed: float | None = None,
                 peak: int | None = None, sizing: RightSize | None = None) -> None:
        took = f" in {elapsed:.2f} s" if elapsed is not None else ""
        peak_text = f", peak {format_bytes(peak)}" if peak else ""
        hint = f". Right-size: {sizing.hint()}" if sizing is not None else ""
        if error is None:
            self._show(f"done{took} on {_where(session)}{peak_text}{hint}", "done", session)
        else:
            self._show(f"failed ({error}){took} on {_where(session)}", "failed", session)

    def _show(self, text: str, state: str, session: RemoteSession | None) -> None:
        bundle = {"text/plain": f"%%gpu {text}"}
        meta = {"jupyter-gpu": {"state": state, "lease": session.id if session else None}}
        if self.handle is None:
            self.handle = DisplayHandle()
            self.handle.display(bundle, metadata=meta, raw=True)
        else:
            self.handle.update(bundle, metadata=meta, raw=True)


def _restored_text(session: RemoteSession, offload: dict) -> str:
    """What came back from host memory, and what did not (by name, with why)."""
    restored = session.restored
    if restored is None:
        return ("Its variables could not be restored: the worker that kept them has left the pool, so they are "
                "gone. Rerun the cells that built them.")
    names = list(restored.get("restored") or ())
    text = f"Restored {len(names)} variable(s) from host memory" + (f": {', '.join(names[:12])}" if names else "")
    text += "." if len(names) <= 12 else f", and {len(names) - 12} more."
    gone = [f"{x['name']} ({x.get('type') or x.get('why', '')})" for x in
            [*(offload.get("lost") or ()), *(restored.get("failed") or ())]]
    if gone:
        text += (f" Not restored (they could not be moved to host memory): {', '.join(gone)}. Rerun the cells "
                 "that made them.")
    return text


def _where(session: RemoteSession) -> str:
    lease = session.lease
    names = ", ".join(lease.get("gpu_names") or [f"GPU {i}" for i in lease.get("gpu_indices", ())])
    return f"{names} ({lease['fraction']:g} of a GPU, lease {session.id}, isolation {lease.get('isolation', 'none')})"


class _JobStatus(StatusLine):
    def __init__(self, job: AsyncJob):
        super().__init__()
        self.job = job

    def _show(self, text: str, state: str = "", session: RemoteSession | None = None) -> None:
        self.job.set_state(self.job.state, text)


def _fits_lease(spec: Any, lease: dict) -> bool:
    if spec.gpus is not None:
        return len(lease.get("gpu_indices") or ()) >= spec.gpus and lease["fraction"] >= spec.gpus - 1e-9
    if spec.memory is not None:
        return lease["bytes"] >= spec.memory
    return lease["fraction"] + 1e-9 >= spec.fraction


def cell_number(shell: Any) -> int:
    """The In[n] number of the running cell. IPython 9 counts the running cell before running it (so
    ``execution_count`` is already n + 1 inside it); IPython 8 counts it afterwards."""
    import IPython

    return shell.execution_count - (1 if IPython.version_info[0] >= 9 else 0)


def _label(count: int, cell: str) -> str:
    first = next((ln.strip() for ln in cell.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
    return f"In[{count}] {first[:60]}"


def _notebook() -> str | None:
    """The notebook this kernel serves (Jupyter Server sets JPY_SESSION_NAME for its kernels)."""
    return os.environ.get("JPY_SESSION_NAME")


_magics: GpuMagics | None = None


def _show_pool_error(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> list[str]:
    """Pool errors are messages for the user, not bugs: show the message (and the remote part, where the
    cell was when it was stopped), not jupyter-gpu's own frames."""
    stb: list[str] = []
    cause = value.__cause__
    if cause is not None and not isinstance(cause, GpuPoolError) and cause.__traceback__ is not None:
        try:
            stb = list(shell.InteractiveTB.structured_traceback(type(cause), cause, cause.__traceback__,
                                                                tb_offset=0))
            stb.append("\nThe remote code above was stopped:")
        except Exception:
            stb = []
    stb.append(f"\x1b[0;31m{etype.__name__}\x1b[0m: {value}")
    shell._showtraceback(etype, value, stb)
    return stb


def load(ipython: Any) -> None:
    global _magics
    _magics = GpuMagics(ipython)
    ipython.register_magics(_magics)
    ipython.set_custom_exc((GpuPoolError,), _show_pool_error)


def unload(ipython: Any) -> None:
    global _magics
    if _magics is not None and _magics.conn is not None:
        _magics.conn.close()
    ipython.set_custom_exc((), None)
    _magics = None
