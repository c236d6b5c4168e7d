"""Starting and ending session processes on a worker.

A session process is a fork of the worker's zygote (``session/zygote.py``), or ``python -m
jupyter_gpu.session`` where there is none: it writes one JSON line with its comm address once it
serves, then belongs to its lease. This module starts one (with the worker's TLS handed over in its
environment), reads that line within ``session.start-timeout``, and kills processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import IO, Any

from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import DEVICES_ENV, NANNY_KEY_ENV, SPAWN_KEY_ENV, Account
from jupyter_gpu.worker.containment import SessionGroup
from jupyter_gpu.worker.forkserver import ForkServer


@dataclass
class SessionProcess:
    """A session process the worker started, and the lease it serves (None while it is a spare)."""

    proc: Any  # subprocess.Popen, or a ForkedProcess (worker/forkserver.py)
    address: str
    # what its first ``assign`` must carry (it has it in its environment)
    spawn_key: str = ""
    control: socket.socket | None = None  # the worker's end of its private socket (worker/relay.py)
    lease: str | None = None
    secret: str | None = None  # its lease's secret: asked of every call once it holds the lease
    # the OS account it runs as (worker/accounts.py), when users are isolated
    account: Account | None = None
    # {"lease": LeaseView, "client"}: what a restarted broker needs to adopt it
    grant: dict[str, Any] | None = None
    # its cgroup: everything it starts, ended with it, capped in host memory
    group: SessionGroup | None = None
    killed: bool = False

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


def session_env(tls_env: dict[str, str], spawn_key: str | None = None) -> dict[str, str]:
    """A session's environment: the worker's, less what it must not have (the nanny's key, the
    worker's choice of devices), plus the key for its first ``assign`` and the worker's TLS (also
    when the worker got it from ``--tls-*`` options rather than from Dask config: the session serves
    the kernel's comm with it)."""
    env = {
        k: v for k, v in os.environ.items() if k not in (DEVICES_ENV, NANNY_KEY_ENV, SPAWN_KEY_ENV)
    }
    if spawn_key is not None:
        env[SPAWN_KEY_ENV] = spawn_key
    env.update(tls_env)
    return env


async def _read_address(stream: IO[bytes], proc: Any) -> dict:
    """The session's one JSON line (its address), within ``session.start-timeout``."""
    loop = asyncio.get_running_loop()
    timeout = config.get_seconds("session.start-timeout")  # a hung start, not a slow one: minutes
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
        try:
            code = await loop.run_in_executor(None, proc.wait, 30)
        except subprocess.TimeoutExpired:
            code = None
        reason = exit_reason(code) if code is not None else "it closed its pipe without an address"
        raise RuntimeError(f"a session process failed to start ({reason}); see the worker's log")
    return json.loads(line)


async def spawn_session(
    host: str, worker_address: str, tls_env: dict[str, str], forkserver: ForkServer | None = None
) -> SessionProcess:
    """Start a session process listening on ``host`` and wait until it serves: forked from the
    worker's zygote when it has one (milliseconds), else a new interpreter (seconds: it imports
    torch).

        It gets a key for its first ``assign`` (in its environment, which only this account can
        read) and one end of a socket pair: its only way to report to the pool
        (``worker/relay.py``). What it must not have, it does not get: the pool key, the nanny's
        key, the worker's choice of devices."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    spawn_key = secrets.token_urlsafe(24)
    env = session_env(tls_env, spawn_key)
    try:
        if forkserver is not None:
            read_end, write_end = os.pipe()
            try:
                proc: Any = await forkserver.fork(
                    {"env": env, "host": host, "worker": worker_address},
                    [theirs.fileno(), write_end],
                    timeout=config.get_seconds("session.start-timeout"),
                )
            except BaseException:
                os.close(read_end)
                raise
            finally:
                os.close(write_end)
            stream = os.fdopen(read_end, "rb")
        else:
            preload = ",".join(config.get("session.preload-modules") or [])
            cmd = [
                sys.executable,
                "-m",
                "jupyter_gpu.session",
                "--host",
                host,
                "--worker",
                worker_address,
                "--preload",
                preload,
                "--control-fd",
                str(theirs.fileno()),
            ]
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=os.getcwd(),
                pass_fds=(theirs.fileno(),),
            )
            stream = proc.stdout
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        info = await _read_address(stream, proc)
    except BaseException:
        ours.close()
        raise
    return SessionProcess(proc=proc, address=info["address"], spawn_key=spawn_key, control=ours)


def kill(proc: Any) -> None:
    try:
        proc.kill()
    except ProcessLookupError:
        pass
