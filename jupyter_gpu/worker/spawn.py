"""Starting and ending session processes on a worker.

A session process is a fork of a zygote (``session/zygote.py``: the worker's own, or the launcher's
when users are isolated), or ``python -m jupyter_gpu.session`` where there is none. It is handed
three descriptors: one end of a socket pair to its worker (its only way to report: ``relay.py``; the
worker first writes on it the key for the session's first ``assign``), the write end of a pipe on
which it announces its address once it serves, and the write end of the pipe its log goes to (fds 1
and 2; the worker reads the other end into its own log, each line marked with the session). This
module makes those, starts a session of the worker's own account, reads its address within
``session.start-timeout``, and kills processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from typing import IO, Any

from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import DEVICES_ENV, NANNY_KEY_ENV
from jupyter_gpu.common.safe_python import python_command
from jupyter_gpu.launcher.cgroups import SessionGroup
from jupyter_gpu.worker.forkserver import ForkServer
from jupyter_gpu.worker.launcher_link import SOCKET_ENV, LauncherLink

log = logging.getLogger(__name__)

MAX_LOG_LINE = 8192


@dataclass
class SessionProcess:
    """A session process the worker started, and the lease it serves (None while it is a spare)."""

    proc: Any  # subprocess.Popen, a ForkedProcess (forkserver.py) or a LaunchedProcess
    address: str
    # what its first ``assign`` must carry (the worker wrote it on its private socket)
    spawn_key: str = ""
    control: socket.socket | None = None  # the worker's end of its private socket (worker/relay.py)
    lease: str | None = None
    secret: str | None = None  # its lease's secret: asked of every call once it holds the lease
    user: str | None = None  # the pool user whose account it runs as (launched sessions)
    # {"lease": LeaseView, "client"}: what a restarted broker needs to adopt it
    grant: dict[str, Any] | None = None
    # its cgroup, when the worker made it (the launcher's sessions: the launcher's)
    group: SessionGroup | None = None
    launched: bool = False  # started by the launcher, as its user
    # the launcher's sessions: how it contained them (kind, host-memory limit)
    containment: tuple[str, int | None] | None = None
    killed: bool = False
    log_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid


def exit_reason(code: int) -> str:
    """Words for a session process's exit code."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {
            "SIGKILL": " (often the operating system's out-of-memory killer)",
            "SIGSEGV": " (a crash in native code)",
            "SIGABRT": " (an abort in native code)",
        }.get(name, "")
        return f"the session process was killed by {name}{hint}"
    return f"the session process exited with code {code}"


def session_env(tls_env: dict[str, str]) -> dict[str, str]:
    """A session's environment: the worker's, less what it must not have (the nanny's key, the
    launcher's socket, the worker's choice of devices), plus the worker's TLS (also when the worker
    got it from ``--tls-*`` options rather than from Dask config: the session serves the kernel's
    comm with it)."""
    env = {k: v for k, v in os.environ.items() if k not in (DEVICES_ENV, NANNY_KEY_ENV, SOCKET_ENV)}
    env.update(tls_env)
    return env


