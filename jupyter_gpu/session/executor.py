"""The session's main thread: the user's namespace, and the work the kernel sends to it.

User code runs here, in the main thread, so that SIGINT (the kernel's interrupt) raises
KeyboardInterrupt in the running cell. The I/O thread (``server.py``) only queues ``Job``s; this
thread runs them one at a time: assign a lease, execute a cell, pull a variable, offload or restore
the variables. While it has nothing to do and has been idle long enough it writes its standby copy
(``standby.py``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import queue
import sys
import threading
import time
from typing import Any

from jupyter_gpu.common import local_transfer
from jupyter_gpu.common.protocol import OutputMsg, PullReply
from jupyter_gpu.common.refusals import CallError, Failed, NotPossible
from jupyter_gpu.session import sendback, tqdm_bridge
from jupyter_gpu.session.memory_meter import CellMemoryMeter
from jupyter_gpu.session.output import Relay
from jupyter_gpu.session.progress import ProgressLink
from jupyter_gpu.session.standby import StandbyCopy
from jupyter_gpu.session.tracebacks import error_payload, pool_error
from jupyter_gpu.session.worker_link import WorkerLink

log = logging.getLogger("jupyter_gpu.session")


class Job:
    """Work for the main thread; ``reply`` is resolved on the I/O loop, ``messages`` stream
    meanwhile."""

    def __init__(self, kind: str, loop: asyncio.AbstractEventLoop, **kwargs: Any):
        self.kind, self.loop, self.kwargs = kind, loop, kwargs
        self.reply: asyncio.Future = loop.create_future()
        self.messages: asyncio.Queue = asyncio.Queue()

    def emit(self, msg: OutputMsg) -> None:
        self.loop.call_soon_threadsafe(self.messages.put_nowait, msg)

    def finish(self, value: Any) -> None:
        def _set() -> None:
            if not self.reply.done():
                self.reply.set_result(value)

        self.loop.call_soon_threadsafe(_set)

    def fail(self, exc: CallError) -> None:
        """The job is refused or failed: the handler waiting for it raises ``exc`` (its caller gets
        it in Dask's error envelope)."""

        def _set() -> None:
            if not self.reply.done():
                self.reply.set_exception(exc)

        self.loop.call_soon_threadsafe(_set)


class Executor:
    """Runs the session's jobs in the main thread; see the module docstring."""

    def __init__(self, relay: Relay, capture: Any, shell: Any, link: WorkerLink):
        self.relay, self.capture, self.shell, self.link = relay, capture, shell, link
        # inputs read from the kernel's pipes land in these; given back to the OS once idle for
        # TRIM_AFTER s
        self.input_buffers = local_transfer.ReceiveBuffers()
        self._trim_at: float | None = None
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.lease: dict | None = None
        self.gpus: list[dict] = []
        self.isolation = "none"
        self.meter: CellMemoryMeter | None = None  # set when a lease is assigned
        self.busy = False
        # busy and interrupt_pending change together (server.h_interrupt)
        self.interrupt_lock = threading.Lock()
        # an interrupt that came before the cell reached the main thread
        self.interrupt_pending = False
        self.retired = False  # its variables were offloaded: it runs no more cells
        # its variables' copy in host memory while idle (standby.py)
        self.standby = StandbyCopy(None, None)
        self._after_reply: dict | None = None
        self._cwd_refused: str | None = None
        self.virtual = False
        self.vdev: Any = None  # VirtualDevice, on a virtual GPU once torch is used
        # the listening socket of the next --workers run's rendezvous store (server.free_port)
        self.rendezvous: Any = None

    # ------------------------------------------------------------------ the loop
    def run_forever(self) -> None:
        while True:
            due = self.standby.due_in() if not self.retired else None
            if self._trim_at is not None:
                trim_in = max(0.0, self._trim_at - time.monotonic())
                due = trim_in if due is None else min(due, trim_in)
            try:
                job = self.jobs.get() if due is None else self.jobs.get(timeout=due)
            # idle long enough: give back spare input buffers, write the standby copy
            except queue.Empty:
                if self._trim_at is not None and time.monotonic() >= self._trim_at:
                    self._trim_at = None
                    self.input_buffers.trim()
                    continue
                self._take_standby_copy()
                continue
            except KeyboardInterrupt:  # an interrupt that arrived just after a cell ended
                continue
            self._run(job)
            self.standby.idle()
            self._trim_at = time.monotonic() + TRIM_AFTER
            after, self._after_reply = self._after_reply, None
            if after:
                self._tell_idle(**after)

    def _run(self, job: Job) -> None:
        """One job, answered: its result, or (but for a cell, whose failure is its outcome) the
        refusal or failure its handler raises."""
        try:
            result = getattr(self, f"do_{job.kind}")(job, **job.kwargs)
        except CallError as exc:
            job.fail(exc)
            return
        except KeyboardInterrupt:
            result = {"status": "error", "error": error_payload(KeyboardInterrupt(), None)}
        except BaseException as exc:
            log.exception("session job %s failed", job.kind)
            if job.kind != "execute":
                job.fail(Failed(f"{type(exc).__name__}: {exc}"))
                return
            result = {"status": "error", "error": error_payload(exc, None)}
        finally:
            self.busy = False
            self.relay.end()
        job.finish(result)

    def _tell_idle(self, heard_running: bool, **fields: Any) -> None:
        """The cell is over: tell the broker "idle" with what it measured. At once when the
        broker had heard "running"; otherwise (a quick cell: the broker still thinks the session
        idle) within IDLE_NOTE s, merged with the notes of the quick cells after it, so a loop of
        warm cells costs the worker and the broker a message or so per IDLE_NOTE instead of one
        per cell."""
        if heard_running:
            self.link.tell_lease_state(**fields)
        else:
            self.link.tell_coalesced(IDLE_NOTE, "lease_state", merge_idle_notes, **fields)

    def _work_waiting(self) -> bool:
        """Whether a job other than an offload is queued: a standby copy then stops for it (an
        offload instead waits for the copy, which it hands over)."""
        with self.jobs.mutex:
            return any(job.kind != "offload" for job in self.jobs.queue)

    def _take_standby_copy(self) -> None:
        expected = self.meter.resident() if self.meter is not None else None
        try:
            self.standby.take(
                self.shell.user_ns, self.shell.user_ns_hidden, expected, self._work_waiting
            )
        except KeyboardInterrupt:  # an interrupt meant for a cell that had just ended
            pass

    def take_rendezvous(self, sock: Any) -> None:
        """The socket ``free_port`` made, for the next run's rank 0 (an earlier one is closed)."""
        old, self.rendezvous = self.rendezvous, sock
        if old is not None:
            old.close()

    # ------------------------------------------------------------------ jobs
    def do_assign(
        self,
        job: Job,
        lease: dict,
        gpus: list[dict],
        env: dict,
        standby: dict | None = None,
        memory_rlimit: int | None = None,
    ) -> dict:
        from jupyter_gpu.session import api as session_api
        from jupyter_gpu.session.isolation import apply_memory_cap, pin_environment

        if self.lease is not None:
            raise NotPossible(f"this session already holds lease {self.lease['id']}")
        os.environ.update(pin_environment(lease, gpus))
        os.environ.update(env)
        self.lease, self.gpus = lease, gpus
        self.isolation = apply_memory_cap(lease, gpus)
        if memory_rlimit:  # the worker has no cgroup to put this session in: cap its data instead
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, (memory_rlimit, memory_rlimit))
        if standby:
            self.standby = StandbyCopy(standby.get("path"), standby.get("after"))
        virtual = all(g.get("virtual") for g in gpus)
        self.virtual = virtual
        tqdm_bridge.install()  # tqdm bars in cells report as the cell's progress bar
        if virtual and "torch" in sys.modules:
            # the device marks' machinery (virtual_device.py), not the user's memory
            self._virtual_device()
        # measured from here: what the session holds before its first cell is not the user's data
        self.meter = CellMemoryMeter(virtual, [g["uuid"] for g in gpus if not g.get("virtual")])
        session_api._state.update(
            {
                "rank": lease.get("rank", 0),
                "world_size": lease.get("world_size", 1),
                "device": "cpu" if virtual else "cuda:0",
                "lease": lease["id"],
                "emit": self.relay.emit,
                "device_factory": self._virtual_device if virtual else None,
            }
        )
        log.info(
            "session %d assigned lease %s on %s (isolation %s)",
            os.getpid(),
            lease["id"],
            [g["uuid"] for g in gpus],
            self.isolation,
        )
        return {"isolation": self.isolation, "pid": os.getpid()}

    def do_execute(
        self,
        job: Job,
        code: str,
        inputs: dict,
        outputs: list[str],
        exact_outputs: bool,
        cell_name: str,
        label: str | None,
        max_bytes: int,
        cwd: str | None,
        dist: dict | None = None,
        checkpoint_dir: str | None = None,
    ) -> dict:
        from jupyter_gpu.session import api as session_api

        started = time.time()
        if self.retired:
            return {"status": "retired"}
        note = enter_folder(cwd, self._cwd_refused)
        if note is not None:  # a folder this session may not enter: said once
            self._cwd_refused = cwd
            job.emit({"op": "stream", "name": "stderr", "text": note})
        # checkpoint()/restore() of this cell: per user, kernel and cell, so no other run's state is
        # restored
        session_api._state["checkpoint_dir"] = checkpoint_dir
        self.standby.changed()  # the copy is of the namespace before this cell: stale from here on
        self.relay.begin(job.emit)
        with self.interrupt_lock:
            self.busy = True
            stop, self.interrupt_pending = self.interrupt_pending, False
        # interrupted on its way here: it does not start (the session and its variables stay)
        if stop:
            raise KeyboardInterrupt("interrupted before the cell started")
        if dist is None:
            return self._execute(
                code, inputs, outputs, exact_outputs, cell_name, label, max_bytes, started
            )
        from jupyter_gpu.session.distributed_rank import DistributedRun

        listen, self.rendezvous = self.rendezvous, None
        run = DistributedRun(dist, self.gpus, self.link, listen if dist.get("rank") == 0 else None)
        try:
            inputs = run.start(inputs)
        except Exception as exc:  # noqa: BLE001 - any failure to join the run is the cell's error
            run.stop()
            return {"status": "error", "error": pool_error(str(exc))}
        reply: dict | None = None
        try:
            reply = self._execute(
                code, inputs, outputs, exact_outputs, cell_name, label, max_bytes, started
            )
            return reply
        finally:  # the process group is torn down whatever happened in the cell
            run.stop(clean=reply is not None and reply.get("status") == "ok")

    def _execute(
        self,
        code: str,
        inputs: dict,
        outputs: list[str],
        exact_outputs: bool,
        cell_name: str,
        label: str | None,
        max_bytes: int,
        started: float,
    ) -> dict:
        from distributed.protocol import deserialize

        from jupyter_gpu.common.datacontract import ModuleRef
        from jupyter_gpu.session import api as session_api

        ns = self.shell.user_ns
        replaced = []
        for name, item in inputs.items():
            try:
                value = deserialize(item.header, item.frames) if hasattr(item, "frames") else item
                if isinstance(value, ModuleRef):
                    value = importlib.import_module(value.name)
                if name in ns:
                    replaced.append(ns[name])
                ns[name] = value
            except Exception as exc:  # noqa: BLE001 - unpickling and imports run any code: the cell's error
                return {
                    "status": "error",
                    "error": pool_error(
                        f"The input '{name}' could not be rebuilt in the GPU session "
                        f"({type(exc).__name__}: {exc}). "
                        "Install what it needs on the pool's workers, create it inside the cell "
                        "instead, or leave it "
                        "out with --in."
                    ),
                }
        let_go(replaced)  # freeing last cell's copy of a large input can take as long as sending it
        del replaced
        # the broker hears "running" only from a cell still running after RUNNING_NOTE s; a shorter
        # one is reported once, idle with its measurements, after its reply (a warm no-op cell: no
        # extra message)
        running_note = self.link.tell_later(
            RUNNING_NOTE, "lease_state", state="running", cell=label
        )
        # step/total on to the broker
        session_api._state["progress"] = ProgressLink(self.link, label)
        if self.virtual and "torch" in sys.modules:
            # mark what the cell puts on jupyter_gpu.device(), as a GPU would keep it (set up before
            # the cell's memory is measured: the marking's own objects are not the cell's)
            self._virtual_device()
        meter = self.meter or CellMemoryMeter(virtual=False)
        meter.start()
        self.shell.displayhook.reset()
        self.shell.compile.next_name = cell_name
        try:
            result = self.shell.run_cell(code, store_history=True)
        finally:
            heard_running = running_note is not None and not self.link.cancel(running_note)
            session_api._state["progress"] = None
            if self.vdev is not None:
                self.vdev.end_cell()
            self.relay.flush_streams()
            self.capture.sync()
            self.relay.finish_cell()
        peak, utilization = meter.stop()
        # ``finished``: when the cell's code ended, so that of several failed ranks the first to
        # fail is named (replies can arrive in any order: a failed rank tears its process group down
        # before it replies)
        finished = time.time()
        reply: dict[str, Any] = {
            "elapsed": finished - started,
            "finished": finished,
            "peak_bytes": peak,
            "gpu_utilization": utilization,
            "execution_count": self.shell.execution_count,
        }
        error = result.error_before_exec or result.error_in_exec
        if error is not None:
            reply["status"] = "error"
            reply["error"] = error_payload(error, cell_name, lease=self.lease)
        else:
            reply["status"] = "ok"
        lease_id = (self.lease or {}).get("id")
        ns = self.shell.user_ns
        reply["outputs"] = sendback.outputs(ns, outputs, exact_outputs, max_bytes, lease_id)
        reply["result"] = (
            sendback.last_value(self.shell.displayhook, max_bytes) if not error else None
        )
        # told once the reply is on its way
        self._after_reply = {
            "heard_running": heard_running,
            "state": "idle",
            "peak_bytes": peak,
            "gpu_utilization": utilization,
            "resident_bytes": meter.resident(),
        }
        return reply

    def _virtual_device(self) -> Any:
        """``jupyter_gpu.device()`` on a virtual GPU: the device whose tensors stay in the session,
        marked from the moment a cell runs (``session/virtual_device.py``)."""
        if self.vdev is None:
            from jupyter_gpu.session.virtual_device import VirtualDevice

            self.vdev = VirtualDevice()
        if self.busy:
            self.vdev.begin_cell()
        return self.vdev.device

    def do_offload(self, job: Job, path: str) -> dict:
        from jupyter_gpu.session.offload import save_namespace

        # queued behind this job, a cell must not run on memory that is being given away
        self.retired = True
        copy = self.standby.hand_over(path)  # written while idle: nothing left to write
        if copy is not None:
            return copy
        return {
            **save_namespace(self.shell.user_ns, self.shell.user_ns_hidden, path),
            "standby": False,
        }

    def do_restore(self, job: Job, path: str) -> dict:
        from jupyter_gpu.session.offload import load_namespace

        self.standby.changed()
        return load_namespace(self.shell.user_ns, path)

    def do_pull(self, job: Job, name: str) -> PullReply:
        return {"data": sendback.pulled(self.shell.user_ns, name)}


