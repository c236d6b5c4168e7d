"""The session process: one per (kernel, lease), where ``%%gpu`` cells actually run.

Started by the GPU worker plugin, ahead of need (pre-warmed: Python, NumPy, torch and IPython imported),
then assigned a lease: pinned to its GPU and capped at its memory before CUDA initialises. Its namespace
persists across the kernel's cells. User code runs in the main thread (so SIGINT interrupts it); a second
thread runs a Dask comm server that the kernel talks to directly, streaming output back while the cell
runs. If its worker dies, the kernel sees this process die too (parent-death signal).

Run as ``python -m jupyter_gpu.cluster.session_process --host HOST``; it prints one JSON line with its
address on its original stdout and then captures fds 1 and 2 for the cells.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any

from .memory_meter import CellMemoryMeter
from .standby import StandbyCopy

log = logging.getLogger("jupyter_gpu.session")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when our worker dies, so no session outlives its worker."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # not Linux: the watchdog thread below still catches it
        pass
    if os.getppid() != parent:
        os._exit(1)

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watchdog, daemon=True, name="jupyter-gpu-parent-watchdog").start()


class _Job:
    """Work for the main thread; ``reply`` is resolved on the I/O loop."""

    def __init__(self, kind: str, loop: asyncio.AbstractEventLoop, **kwargs: Any):
        self.kind, self.loop, self.kwargs = kind, loop, kwargs
        self.reply: asyncio.Future = loop.create_future()
        self.messages: asyncio.Queue = asyncio.Queue()

    def emit(self, msg: dict) -> None:
        self.loop.call_soon_threadsafe(self.messages.put_nowait, msg)

    def finish(self, value: Any) -> None:
        def _set() -> None:
            if not self.reply.done():
                self.reply.set_result(value)
        self.loop.call_soon_threadsafe(_set)


class Session:
    """State of one session process: its shell, its lease, and the loop that serves the kernel."""

    def __init__(self, host: str, worker: str | None):
        from distributed.core import Server

        from .session_output import FdCapture, Relay, RelayStream

        self.host, self.worker = host, worker
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.lease: dict | None = None
        self.gpus: list[dict] = []
        self.scheduler: str | None = None
        self.isolation = "none"
        self.meter: CellMemoryMeter | None = None  # set when a lease is assigned
        self.busy = False
        self.retired = False  # its variables were offloaded: it runs no more cells
        self.standby = StandbyCopy(None, None)  # its variables' copy in host memory while idle (standby.py)
        self._after_reply: dict | None = None
        self.relay = Relay()
        self.capture = FdCapture(self.relay)
        sys.stdout = RelayStream(self.relay, "stdout")
        sys.stderr = RelayStream(self.relay, "stderr")
        self.shell = _make_shell(self.relay)
        self.loop = asyncio.new_event_loop()
        self.server_cls = Server
        self.address: str | None = None
        self._ready = threading.Event()
        self._scheduler_rpc = None
        threading.Thread(target=self._run_loop, daemon=True, name="jupyter-gpu-session-io").start()
        threading.Thread(target=self._flush_streams, daemon=True, name="jupyter-gpu-stream-flush").start()
        self._ready.wait(30)

    # ------------------------------------------------------------------ I/O thread
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        self.loop.run_forever()

    async def _serve(self) -> None:
        from distributed.core import rpc

        handlers = {"assign": self.h_assign, "execute": self.h_execute, "interrupt": self.h_interrupt,
                    "pull": self.h_pull, "ping": self.h_ping, "free_port": self.h_free_port,
                    "offload": self.h_offload, "restore": self.h_restore}
        self.server = self.server_cls(handlers, deserialize=False)
        listen_at, listen_args, connection_args = _security_args(self.host, self.worker)
        await self.server.listen(listen_at, **listen_args)
        self.address = self.server.address
        # every rpc this session makes (to the broker, here and in distributed_run) speaks its worker's TLS
        self._rpc = functools.partial(rpc, connection_args=connection_args)
        self._ready.set()

    def _flush_streams(self) -> None:
        while True:
            time.sleep(0.05)
            for stream in self.relay.streams:
                if stream.due():
                    stream.flush()

    async def _submit(self, kind: str, **kwargs: Any) -> _Job:
        job = _Job(kind, self.loop, **kwargs)
        self.jobs.put(job)
        return job

    async def h_free_port(self) -> dict:
        """A port free right now on this host, for torch.distributed's rendezvous (never a fixed one)."""
        import socket

        with socket.socket() as sock:
            sock.bind((self.host, 0))
            return {"host": self.host, "port": sock.getsockname()[1]}

    async def h_ping(self) -> dict:
        return {"pid": os.getpid(), "busy": self.busy, "lease": (self.lease or {}).get("id")}

    async def h_assign(self, lease: dict, gpus: list[dict], scheduler: str | None = None,
                       env: dict | None = None, standby: dict | None = None) -> dict:
        job = await self._submit("assign", lease=lease, gpus=gpus, scheduler=scheduler, env=env or {},
                                 standby=standby)
        return await job.reply

    async def h_interrupt(self) -> dict:
        """SIGINT to the main thread: raises KeyboardInterrupt in the running cell."""
        if self.busy:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return {"interrupted": self.busy}

    async def h_execute(self, comm, code: str, inputs: dict, outputs: list[str] | None = None,
                        exact_outputs: bool = False, cell_name: str = "<gpu-cell>",
                        label: str | None = None, max_bytes: int = 64 * 2**20, cwd: str | None = None,
                        dist: dict | None = None, checkpoint_dir: str | None = None) -> dict:
        """Run a cell; stream output messages on ``comm`` while it runs; the reply is the ``done`` message."""
        job = await self._submit("execute", code=code, inputs=inputs, outputs=outputs or [],
                                 exact_outputs=exact_outputs, cell_name=cell_name, label=label,
                                 max_bytes=max_bytes, cwd=cwd, dist=dist, checkpoint_dir=checkpoint_dir)
        while True:
            getter = asyncio.ensure_future(job.messages.get())
            done, _ = await asyncio.wait({getter, job.reply}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                batch = [getter.result()]
                while not job.messages.empty():
                    batch.append(job.messages.get_nowait())
                await comm.write(_coalesce(batch))
            else:
                getter.cancel()
                rest = []
                while not job.messages.empty():
                    rest.append(job.messages.get_nowait())
                if rest:
                    await comm.write(_coalesce(rest))
                return job.reply.result()

    async def h_pull(self, name: str) -> dict:
        job = await self._submit("pull", name=name)
        return await job.reply

    async def h_offload(self, path: str) -> dict:
        """Move the variables to host memory (the lease is being reclaimed); the session runs no more cells."""
        job = await self._submit("offload", path=path)
        return await job.reply

    async def h_restore(self, path: str) -> dict:
        """Bring back the variables an earlier session of this kernel offloaded (see ``offload``)."""
        job = await self._submit("restore", path=path)
        return await job.reply

    def tell_scheduler(self, **kwargs: Any) -> None:
        """Fire-and-forget note to the broker (cell running/idle, peak memory) for the panel."""
        if not self.scheduler or not self.lease:
            return

        async def send() -> None:
            try:
                if self._scheduler_rpc is None:
                    self._scheduler_rpc = self._rpc(self.scheduler)
                # one-way: the broker's bookkeeping must never sit on a cell's path
                await self._scheduler_rpc.gpu_lease_state(lease=self.lease["id"], reply=False, **kwargs)
            except Exception as exc:
                log.debug("could not tell the broker: %s", exc)

        asyncio.run_coroutine_threadsafe(send(), self.loop)

    # ------------------------------------------------------------------ main thread
    def run_forever(self) -> None:
        while True:
            due = self.standby.due_in() if not self.retired else None
            try:
                job = self.jobs.get() if due is None else self.jobs.get(timeout=due)
            except queue.Empty:  # idle long enough: write the standby copy while nobody waits
                self._take_standby_copy()
                continue
            except KeyboardInterrupt:  # an interrupt that arrived just after a cell ended
                continue
            try:
                result = getattr(self, f"do_{job.kind}")(job, **job.kwargs)
            except KeyboardInterrupt:
                result = {"status": "error", "error": _error_payload(KeyboardInterrupt(), None, self.shell)}
            except BaseException as exc:  # never let a job kill the session silently
                log.exception("session job %s failed", job.kind)
                result = {"status": "error", "error": _error_payload(exc, None, self.shell)}
            finally:
                self.busy = False
                self.relay.end()
            job.finish(result)
            self.standby.idle()
            after, self._after_reply = self._after_reply, None
            if after:
                self.tell_scheduler(**after)

    def _work_waiting(self) -> bool:
        """Whether a job other than an offload is queued: a standby copy then stops for it (an offload
        instead waits for the copy, which it hands over)."""
        with self.jobs.mutex:
            return any(job.kind != "offload" for job in self.jobs.queue)

    def _take_standby_copy(self) -> None:
        expected = self.meter.resident() if self.meter is not None else None
        try:
            self.standby.take(self.shell.user_ns, self.shell.user_ns_hidden, expected, self._work_waiting)
        except KeyboardInterrupt:  # an interrupt meant for a cell that had just ended
            pass

    def do_assign(self, job: _Job, lease: dict, gpus: list[dict], scheduler: str | None, env: dict,
                  standby: dict | None = None) -> dict:
        from .. import session_api
        from .isolation import apply_memory_cap, pin_environment

        if self.lease is not None:
            return {"error": f"this session already holds lease {self.lease['id']}"}
        os.environ.update(pin_environment(lease, gpus))
        os.environ.update(env)
        self.lease, self.gpus, self.scheduler = lease, gpus, scheduler
        self.isolation = apply_memory_cap(lease, gpus)
        if standby:
            self.standby = StandbyCopy(standby.get("path"), standby.get("after"))
        virtual = all(g.get("virtual") for g in gpus)
        # measured from here: what the session holds before its first cell is not the user's data
        self.meter = CellMemoryMeter(virtual, [g["uuid"] for g in gpus if not g.get("virtual")])
        session_api._state.update({
            "rank": lease.get("rank", 0), "world_size": lease.get("world_size", 1),
            "device": "cpu" if virtual else "cuda:0", "lease": lease["id"],
            "emit": self.relay.emit,
        })
        log.info("session %d assigned lease %s on %s (isolation %s)", os.getpid(), lease["id"],
                 [g["uuid"] for g in gpus], self.isolation)
        return {"isolation": self.isolation, "pid": os.getpid()}

    def do_execute(self, job: _Job, code: str, inputs: dict, outputs: list[str], exact_outputs: bool,
                   cell_name: str, label: str | None, max_bytes: int, cwd: str | None,
                   dist: dict | None = None, checkpoint_dir: str | None = None) -> dict:
        from .. import session_api

        started = time.time()
        if self.retired:
            return {"status": "retired"}
        if cwd and cwd != os.getcwd() and os.path.isdir(cwd):
            os.chdir(cwd)  # same machine as the kernel: relative paths mean what they mean in the notebook
        # checkpoint()/restore() of this cell: per user, kernel and cell, so no other run's state is restored
        session_api._state["checkpoint_dir"] = checkpoint_dir
        self.standby.changed()  # the copy is of the namespace before this cell: stale from here on
        self.relay.begin(job.emit)
        self.busy = True
        if dist is None:
            return self._execute(code, inputs, outputs, exact_outputs, cell_name, label, max_bytes, started)
        from .distributed_run import DistributedRun

        run = DistributedRun(dist, self)
        try:
            inputs = run.start(inputs)
        except Exception as exc:
            run.stop()
            return {"status": "error", "error": _pool_error(str(exc))}
        reply: dict | None = None
        try:
            reply = self._execute(code, inputs, outputs, exact_outputs, cell_name, label, max_bytes, started)
            return reply
        finally:  # the process group is torn down whatever happened in the cell
            run.stop(clean=reply is not None and reply.get("status") == "ok")

    def _execute(self, code: str, inputs: dict, outputs: list[str], exact_outputs: bool, cell_name: str,
                 label: str | None, max_bytes: int, started: float) -> dict:
        from distributed.protocol import deserialize

        from ..datacontract import ModuleRef

        ns = self.shell.user_ns
        for name, item in inputs.items():
            try:
                value = deserialize(item.header, item.frames) if hasattr(item, "frames") else item
                if isinstance(value, ModuleRef):
                    value = importlib.import_module(value.name)
                ns[name] = value
            except Exception as exc:
                return {"status": "error", "error": _pool_error(
                    f"The input '{name}' could not be rebuilt in the GPU session ({type(exc).__name__}: {exc}). "
                    "Install what it needs on the pool's workers, create it inside the cell instead, or leave it "
                    "out with --in.")}
        self.tell_scheduler(state="running", cell=label)
        meter = self.meter or CellMemoryMeter(virtual=False)
        meter.start()
        self.shell.displayhook.reset()
        self.shell.compile.next_name = cell_name
        try:
            result = self.shell.run_cell(code, store_history=True)
        finally:
            self.relay.flush_streams()
            self.capture.sync()
        peak, utilization = meter.stop()
        # ``finished``: when the cell's code ended, so that of several failed ranks the first to fail is named
        # (replies can arrive in any order: a failed rank tears its process group down before it replies)
        finished = time.time()
        reply: dict[str, Any] = {"elapsed": finished - started, "finished": finished, "peak_bytes": peak,
                                 "gpu_utilization": utilization, "execution_count": self.shell.execution_count}
        error = result.error_before_exec or result.error_in_exec
        if error is not None:
            reply["status"] = "error"
            reply["error"] = _error_payload(error, cell_name, self.shell, lease=self.lease)
        else:
            reply["status"] = "ok"
        reply["outputs"] = self._collect_outputs(outputs, exact_outputs, max_bytes)
        reply["result"] = self._last_value(max_bytes) if error is None else None
        # told once the reply is on its way
        self._after_reply = {"state": "idle", "peak_bytes": peak, "gpu_utilization": utilization,
                             "resident_bytes": meter.resident()}
        return reply

    def _collect_outputs(self, names: list[str], exact: bool, max_bytes: int) -> dict:
        from ..datacontract import classify_output, to_cpu

        ns = self.shell.user_ns
        out: dict[str, dict] = {}
        for name in names:
            if name not in ns:
                continue
            value = ns[name]
            kind, desc = classify_output(name, value, max_bytes)
            if kind == "skip":
                continue
            if exact:  # --out: bring it back whatever it is
                value, kind = to_cpu(value), "value"
            if kind == "value":
                packed = _pack(value)
                if packed is None:
                    kind, desc = "remote", {**desc, "reason": "it cannot be serialized"}
                else:
                    out[name] = {"kind": "value", "data": packed}
                    continue
            out[name] = {"kind": "remote", **desc, "lease": (self.lease or {}).get("id")}
        return out

    def _last_value(self, max_bytes: int) -> dict | None:
        from ..datacontract import classify_output

        hook = self.shell.displayhook
        if hook.last_bundle is None:
            return None
        value = None
        kind, _ = classify_output("_", hook.last_value, max_bytes)
        if kind == "value":
            value = _pack(hook.last_value)
        return {"bundle": hook.last_bundle, "value": value}

    def do_offload(self, job: _Job, path: str) -> dict:
        from .offload import save_namespace

        self.retired = True  # queued behind this job, a cell must not run on memory that is being given away
        copy = self.standby.hand_over(path)  # written while idle: nothing left to write
        if copy is not None:
            return copy
        return save_namespace(self.shell.user_ns, self.shell.user_ns_hidden, path)

    def do_restore(self, job: _Job, path: str) -> dict:
        from .offload import load_namespace

        self.standby.changed()
        return load_namespace(self.shell.user_ns, path)

    def do_pull(self, job: _Job, name: str) -> dict:
        from ..datacontract import to_cpu

        ns = self.shell.user_ns
        if name not in ns:
            return {"error": f"your GPU session has no variable named {name!r}"}
        packed = _pack(to_cpu(ns[name]))
        if packed is None:
            return {"error": f"{name!r} ({type(ns[name]).__name__}) cannot be serialized to bring it back"}
        return {"data": packed}


def _pool_error(message: str) -> dict:
    """An error about the pool, not the user's code, in the shape the kernel rebuilds."""
    return {"type": "jupyter_gpu.errors.GpuPoolError", "pickled": None, "traceback": None,
            "message": message, "text": ""}


def _pack(value: Any) -> Any:
    """Serialize now (in the main thread) so a failure is reported for this name, not for the reply."""
    from distributed.protocol import serialize
    from distributed.protocol.serialize import Serialized

    try:
        header, frames = serialize(value, serializers=("dask", "pickle"), on_error="raise")
    except Exception:
        return None
    return Serialized(header, frames)


def _coalesce(batch: list[dict]) -> list[dict]:
    """Merge neighbouring stream messages of the same stream into one."""
    out: list[dict] = []
    for msg in batch:
        if out and msg.get("op") == "stream" and out[-1].get("op") == "stream" and out[-1]["name"] == msg["name"]:
            out[-1] = {**out[-1], "text": out[-1]["text"] + msg["text"]}
        else:
            out.append(msg)
    return out


def _error_payload(exc: BaseException, cell_name: str | None, shell: Any, lease: dict | None = None) -> dict:
    """An exception as the kernel rebuilds it: pickled if possible, its traceback via tblib, and text."""
    import pickle

    import cloudpickle
    from tblib import Traceback

    _explain_oom(exc, lease)
    tb = exc.__traceback__
    if cell_name is not None:  # drop the session's own frames: start at the cell
        t = tb
        while t is not None and t.tb_frame.f_code.co_filename != cell_name:
            t = t.tb_next
        tb = t or tb
    try:
        tb_dict = Traceback(tb).as_dict() if tb is not None else None
    except Exception:
        tb_dict = None
    try:
        pickled = cloudpickle.dumps(exc.with_traceback(None))
        pickle.loads(pickled)
    except Exception:
        pickled = None
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:
        text = repr(exc)
    return {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc),
            "pickled": pickled, "traceback": tb_dict, "text": text, "cell": cell_name}


