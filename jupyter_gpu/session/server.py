"""The session's I/O thread: a Dask comm server that the owning kernel talks to directly.

Handlers here never run user code: they queue a ``Job`` for the main thread (``executor.py``) and
stream its messages back while it runs (coalesced, so a print loop costs few writes). The handler
table is its methods declared with ``@handler`` (``common/handlers.py``); Dask's default handlers that
would let anyone open a stream or dump the server's state are removed (``REMOVED_DEFAULTS``).

Only the lease's owner gets an answer: ``assign`` needs the key the worker gave this process when it
started it (on its private socket: ``main.read_spawn_key``), and every later call needs the lease's
secret, which the broker gave only to the worker and to the kernel that asked for the lease. The
secret is compared in constant time; a wrong one gets a refusal (``NotAuthorized``, in Dask's error
envelope) and nothing runs.
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

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import Unpack

from jupyter_gpu.common import local_transfer
from jupyter_gpu.common.handlers import handler, handlers_of
from jupyter_gpu.common.protocol import (
    AssignReply,
    CellPayload,
    ExecuteReply,
    FreePort,
    GpuInfoMsg,
    InterruptReply,
    LeaseView,
    OffloadResult,
    PingReply,
    PullReply,
    RestoreResult,
    StandbyPlan,
)
from jupyter_gpu.common.refusals import NotAuthorized
from jupyter_gpu.common.validation import Bytes, MaxLen, Name, Secret, Text
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
        """The session's comm handlers: its methods declared with ``@handler``."""
        return handlers_of(self)

    # ------------------------------------------------------------------ I/O thread
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        self.loop.run_forever()

    async def _serve(self) -> None:

        self.server = session_comm_server(self.handlers())
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
    def _check_owner(self, secret: str | None) -> None:
        """Only the lease's owner gets an answer (its kernel, and its worker)."""
        if self.secret is None:
            raise NotAuthorized("this session has no lease yet")
        if secret is None or not hmac.compare_digest(secret, self.secret):
            raise NotAuthorized(
                "this session answers only the kernel that holds its lease (wrong or missing "
                "secret)"
            )

    @handler("free_port", caller="kernel", check="lease-secret")
    async def free_port(self, secret: Secret | None = None) -> FreePort:
        """A port for a ``--workers`` run's rendezvous store on this host, listening from now on
        this session's address only; rank 0's store takes the socket over (so nobody can take the
        port in between, and nothing listens on the machine's other addresses)."""
        import socket

        self._check_owner(secret)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, 0), family=family, backlog=256)
        self.executor.take_rendezvous(sock)
        return {"host": self.host, "port": sock.getsockname()[1]}

    @handler("ping", caller="kernel", check="lease-secret")
    async def ping(
        self, secret: Secret | None = None, probe: dict[str, Any] | None = None
    ) -> PingReply:
        """Is the session alive, and busy; with the kernel's ``probe`` marker, whether the two can
        read each other's pipes (``common/local_transfer.py``)."""
        self._check_owner(secret)
        reply: PingReply = {
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

    @handler("assign", caller="worker", check="spawn-key")
    async def assign(
        self,
        key: Secret,
        secret: Secret,
        lease: LeaseView,
        gpus: Annotated[list[GpuInfoMsg], MaxLen(64)],
        env: dict[str, str] | None = None,
        standby: StandbyPlan | None = None,
        memory_rlimit: Bytes | None = None,
    ) -> AssignReply:
        """Take a lease, once, from the worker that started this process: pin the GPU, cap
        memory, start measuring (a session of an isolated pool is its user's already: the launcher
        started it so)."""
        if self._spawn_key is None or not hmac.compare_digest(key, self._spawn_key):
            raise NotAuthorized("only the worker that started this session may give it a lease")
        self._spawn_key = None  # once
        job = await self._submit(
            "assign",
            lease=lease,
            gpus=gpus,
            env=env or {},
            standby=standby,
            memory_rlimit=memory_rlimit,
        )
        reply: AssignReply = await job.reply
        self.secret = secret
        return reply

    @handler("interrupt", caller="kernel", check="lease-secret")
    async def interrupt(self, secret: Secret | None = None) -> InterruptReply:
        """SIGINT to the running cell (raises KeyboardInterrupt in it)."""
        self._check_owner(secret)
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

    @handler("execute", caller="kernel", check="lease-secret")
    async def execute(
        self, comm: Any, secret: Secret | None = None, **cell: Unpack[CellPayload]
    ) -> ExecuteReply:
        """Run one cell in the session's namespace, streaming its output (batches of
        ``OutputMsg``) on ``comm`` while it runs; the reply is the cell's outcome."""
        self._check_owner(secret)
        self._executing += 1
        try:
            return await self._execute(comm, cell)
        finally:
            with self.executor.interrupt_lock:
                self._executing -= 1
                if not self._executing:
                    # meant for this cell only, never for a later one
                    self.executor.interrupt_pending = False

    async def _execute(self, comm: Any, cell: CellPayload) -> ExecuteReply:
        try:
            inputs = await self.loop.run_in_executor(
                None, receive_inputs, cell["inputs"], self.executor.input_buffers
            )
        except local_transfer.TransferError as exc:
            return {
                "status": "error",
                "error": pool_error(
                    f"The cell was not run: its inputs could not be read from the kernel ({exc}). "
                    "Run it again; if this repeats, set jupyter-gpu.local-transfer to false."
                ),
            }
        job = await self._submit(
            "execute",
            code=cell["code"],
            inputs=inputs,
            outputs=cell.get("outputs") or [],
            exact_outputs=cell.get("exact_outputs", False),
            cell_name=cell.get("cell_name", "<gpu-cell>"),
            label=cell.get("label"),
            max_bytes=cell.get("max_bytes", 64 * 2**20),
            cwd=cell.get("cwd"),
            dist=cell.get("dist"),
            checkpoint_dir=cell.get("checkpoint_dir"),
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
                reply: ExecuteReply = job.reply.result()
                if cell.get("local"):
                    reply = await self.loop.run_in_executor(
                        None, pack_reply, reply, self._sending()
                    )
                return reply

    @handler("pull", caller="kernel", check="lease-secret")
    async def pull(
        self, name: Name, secret: Secret | None = None, local: bool = False
    ) -> PullReply:
        """A copy of one variable, moved to CPU (``%gpu pull``)."""
        self._check_owner(secret)
        job = await self._submit("pull", name=name)
        reply: PullReply = await job.reply
        if local:
            reply = {
                "data": await self.loop.run_in_executor(
                    None, local_transfer.pack, reply["data"], self._sending()
                )
            }
        return reply

    @handler("offload", caller="worker", check="lease-secret")
    async def offload(self, path: Text, secret: Secret | None = None) -> OffloadResult:
        """Write the variables to host memory (the lease is being taken back); the session runs no
        more cells."""
        self._check_owner(secret)
        job = await self._submit("offload", path=path)
        result: OffloadResult = await job.reply
        return result

    @handler("restore", caller="worker", check="lease-secret")
    async def restore(self, path: Text, secret: Secret | None = None) -> RestoreResult:
        """Load an earlier session's offloaded variables into this one."""
        self._check_owner(secret)
        job = await self._submit("restore", path=path)
        result: RestoreResult = await job.reply
        return result


def session_comm_server(handlers: dict[str, Callable[..., Any]]) -> Any:
    """The session's comm server: its handlers, and of Dask's defaults ``identity`` only (the
    others open a stream in, or dump the server's state: ``REMOVED_DEFAULTS``). Nothing is
    deserialized on arrival: inputs stay frames until the main thread rebuilds them."""
    from distributed.core import Server

    server = Server(handlers, deserialize=False)
    for op in REMOVED_DEFAULTS:
        server.handlers.pop(op, None)
    return server


REMOVED_DEFAULTS = ("connection_stream", "dump_state", "echo")


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


def pack_reply(reply: ExecuteReply, sending: local_transfer.Sending) -> ExecuteReply:
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
