"""A worker's connection to the privileged launcher of its machine (``launcher/server.py``).

Why: the worker runs as the pool's service account and cannot give a session its user's account,
put it in a cgroup, signal it, or touch its files. When ``jupyter-gpu worker`` was started as root,
the launcher it forked does those things, for this connection's sessions only and on the broker's
signed grant. The worker finds it by the socket path in its environment (``JUPYTER_GPU_LAUNCHER``),
names itself (``hello``), then sends requests (``common/protocol.py``'s ``Launch*``) and awaits
their replies by id; the launcher's unasked events (a session exited) go to ``on_exit``.

A session the launcher started is not the worker's child: :class:`LaunchedProcess` is the handle the
session manager keeps for it, like the ``subprocess.Popen`` of a session it started itself.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from jupyter_gpu.common.protocol import LauncherReply

log = logging.getLogger(__name__)

SOCKET_ENV = "JUPYTER_GPU_LAUNCHER"
MAX_MESSAGE = 65536


class LauncherRefused(RuntimeError):
    """The launcher said no; the message is its reason."""


class LaunchedProcess:
    """A session the launcher started, as the worker sees it (``pid``, ``poll()``,
    ``send_signal()``, ``kill()``, ``wait()``); its exit arrives as the launcher's event."""

    def __init__(self, pid: int, lease: str, link: LauncherLink):
        self.pid, self.lease, self.link = pid, lease, link
        self.returncode: int | None = None
        self.oom = False
        self.memory_peak: int | None = None  # as its cgroup counted it (the exit event's)
        self.memory_limit: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            kind = "interrupt" if sig == signal.SIGINT else "kill"
            self.link.spawn(self.link.signal(self.lease, kind))

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.02)
        return self.returncode


class LauncherLink:
    """See the module docstring."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[tuple[LauncherReply, list[int]]]] = {}
        self.processes: dict[str, LaunchedProcess] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.on_exit: Callable[[LaunchedProcess], None] = lambda proc: None

    @classmethod
    def from_environment(cls) -> LauncherLink | None:
        path = os.environ.get(SOCKET_ENV)
        return cls(path) if path else None

    async def open(self, worker: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(self.path)
        sock.setblocking(False)
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        await self.call({"op": "hello", "worker": worker})

    def close(self) -> None:
        if self.sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            except RuntimeError:
                pass
            self.sock.close()
            self.sock = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(LauncherRefused("the connection to the launcher closed"))

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, its failure logged (a signal, a forgotten folder)."""

        async def logged() -> None:
            try:
                await coro
            except Exception as exc:  # noqa: BLE001 - best effort: the session may be gone already
                log.info("launcher: %s", exc)

        task = asyncio.ensure_future(logged())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def call(
        self, msg: dict[str, Any], fds: list[int] | None = None
    ) -> tuple[LauncherReply, list[int]]:
        """Send one request (``fds`` travel with it) and await its reply and the descriptors that
        came with it."""
        if self.sock is None:
            raise LauncherRefused("not connected to the launcher")
        ident = next(self._ids)
        fut: asyncio.Future[tuple[LauncherReply, list[int]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting[ident] = fut
        data = json.dumps({**msg, "id": ident}).encode()
        while True:
            try:
                socket.send_fds(self.sock, [data], fds or [])
                break
            except BlockingIOError:
                await asyncio.sleep(0.005)
        reply, got = await fut
        if "error" in reply:
            for fd in got:
                os.close(fd)
            raise LauncherRefused(reply["error"])
        return reply, got

    def _readable(self) -> None:
        assert self.sock is not None  # registered while open
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                log.error("the launcher closed its connection: sessions cannot start here")
                self.close()
                return
            msg = json.loads(data)
            if msg.get("event") == "exited":
                self._exited(msg)
                continue
            fut = self._waiting.pop(int(msg.get("id", -1)), None)
            if fut is not None and not fut.done():
                fut.set_result((msg, fds))
            else:
                for fd in fds:
                    os.close(fd)

    def _exited(self, event: dict[str, Any]) -> None:
        proc = self.processes.get(event.get("lease", ""))
        if proc is not None and proc.pid == event.get("pid"):
            proc.returncode = int(event["code"])
            proc.oom = bool(event.get("oom"))
            peak, limit = event.get("peak"), event.get("limit")
            proc.memory_peak = peak if isinstance(peak, int) else None
            proc.memory_limit = limit if isinstance(limit, int) else None
            self.on_exit(proc)

    # ------------------------------------------------------------------ requests
    async def start(
        self, lease: str, grant: str, host: str, env: dict[str, str], fds: list[int]
    ) -> tuple[LaunchedProcess, LauncherReply]:
        reply, _ = await self.call(
            {"op": "start", "lease": lease, "grant": grant, "host": host, "env": env}, fds
        )
        proc = LaunchedProcess(int(reply["pid"]), lease, self)
        self.processes[lease] = proc
        return proc, reply

    async def signal(self, lease: str, kind: str) -> None:
        await self.call({"op": "signal", "lease": lease, "signal": kind})

    async def end(self, lease: str, keep_folder: bool) -> None:
        self.processes.pop(lease, None)
        await self.call({"op": "end", "lease": lease, "keep_folder": keep_folder})

    async def move_copy(self, lease: str, to_lease: str) -> str:
        reply, _ = await self.call({"op": "move_copy", "lease": lease, "to_lease": to_lease})
        return reply["path"]

    async def open_copy(self, lease: str) -> int:
        _, fds = await self.call({"op": "open_copy", "lease": lease})
        return fds[0]

    async def create_copy(self, lease: str) -> tuple[int, str]:
        reply, fds = await self.call({"op": "create_copy", "lease": lease})
        return fds[0], reply["path"]

    async def spill_copy(self, lease: str) -> int:
        reply, _ = await self.call({"op": "spill_copy", "lease": lease})
        return int(reply["bytes"])

    async def forget_copy(self, lease: str) -> None:
        await self.call({"op": "forget_copy", "lease": lease})