def _explain_oom(exc: BaseException, lease: dict | None) -> None:
    """Add the lease and the fix to a CUDA out-of-memory error."""
    if lease is None or "out of memory" not in str(exc).lower():
        return
    from ..units import format_bytes

    note = (f"[jupyter-gpu] This session holds lease {lease['id']}: {format_bytes(lease.get('bytes'))} "
            f"({lease.get('fraction')} of a GPU), which caps its GPU memory. Ask for more with "
            f"`%%gpu --gpus 0.5` or `--memory 20GiB`, or free memory (del tensors, torch.cuda.empty_cache()).")
    try:
        exc.add_note(note)
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]}\n{note}",) + exc.args[1:]
    except Exception:
        pass


def _make_shell(relay: Any) -> Any:
    """An IPython shell whose display machinery sends messages instead of printing."""
    from IPython.core.compilerop import CachingCompiler
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from .session_output import CapturingDisplayHook, RelayDisplayPublisher

    class CellNameCompiler(CachingCompiler):
        """Names each cell's code after the kernel's cell, so remote tracebacks point at the cell's lines."""

        next_name = "<gpu-cell>"

        def get_code_name(self, raw_code: str, transformed_code: str, number: int) -> str:
            return self.next_name

    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    cfg.HistoryManager.enabled = False
    RelayDisplayPublisher.relay = relay
    shell = InteractiveShell.instance(config=cfg, display_pub_class=RelayDisplayPublisher,
                                      displayhook_class=CapturingDisplayHook, compiler_class=CellNameCompiler)
    # The kernel shows the error, rebuilt from what _error_payload sends: formatting it here too (IPython's
    # verbose traceback, with pygments) would cost up to a second on every error and every interrupt.
    shell.showtraceback = lambda *args, **kwargs: None
    shell.showsyntaxerror = lambda *args, **kwargs: None
    shell._showtraceback = lambda *args, **kwargs: None
    try:
        import matplotlib  # noqa: F401

        shell.enable_matplotlib("inline")
    except Exception:
        pass
    return shell


