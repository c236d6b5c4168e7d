"""The session's I/O thread: a Dask comm server that the owning kernel talks to directly.

Handlers here never run user code: they queue a ``Job`` for the main thread (``executor.py``) and stream
its messages back while it runs (coalesced, so a print loop costs few writes). The handler table is
declared once, in ``handlers()``, against ``protocol.SESSION_OPS``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from typing import Annotated, Any, Callable

from jupyter_gpu.common import protocol
from jupyter_gpu.common.protocol import GpuInfoMsg, LeaseView, StandbyPlan
from jupyter_gpu.common.validation import Address, Bytes, MaxLen, Name, Text, error_reply, validated
from jupyter_gpu.session.executor import Executor, Job
from jupyter_gpu.session.output import FdCapture, Relay, RelayStream
from jupyter_gpu.session.scheduler_link import SchedulerLink
from jupyter_gpu.session.shell import make_shell
from jupyter_gpu.session.tracebacks import pool_error


class SessionServer:
    """One session process's state and comm server; ``run_forever`` hands the main thread to the executor."""

    def __init__(self, host: str, worker: str | None):
        self.host, self.worker = host, worker
        relay = Relay(limit=output_limit())
        capture = FdCapture(relay)
        sys.stdout = RelayStream(relay, "stdout")
        sys.stderr = RelayStream(relay, "stderr")
        self.relay = relay
        self.loop = asyncio.new_event_loop()
        listen_at, self._listen_args, connection_args = listen_settings(host, worker)
        self._listen_at = listen_at
        # every rpc this session makes (to the broker, here and in distributed_rank) speaks its worker's TLS
        self.link = SchedulerLink(self.loop, connection_args)
        self.executor = Executor(relay, capture, make_shell(relay), self.link)
        self.address: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._run_loop, daemon=True, name="jupyter-gpu-session-io").start()
        threading.Thread(target=self._flush_streams, daemon=True, name="jupyter-gpu-stream-flush").start()
        self._ready.wait(30)

    def run_forever(self) -> None:
        self.executor.run_forever()

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The session's comm handlers: exactly ``protocol.SESSION_OPS``."""
        table = {"assign": self.h_assign, "execute": self.h_execute, "interrupt": self.h_interrupt,
                 "pull": self.h_pull, "ping": self.h_ping, "free_port": self.h_free_port,
                 "offload": self.h_offload, "restore": self.h_restore}
        assert set(table) == protocol.SESSION_OPS, "session handlers and protocol.SESSION_OPS disagree"
        return table

    # ------------------------------------------------------------------ I/O thread
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        self.loop.run_forever()

    async def _serve(self) -> None:
        from distributed.core import Server

        self.server = Server(self.handlers(), deserialize=False)
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

    # ------------------------------------------------------------------ handlers
    async def h_free_port(self) -> dict:
        """A port free right now on this host, for torch.distributed's rendezvous (never a fixed one)."""
        import socket

        with socket.socket() as sock:
            sock.bind((self.host, 0))
            return {"host": self.host, "port": sock.getsockname()[1]}

    async def h_ping(self) -> dict:
        return {"pid": os.getpid(), "busy": self.executor.busy, "lease": (self.executor.lease or {}).get("id")}

    @validated(error_reply)
    async def h_assign(self, lease: LeaseView, gpus: Annotated[list[GpuInfoMsg], MaxLen(64)],
                       scheduler: Address | None = None, env: dict[str, str] | None = None,
                       standby: StandbyPlan | None = None, memory_rlimit: Bytes | None = None) -> dict:
        job = await self._submit("assign", lease=lease, gpus=gpus, scheduler=scheduler, env=env or {},
                                 standby=standby, memory_rlimit=memory_rlimit)
        return await job.reply

    async def h_interrupt(self) -> dict:
        """SIGINT to the main thread: raises KeyboardInterrupt in the running cell."""
        busy = self.executor.busy
        if busy:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return {"interrupted": busy}

    @validated(lambda why: {"status": "error", "error": pool_error(f"The cell was not run: {why}.")})
    async def h_execute(self, comm: Any, code: Annotated[str, MaxLen(64 * 2**20)], inputs: dict[str, Any],
                        outputs: Annotated[list[Name], MaxLen(100_000)] | None = None,
                        exact_outputs: bool = False, cell_name: Text = "<gpu-cell>",
                        label: Text | None = None, max_bytes: Bytes = 64 * 2**20, cwd: Text | None = None,
                        dist: dict[str, Any] | None = None, checkpoint_dir: Text | None = None) -> dict:
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
                await comm.write(coalesce(batch))
            else:
                getter.cancel()
                rest = []
                while not job.messages.empty():
                    rest.append(job.messages.get_nowait())
                if rest:
                    await comm.write(coalesce(rest))
                return job.reply.result()

    @validated(error_reply)
    async def h_pull(self, name: Name) -> dict:
        job = await self._submit("pull", name=name)
        return await job.reply

    @validated(error_reply)
    async def h_offload(self, path: Text) -> dict:
        """Move the variables to host memory (the lease is being reclaimed); the session runs no more cells."""
        job = await self._submit("offload", path=path)
        return await job.reply

    @validated(error_reply)
    async def h_restore(self, path: Text) -> dict:
        """Bring back the variables an earlier session of this kernel offloaded (see ``offload``)."""
        job = await self._submit("restore", path=path)
        return await job.reply


def output_limit() -> int | None:
    """``session.output-limit``: the most text one cell may send to the notebook (None: no limit)."""
    from jupyter_gpu.common import config

    return config.get_bytes("session.output-limit") if config.get("session.output-limit") is not None else None


def coalesce(batch: list[dict]) -> list[dict]:
    """Merge neighbouring stream messages of the same stream into one."""
    out: list[dict] = []
    for msg in batch:
        if out and msg.get("op") == "stream" and out[-1].get("op") == "stream" and out[-1]["name"] == msg["name"]:
            out[-1] = {**out[-1], "text": out[-1]["text"] + msg["text"]}
        else:
            out.append(msg)
    return out


def listen_settings(host: str, worker: str | None) -> tuple[str, dict, dict]:
    """Where the session's comm server listens, its listen arguments, and the connection arguments of its
    rpcs: the ``worker`` role of ``jupyter_gpu.common.security``, with the scheme of its worker (``tls://``
    in a TLS pool), so a kernel that may talk to the pool may talk to its session and nobody else may. The
    worker hands its TLS settings over in the environment (``security_env``)."""
    from jupyter_gpu.common.security import connection_args, listen_address, listen_args, pool_security

    sec = pool_security()
    address = listen_address(host, "worker", security=sec, like=worker)
    return address, listen_args("worker", sec, address=address), connection_args("worker", sec)
