"""What a process tree listens on, seen from outside: its listening sockets (psutil) and whether any
of them answers HTTP.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Listener:
    pid: int
    command: str
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port} (pid {self.pid}: {self.command})"


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def listeners(*pids: int) -> list[Listener]:
    """Every listening TCP socket of the processes ``pids`` and all their descendants."""
    found = []
    for pid in pids:
        for proc in process_tree(pid):
            try:
                cmd = proc.cmdline()
                if cmd[1:3] == ["-I", "-c"] and len(cmd) > 4:  # common/safe_python's runner
                    cmd = [cmd[0], "-m", cmd[4]]  # shown as the module it runs
                command = " ".join(cmd[1:4])[:80]
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.append(Listener(proc.pid, command, conn.laddr.ip, conn.laddr.port))
            except psutil.NoSuchProcess:
                continue
    return sorted(set(found), key=lambda s: (s.pid, s.port))


def listening_sessions(*pids: int) -> int:
    """How many session processes under ``pids`` listen yet (started as ``python -m
    jupyter_gpu.session``, or forked from a worker's or the launcher's zygote, whose command line
    they keep: a zygote itself listens on nothing)."""
    kinds = ("jupyter_gpu.session", "jupyter_gpu.launcher.zygote")
    return len({s.pid for s in listeners(*pids) if any(k in s.command for k in kinds)})


def wait_for_sessions(count: int, *pids: int, timeout: float = 120.0) -> None:
    """Wait until ``count`` session processes listen, so that they are checked too."""
    deadline = time.monotonic() + timeout
    while listening_sessions(*pids) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    assert listening_sessions(*pids) >= count, (
        f"only {listening_sessions(*pids)} of {count} sessions listen"
    )


@contextlib.contextmanager
def sessions_on_every_gpu(address: str, gpus: int) -> Iterator[None]:
    """A real session on each GPU of the pool at ``address`` (a kernel holding a whole GPU each),
    for as long as the block runs: sessions exist only for leases (a worker's zygote listens on
    nothing)."""
    from tests.support.harness import Kernel

    kernels = []
    try:
        for i in range(gpus):
            k = Kernel(address, user=f"listener{i}")
            kernels.append(k)
            res = k.run("%%gpu --gpus 1\npass", timeout=180)
            assert res.error is None, res.error_text
        yield
    finally:
        for k in kernels:
            k.shutdown(now=True)


def answers_http(ip: str, port: int) -> bytes | None:
    """The first bytes of an HTTP answer to ``GET /health`` at ``ip:port``, or None if nothing
    answers HTTP.

        A Dask comm server speaks first (its handshake): such a port is not HTTP and is sent nothing
        (Dask would try to read an HTTP request as a frame length). A TLS comm server stays silent
        and fails the handshake.
    """
    host = "127.0.0.1" if ip in ("0.0.0.0", "") else "::1" if ip == "::" else ip
    try:
        with socket.create_connection((host, port), timeout=3) as sock:
            sock.settimeout(0.5)
            try:
                if sock.recv(1):
                    return None  # it spoke first: Dask's comm handshake
            except socket.timeout:
                pass
            sock.settimeout(3)
            sock.sendall(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            reply = sock.recv(64)
    except OSError:
        return None
    return reply if reply.startswith(b"HTTP/") else None
