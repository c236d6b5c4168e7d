"""The session's I/O thread: a Dask comm server that the owning kernel talks to directly.

Handlers here never run user code: they queue a ``Job`` for the main thread (``executor.py``) and
stream its messages back while it runs (coalesced, so a print loop costs few writes). The handler
table is declared once, in ``handlers()``, against ``protocol.SESSION_OPS``; Dask's default handlers
that would let anyone open a stream or dump the server's state are removed.

Only the lease's owner gets an answer: ``assign`` needs the key the worker gave this process when it
started it (in its environment, readable by nobody else), and every later call needs the lease's
secret, which the broker gave only to the worker and to the kernel that asked for the lease. The
secret is compared in constant time; a wrong one gets a refusal and nothing runs.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import signal
import sys
import threading
import time
from typing import Annotated, Any, Callable

from jupyter_gpu.common import local_transfer, protocol
from jupyter_gpu.common.protocol import Account, GpuInfoMsg, LeaseView, StandbyPlan
from jupyter_gpu.common.validation import Bytes, MaxLen, Name, Secret, Text, error_reply, validated
from jupyter_gpu.session.executor import Executor, Job
from jupyter_gpu.session.output import FdCapture, Relay, RelayStream
from jupyter_gpu.session.shell import make_shell
from jupyter_gpu.session.tracebacks import pool_error
from jupyter_gpu.session.worker_link import WorkerLink


class SessionServer:
    """One session process's state and comm server; ``run_forever`` hands the main thread to the
    executor."""

    def __init__(
        self,
        host: str,
        worker: str | None,
        control_fd: int | None = None,
        spawn_key: str | None = None,
    ):
        self.host, self.worker = host, worker
        self._spawn_key = spawn_key
        self.secret: str | None = None  # the lease's secret, from ``assign`` on
        relay = Relay(limit=output_limit(), rate=output_limit("session.output-rate"))
        capture = FdCapture(relay)
        sys.stdout = RelayStream(relay, "stdout")
        sys.stderr = RelayStream(relay, "stderr")
        self.relay = relay
        self.loop = asyncio.new_event_loop()
        listen_at, self._listen_args, connection_args = listen_settings(host, worker)
        self._listen_at = listen_at
        # the only way to the control plane: the private socket from the worker (worker_link.py)
        self.link = WorkerLink(self.loop, control_fd)
        self.executor = Executor(relay, capture, make_shell(relay), self.link)
        self.address: str | None = None
        # pipes of the last reply, until the kernel's next call
        self._sent: local_transfer.Sending | None = None
        # execute calls in flight (an interrupt between their arrival and the cell's start)
        self._executing = 0
        self._ready = threading.Event()
        threading.Thread(target=self._run_loop, daemon=True, name="jupyter-gpu-session-io").start()
        threading.Thread(
            target=self._flush_streams, daemon=True, name="jupyter-gpu-stream-flush"
        ).start()
        self._ready.wait(30)

    def run_forever(self) -> None:
        self.executor.run_forever()

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The session's comm handlers: exactly ``protocol.SESSION_OPS``."""
        table: dict[str, Callable[..., Any]] = {
            "assign": self.h_assign,
            "execute": self.h_execute,
            "interrupt": self.h_interrupt,
            "pull": self.h_pull,
            "ping": self.h_ping,
            "free_port": self.h_free_port,
            "offload": self.h_offload,
            "restore": self.h_restore,
        }
        assert set(table) == protocol.SESSION_OPS, (
            "session handlers and protocol.SESSION_OPS disagree"
        )
        return table

    # ------------------------------------------------------------------ I/O thread
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        self.loop.run_forever()

    async def _serve(self) -> None:
        from distributed.core import Server

        self.server = Server(self.handlers(), deserialize=False)
        # Dask's defaults: a stream in, a state dump out
        for op in ("connection_stream", "dump_state", "echo"):
            self.server.handlers.pop(op, None)
        await self.link.open()
        await self.server.listen(self._listen_at, **self._listen_args)
        self.address = self.server.address
        self._ready.set()

    def _flush_streams(self) -> None:
        while True:
            time.sleep(0.05)
            for stream in self.relay.streams:
                if stream.due():
                    stream.flush()

    async def _submit(self, kind: str, **kwargs: Any) -> Job:
        job = Job(kind, self.loop, **kwargs)
        self.executor.jobs.put(job)
        return job

    def _sending(self) -> local_transfer.Sending:
        """The pipes of a new reply; the last reply's are closed (the kernel has read them by now:
        it reads a reply before it makes its next call)."""
        if self._sent is not None:
            self._sent.close()
        self._sent = local_transfer.Sending()
        return self._sent

    # ------------------------------------------------------------------ handlers
    def _refused(self, secret: str | None) -> str | None:
        """Why a call is not the owner's (None: it is)."""
        if self.secret is None:
            return "this session has no lease yet"
        if secret is None or not hmac.compare_digest(secret, self.secret):
            return "this session answers only the kernel that holds its lease (wrong or missing secret)"
        return None

    @validated(error_reply)
    async def h_free_port(self, secret: Secret | None = None) -> dict:
        """A port free right now on this host, for torch.distributed's rendezvous (never a fixed
        one)."""
        import socket

        if why := self._refused(secret):
            return error_reply(why)

        with socket.socket() as sock:
            sock.bind((self.host, 0))
            return {"host": self.host, "port": sock.getsockname()[1]}

    @validated(error_reply)
    async def h_ping(
        self, secret: Secret | None = None, probe: dict[str, Any] | None = None
    ) -> dict:
        """Alive and busy; with the kernel's ``probe`` marker: whether this process can read the
        kernel's pipes, and a probe of its own for the kernel to try the other way
        (``common/local_transfer.py``)."""
        if why := self._refused(secret):
            return error_reply(why)
        reply = {
            "pid": os.getpid(),
            "busy": self.executor.busy,
            "lease": (self.executor.lease or {}).get("id"),
        }
        if probe is not None:
            reply["probe_ok"] = local_transfer.available() and await self.loop.run_in_executor(
                None, local_transfer.check_probe, probe
            )
            if reply["probe_ok"]:
                reply["probe"] = local_transfer.probe(self._sending())
        return reply

    @validated(error_reply)
    async def h_assign(
        self,
        key: Secret,
        secret: Secret,
        lease: LeaseView,
        gpus: Annotated[list[GpuInfoMsg], MaxLen(64)],
        env: dict[str, str] | None = None,
        standby: StandbyPlan | None = None,
        memory_rlimit: Bytes | None = None,
        account: Account | None = None,
        hostmem: Text | None = None,
    ) -> dict:
        """Take the lease (once, from the worker that started this process)."""
        if self._spawn_key is None or not hmac.compare_digest(key, self._spawn_key):
            return error_reply("only the worker that started this session may give it a lease")
        self._spawn_key = None  # once
        job = await self._submit(
            "assign",
            lease=lease,
            gpus=gpus,
            env=env or {},
            standby=standby,
            memory_rlimit=memory_rlimit,
            account=account,
            hostmem=hostmem,
        )
        reply = await job.reply
        if not reply.get("error"):
            self.secret = secret
        return reply

    @validated(error_reply)
    async def h_interrupt(self, secret: Secret | None = None) -> dict:
        """SIGINT to the main thread: raises KeyboardInterrupt in the running cell."""
        if why := self._refused(secret):
            return error_reply(why)
        ex = self.executor
        with ex.interrupt_lock:
            if ex.busy:
                main = threading.main_thread().ident
                assert main is not None  # it runs
                signal.pthread_kill(main, signal.SIGINT)
                return {"interrupted": True}
            if self._executing:
                # the cell is on its way to the main thread (inputs being read, or queued): it must
                # not start after all. Dropping this interrupt let a cell that started late run on
                # until it was killed
                ex.interrupt_pending = True
                return {"interrupted": True, "before_start": True}
        return {"interrupted": False}

    @validated(
        lambda why: {"status": "error", "error": pool_error(f"The cell was not run: {why}.")}
    )
    async def h_execute(
        self,
        comm: Any,
        code: Annotated[str, MaxLen(64 * 2**20)],
        inputs: dict[str, Any],
        outputs: Annotated[list[Name], MaxLen(100_000)] | None = None,
        exact_outputs: bool = False,
        cell_name: Text = "<gpu-cell>",
        label: Text | None = None,
        max_bytes: Bytes = 64 * 2**20,
        cwd: Text | None = None,
        dist: dict[str, Any] | None = None,
        checkpoint_dir: Text | None = None,
        secret: Secret | None = None,
        local: bool = False,
    ) -> dict:
        """Run a cell; stream output messages on ``comm`` while it runs; the reply is the ``done``
        message."""
        if why := self._refused(secret):
            return {"status": "error", "error": pool_error(f"The cell was not run: {why}.")}
        self._executing += 1
        try:
            return await self._execute(
                comm,
                code,
                inputs,
                outputs,
                exact_outputs,
                cell_name,
                label,
                max_bytes,
                cwd,
                dist,
                checkpoint_dir,
                local,
            )
        finally:
            with self.executor.interrupt_lock:
                self._executing -= 1
                if not self._executing:
                    # meant for this cell only, never for a later one
                    self.executor.interrupt_pending = False

    async def _execute(
        self,
        comm: Any,
        code: str,
        inputs: dict[str, Any],
        outputs: list[str] | None,
        exact_outputs: bool,
        cell_name: str,
        label: str | None,
        max_bytes: int,
        cwd: str | None,
        dist: dict[str, Any] | None,
        checkpoint_dir: str | None,
        local: bool,
    ) -> dict:
        try:
            inputs = await self.loop.run_in_executor(
                None, receive_inputs, inputs, self.executor.input_buffers
            )
        except local_transfer.TransferError as exc:
            return {
                "status": "error",
                "error": pool_error(
                    f"The cell was not run: its inputs could not be read from the kernel ({exc}). "
                    "Run it again; "
                    "if this repeats, set jupyter-gpu.local-transfer to false."
                ),
            }
        job = await self._submit(
            "execute",
            code=code,
            inputs=inputs,
            outputs=outputs or [],
            exact_outputs=exact_outputs,
            cell_name=cell_name,
            label=label,
            max_bytes=max_bytes,
            cwd=cwd,
            dist=dist,
            checkpoint_dir=checkpoint_dir,
        )
        while True:
            getter = asyncio.ensure_future(job.messages.get())
            done, _ = await asyncio.wait({getter, job.reply}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                batch = [getter.result()]
                while not job.messages.empty():
                    batch.append(job.messages.get_nowait())
                await comm.write(coalesce(batch))
            else:
                getter.cancel()
                rest = []
                while not job.messages.empty():
                    rest.append(job.messages.get_nowait())
                if rest:
                    await comm.write(coalesce(rest))
                reply = job.reply.result()
                if local:
                    reply = await self.loop.run_in_executor(
                        None, pack_reply, reply, self._sending()
                    )
                return reply

    @validated(error_reply)
    async def h_pull(self, name: Name, secret: Secret | None = None, local: bool = False) -> dict:
        if why := self._refused(secret):
            return error_reply(why)
        job = await self._submit("pull", name=name)
        reply = await job.reply
        if local and reply.get("data") is not None:
            reply = {
                **reply,
                "data": await self.loop.run_in_executor(
                    None, local_transfer.pack, reply["data"], self._sending()
                ),
            }
        return reply

    @validated(error_reply)
    async def h_offload(self, path: Text, secret: Secret | None = None) -> dict:
        """Move the variables to host memory (the lease is being reclaimed); the session runs no
        more cells."""
        if why := self._refused(secret):
            return error_reply(why)
        job = await self._submit("offload", path=path)
        return await job.reply

    @validated(error_reply)
    async def h_restore(self, path: Text, secret: Secret | None = None) -> dict:
        """Bring back the variables an earlier session of this kernel offloaded (see
        ``offload``)."""
        if why := self._refused(secret):
            return error_reply(why)
        job = await self._submit("restore", path=path)
        return await job.reply


def receive_inputs(inputs: dict, buffers: local_transfer.ReceiveBuffers | None = None) -> dict:
    """Inputs the kernel sent through pipes (``common/local_transfer.py``), read as ``Serialized``
    values (into ``buffers``' unused memory where it has a buffer of the right size)."""
    from distributed.protocol.serialize import Serialized

    if not any(local_transfer.is_marker(v) for v in inputs.values()):
        return inputs
    return {
        name: Serialized(*local_transfer.receive(v, buffers=buffers))
        if local_transfer.is_marker(v)
        else v
        for name, v in inputs.items()
    }


def pack_reply(reply: dict, sending: local_transfer.Sending) -> dict:
    """The ``done`` reply with its large values (outputs, the last expression) sent through
    pipes."""
    outputs = reply.get("outputs")
    if outputs:
        reply["outputs"] = {
            name: (
                {**item, "data": local_transfer.pack(item["data"], sending)}
                if "data" in item
                else item
            )
            for name, item in outputs.items()
        }
    result = reply.get("result")
    if result and result.get("value") is not None:
        reply["result"] = {**result, "value": local_transfer.pack(result["value"], sending)}
    return reply


def output_limit(key: str = "session.output-limit") -> int | None:
    """``session.output-limit``: the most text one cell may send to the notebook; with
    ``session.output-rate``, how much a second (None: no limit)."""
    from jupyter_gpu.common import config

    return config.get_bytes(key) if config.get(key) is not None else None


def coalesce(batch: list[dict]) -> list[dict]:
    """Merge neighbouring stream messages of the same stream into one."""
    out: list[dict] = []
    for msg in batch:
        if (
            out
            and msg.get("op") == "stream"
            and out[-1].get("op") == "stream"
            and out[-1]["name"] == msg["name"]
        ):
            out[-1] = {**out[-1], "text": out[-1]["text"] + msg["text"]}
        else:
            out.append(msg)
    return out


def listen_settings(host: str, worker: str | None) -> tuple[str, dict, dict]:
    """Where the session's comm server listens, its listen arguments, and the connection arguments
    of its rpcs: the ``worker`` role of ``jupyter_gpu.common.security``, with the scheme of its
    worker (``tls://`` in a TLS pool), so a kernel that may talk to the pool may talk to its session
    and nobody else may. The worker hands its TLS settings over in the environment
    (``security_env``)."""
    from jupyter_gpu.common.security import (
        connection_args,
        listen_address,
        listen_args,
        pool_security,
    )

    sec = pool_security()
    address = listen_address(host, "worker", security=sec, like=worker)
    return address, listen_args("worker", sec, address=address), connection_args("worker", sec)
