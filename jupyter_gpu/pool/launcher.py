"""Starting and stopping this user's embedded pool, from a kernel, the Jupyter server, the CLI or a
headless run.

``ensure_embedded_pool()`` returns the address of this user's pool, starting one if none runs: a
detached process (``python -m jupyter_gpu.pool.embedded``, so it never blocks a kernel and survives
the kernel that started it), found again through its record in the Jupyter runtime directory
(``pool/discovery.py``). Kernels of one user race here when several start at once; a file lock makes
exactly one of them start the pool and the others join it.

Why apart from the pool itself (``pool/embedded.py``): the kernel and the Jupyter server only start
a child and read a file; they must not import the scheduler, the broker or the workers to do so
(``tests/test_architecture.py`` checks it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

from jupyter_gpu.common import config
from jupyter_gpu.common.inventory import discover
from jupyter_gpu.common.pool_credentials import remove_credentials, unregister
from jupyter_gpu.pool.discovery import PoolRecord, live_embedded_pool, runtime_file

log = logging.getLogger(__name__)


class EmbeddedPoolError(RuntimeError):
    """The embedded pool could not be started; the message carries the log's tail."""


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_embedded_pool(
    timeout: float | None = None, keep: bool = False, path: str | None = None
) -> str:
    """The scheduler address of this user's embedded pool, starting one if none is alive.

    Kernels of one user race here when several start at once; a file lock makes exactly one of
    them start the pool and the others join it.
    """
    path = path or runtime_file()
    timeout = timeout if timeout is not None else config.get_seconds("connect-timeout")
    with _locked(path):
        record = live_embedded_pool(path)
        if record is not None:
            return record.address
        # fail here, in the kernel, with the inventory's own message if the machine has no GPU at
        # all
        discover()
        log_path = path[: -len(".json")] + ".log"
        cmd = [sys.executable, "-m", "jupyter_gpu.pool.embedded", "--runtime-file", path]
        if keep:
            cmd.append("--keep")
        # the log names the pool's address and its credentials' folder: this user's only, like the
        # rest
        with os.fdopen(
            os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab"
        ) as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=os.getcwd(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = live_embedded_pool(path)
            if record is not None and record.pid == proc.pid:
                return record.address
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        raise EmbeddedPoolError(
            f"The embedded GPU pool did not start within {timeout:.0f} s. Its log ({log_path}) "
            "ends with:\n" + _tail(log_path)
        )


def stop_embedded_pool(path: str | None = None, timeout: float = 30.0) -> bool:
    """Ask the embedded pool advertised at ``path`` to shut down (workers and sessions included) and
    wait."""
    from jupyter_gpu.pool.discovery import pid_alive, read_record

    path = path or runtime_file()
    record = read_record(path)
    if record is None or not pid_alive(record.pid):
        return False
    os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(record.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(record.pid):
        os.kill(record.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.remove(path)
    forget_credentials(record)  # what a pool killed before it could clean up leaves behind
    return True


def forget_credentials(record: PoolRecord) -> None:
    """Remove the TLS credentials a stopped pool made, and their index entry (it removes them itself
    when it stops cleanly; this is for a pool that was killed)."""
    if record.tls:
        unregister(record.address)
        remove_credentials(record.tls)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"