def enter_folder(cwd: str | None, refused_before: str | None) -> str | None:
    """Run in the kernel's folder ``cwd`` (same machine: relative paths mean what they mean in the
    notebook); a note for the cell when this session may not enter it (None: entered, or said
    already for this folder)."""
    if not cwd or cwd == os.getcwd() or not os.path.isdir(cwd):
        return None
    try:
        os.chdir(cwd)
    except OSError as exc:
        if cwd == refused_before:
            return None
        return (
            f"[jupyter-gpu] the GPU session cannot enter this notebook's folder {cwd} "
            f"({exc.strerror}); relative paths in this cell refer to {os.getcwd()}.\n"
        )
    return None


RUNNING_NOTE = 0.05  # seconds
TRIM_AFTER = 2.0  # seconds idle before a session gives its unused input buffers back to the OS
# seconds: quick cells' idle notes are merged over this long (Executor._tell_idle)
IDLE_NOTE = 0.25


def merge_idle_notes(held: dict, new: dict) -> dict:
    """Two idle notes as one: the latest measurements, and the larger of the two cells' peaks."""
    merged = {**held, **new}
    peaks = [p for p in (held.get("peak_bytes"), new.get("peak_bytes")) if p is not None]
    merged["peak_bytes"] = max(peaks) if peaks else None
    return merged


_letting_go: queue.Queue | None = None


def let_go(values: list) -> None:
    """Drop ``values`` on a background thread: the previous copy of a 256 MiB input takes tens of ms
    to give back to the OS (its pages are unmapped and freed), time the cell that replaced it need
    not wait for. (Finalizers already run on any thread: Python's garbage collector runs where it is
    triggered.)"""
    global _letting_go
    if not values:
        return
    if _letting_go is None:
        _letting_go = queue.Queue()

        def drain(q: queue.Queue) -> None:
            while True:
                batch = q.get()
                # until the main thread has let go of the list too
                while sys.getrefcount(batch) > 2:
                    time.sleep(0.001)
                del batch

        threading.Thread(
            target=drain, args=(_letting_go,), daemon=True, name="jupyter-gpu-let-go"
        ).start()
    _letting_go.put(values)
