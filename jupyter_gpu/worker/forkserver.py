"""The worker's side of its zygote (``session/zygote.py``): start it, ask it for sessions, learn how
they end.

A forked session is not this worker's child (it is the zygote's), so it comes with a
``ForkedProcess`` handle that behaves like the ``subprocess.Popen`` the worker keeps for a session
it started itself: ``pid``, ``poll()``, ``send_signal()``, ``kill()``. Its exit code arrives from
the zygote, which reaps it; signals go through a pidfd taken when the zygote reported the fork, so a
recycled pid is never signalled. If the zygote itself dies, its sessions die with it (parent-death
signal) and the next start brings up a new zygote.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import time
from typing import TypedDict, cast

from jupyter_gpu.common.protocol import ForkRequest, StarterInfo, ZygoteMessage
from jupyter_gpu.common.safe_python import python_command

log = logging.getLogger(__name__)

ZYGOTE_OPS = frozenset({"ready", "forked", "failed", "exited"})


class ForkFields(TypedDict):
    """What a fork request says besides its op and id (``protocol.ForkRequest``)."""

    env: dict[str, str]
    host: str
    worker: str


class ZygoteLost(RuntimeError):
    """The zygote ended before it answered a fork."""


class ForkedProcess:
    """A session forked by the zygote, as the worker sees it."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux >= 5.3, or already reaped
            self._pidfd = None

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except (ProcessLookupError, OSError):
            pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait (blocking; for tests and shutdown) until the zygote reports the exit."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.02)
        return self.returncode

    def _ended(self, code: int) -> None:
        self.returncode = code
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class ForkServer:
    """One zygote process and the sessions it forked for this worker."""

    def __init__(self, preload: list[str], env: dict[str, str]):
        self.preload = preload
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.ready = asyncio.Event()
        self.children: dict[int, ForkedProcess] = {}
        self._waiting: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task | None = None
        self.started_at = 0.0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the zygote (its imports take seconds; ``fork`` waits for them)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # from /, with python -I and only safe folders on its path: no module of anyone else's
        # (the worker's working folder, a user's folder on PYTHONPATH) is imported here
        cmd = python_command(
            "jupyter_gpu.session.zygote",
            *("--socket-fd", str(theirs.fileno()), "--preload", ",".join(self.preload)),
        )
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=self.env,
                cwd="/",
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.ready = asyncio.Event()
        self.started_at = time.monotonic()
        self._reader = asyncio.ensure_future(self._read(ours))

    async def _read(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    break
                try:
                    msg = json.loads(data)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("op") in ZYGOTE_OPS:
                    self._handle(cast(ZygoteMessage, msg))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            # only if this zygote is still ours: a reader cancelled by ``close`` runs this after
            # ``start`` made the next zygote's socket, which it must not close
            if self.sock is sock:
                self._lost()

    def _handle(self, msg: ZygoteMessage) -> None:
        """One datagram of the zygote (``common/protocol.py``'s ``ZygoteMessage``)."""
        if msg["op"] == "ready":
            log.info(
                "session zygote %s ready after %.1f s",
                msg.get("pid"),
                time.monotonic() - self.started_at,
            )
            self.ready.set()
        elif msg["op"] == "forked" or msg["op"] == "failed":
            fut = self._waiting.pop(cast(int, msg.get("id")), None)  # no id: finds nothing
            if fut is None or fut.done():
                return
            if msg["op"] == "forked":
                child = ForkedProcess(int(msg["pid"]))
                self.children[child.pid] = child
                fut.set_result(child)
            else:
                fut.set_exception(
                    RuntimeError(f"the session zygote could not fork: {msg.get('error')}")
                )
        elif msg["op"] == "exited":
            gone = self.children.pop(int(msg.get("pid", -1)), None)
            if gone is not None:
                gone._ended(int(msg.get("code", -9)))

    def _lost(self) -> None:
        """The zygote is gone: its children died with it (parent-death signal); nobody waits for a
        fork."""
        for child in self.children.values():
            child._ended(-signal.SIGKILL)
        self.children.clear()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ZygoteLost("the session zygote exited; see the worker's log"))
        self._waiting.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def fork(self, msg: ForkFields, fds: list[int], timeout: float) -> ForkedProcess:
        """A new session process (``msg``: its environment, host and worker; ``fds``: its three
        descriptors, handed to it).

        A zygote that died just before (killed, its death not yet seen here) is replaced and
        the fork asked of the new one, once: the start must not fail because the old zygote
        was still being reaped."""
        try:
            return await self._fork(msg, fds, timeout)
        except ZygoteLost:
            log.warning(
                "the session zygote exited during a start: starting a new one and trying again"
            )
            self.close()
            self.start()
            return await self._fork(msg, fds, timeout)

    async def _fork(self, msg: ForkFields, fds: list[int], timeout: float) -> ForkedProcess:
        if not self.alive() or self.sock is None:
            log.warning("the session zygote is not running: starting a new one")
            self.close()
            self.start()
        await asyncio.wait_for(self.ready.wait(), timeout)
        ident = next(self._ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[ident] = fut
        request: ForkRequest = {"op": "fork", "id": ident, **msg}
        data = json.dumps(request).encode()
        while True:
            if self.sock is None:
                self._waiting.pop(ident, None)
                raise ZygoteLost("the session zygote exited; see the worker's log")
            try:
                socket.send_fds(self.sock, [data], fds)
                break
            except BlockingIOError:
                await asyncio.sleep(0.005)
            except OSError as exc:  # its end of the socket is gone: it died
                self._waiting.pop(ident, None)
                raise ZygoteLost(
                    f"the session zygote exited ({exc.strerror}); see the worker's log"
                ) from None
        return await asyncio.wait_for(fut, timeout)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            self.proc = None
        self._lost()

    def info(self) -> StarterInfo:
        return {
            "pid": self.proc.pid if self.proc else None,
            "ready": self.ready.is_set(),
            "sessions": len(self.children),
        }