@dataclass
class Handover:
    """What a new session is handed (``fds``: its ends, in the order the zygote and the launcher
    expect), and the worker's ends."""

    ours: socket.socket  # the private socket's worker end
    ready: int  # the address pipe's read end
    log: int  # the log pipe's read end
    spawn_key: str
    fds: list[int]

    def close_theirs(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def close(self) -> None:
        self.close_theirs()
        self.ours.close()
        for fd in (self.ready, self.log):
            try:
                os.close(fd)
            except OSError:
                pass


def handover() -> Handover:
    """A socket pair and two pipes for a new session; the key for its first ``assign`` is written
    on the socket before the session exists (nothing else carries it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ready_r, ready_w = os.pipe()
    log_r, log_w = os.pipe()
    key = secrets.token_urlsafe(24)
    ours.sendall(json.dumps({"spawn_key": key}).encode() + b"\n")
    theirs_fd = theirs.detach()
    return Handover(ours, ready_r, log_r, key, [theirs_fd, ready_w, log_w])


async def read_address(h: Handover, proc: Any) -> dict:
    """The session's one JSON line (its address), within ``session.start-timeout``."""
    loop = asyncio.get_running_loop()
    timeout = config.get_seconds("session.start-timeout")  # a hung start, not a slow one: minutes
    stream: IO[bytes] = os.fdopen(h.ready, "rb")
    try:
        line = await asyncio.wait_for(loop.run_in_executor(None, stream.readline), timeout)
    except asyncio.TimeoutError:
        kill(proc)
        raise RuntimeError(
            f"a session process did not start within {timeout:.0f} s (jupyter-gpu.session."
            "start-timeout); the worker's log says where it hung"
        ) from None
    finally:
        stream.close()
    if not line:
        code = await loop.run_in_executor(None, proc.wait, 30)
        reason = exit_reason(code) if code is not None else "it closed its pipe without an address"
        raise RuntimeError(f"a session process failed to start ({reason}); see the worker's log")
    return json.loads(line)


def relay_log(fd: int, sp: SessionProcess) -> asyncio.Task[None]:
    """The session's log, line by line, into the worker's (marked with its lease or pid)."""

    async def read() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LOG_LINE)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb")
        )
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    continue
                if not line:
                    return
                text = line.decode(errors="replace").rstrip()
                log.warning("[session %s] %s", sp.lease or f"pid {sp.pid}", text[:MAX_LOG_LINE])
        finally:
            transport.close()

    return asyncio.ensure_future(read())


async def spawn_session(
    host: str, worker_address: str, tls_env: dict[str, str], forkserver: ForkServer | None = None
) -> SessionProcess:
    """Start a session process of this worker's account listening on ``host`` and wait until it
    serves: forked from the worker's zygote when it has one (milliseconds), else a new interpreter
    (seconds: it imports torch). What it must not have, it does not get: the pool key, the nanny's
    key, the launcher's socket, the worker's choice of devices."""
    h = handover()
    env = session_env(tls_env)
    try:
        if forkserver is not None:
            proc: Any = await forkserver.fork(
                {"env": env, "host": host, "worker": worker_address},
                h.fds,
                timeout=config.get_seconds("session.start-timeout"),
            )
        else:
            control, ready, log_w = h.fds
            preload = ",".join(config.get("session.preload-modules") or [])
            cmd = python_command(
                "jupyter_gpu.session",
                *("--host", host, "--worker", worker_address, "--preload", preload),
                *("--control-fd", str(control), "--ready-fd", str(ready)),
            )
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_w,
                stderr=log_w,
                env=env,
                cwd="/",
                pass_fds=(control, ready),
            )
    except BaseException:
        h.close()
        raise
    h.close_theirs()
    sp = SessionProcess(proc=proc, address="", spawn_key=h.spawn_key, control=h.ours)
    sp.log_task = relay_log(h.log, sp)
    try:
        sp.address = (await read_address(h, proc))["address"]
    except BaseException:
        h.ours.close()
        raise
    return sp


async def launch_session(
    launcher: LauncherLink,
    lease: str,
    user: str | None,
    grant: str,
    host: str,
    env: dict[str, str],
) -> tuple[SessionProcess, str]:
    """A session of ``user`` for ``lease``, started by the launcher on the broker's ``grant``
    (confined and in its cgroup before it runs anything); with its host-memory folder."""
    h = handover()
    try:
        proc, reply = await launcher.start(lease, grant, host, env, h.fds)
    except BaseException:
        h.close()
        raise
    h.close_theirs()
    sp = SessionProcess(
        proc=proc,
        address="",
        spawn_key=h.spawn_key,
        control=h.ours,
        lease=lease,
        user=user,
        launched=True,
        containment=(reply.get("containment", "process group"), reply.get("host_memory_limit")),
    )
    sp.log_task = relay_log(h.log, sp)
    try:
        sp.address = (await read_address(h, proc))["address"]
    except BaseException:
        h.ours.close()
        raise
    return sp, reply["folder"]


def kill(proc: Any) -> None:
    try:
        proc.kill()
    except ProcessLookupError:
        pass