def _security_args(host: str, worker: str | None) -> tuple[str, dict, dict]:
    """Where the session's comm server listens, its listen arguments, and the connection arguments of its
    rpcs: the ``worker`` role of ``jupyter_gpu.security``, with the scheme of its worker (``tls://`` in a TLS
    pool), so a kernel that may talk to the pool may talk to its session and nobody else may. The worker
    hands its TLS settings over in the environment (``security_env``)."""
    from ..security import connection_args, listen_address, listen_args, pool_security

    sec = pool_security()
    address = listen_address(host, "worker", security=sec, like=worker)
    return address, listen_args("worker", sec, address=address), connection_args("worker", sec)


def _preload(modules: list[str]) -> None:
    """Import what cells will need, at low CPU priority: a spare warming up must not slow down the
    sessions, kernels and schedulers that are working now. The niceness is this thread's only (Linux), so
    the session itself runs at normal priority once it is assigned."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:
            pass  # an optional preload (torch on a CPU-only client machine)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--preload", default="")
    args = parser.parse_args(argv)
    # logs go to the worker's stderr (a copy of fd 2 taken before fd 2 is captured for the cells)
    logging.basicConfig(level=os.environ.get("JUPYTER_GPU_SESSION_LOG", "WARNING"),
                        stream=os.fdopen(os.dup(2), "w", buffering=1),
                        format="%(asctime)s session[%(process)d] %(levelname)s %(message)s")
    _die_with_parent()
    control = os.fdopen(os.dup(1), "w")  # our original stdout: tells the worker our address
    preloader = threading.Thread(target=_preload, args=([m for m in args.preload.split(",") if m],),
                                 name="jupyter-gpu-preload")
    preloader.start()
    preloader.join()
    session = Session(args.host, args.worker)
    control.write(json.dumps({"address": session.address, "pid": os.getpid()}) + "\n")
    control.flush()
    control.close()
    session.run_forever()


if __name__ == "__main__":
    main()
