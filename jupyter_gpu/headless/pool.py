"""A private embedded pool for one headless run or one test session, and lease hygiene checks.

A headless run must not share the user's interactive embedded pool (its GPUs may be busy, and a
test must not depend on what the user runs), so it starts its own, advertised in a runtime file
of its own. The pool process shuts itself down when it has had no Dask client for its idle
timeout;
:class:`PrivatePool` holds one client on it for as long as the run lasts. That keeps the pool up
while a notebook does slow local work before its first ``%%gpu`` cell, and it means that a runner
killed with SIGKILL still leaves nothing behind: its client disconnects and the pool exits by
itself a few seconds later.

:func:`release_kernel_leases` is the other half of the guarantee: after a kernel is shut down (or dies),
the broker frees its leases because the kernel's Dask client disconnected; this checks that
through ``gpu_snapshot`` and ends whatever is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from jupyter_gpu.common.refusals import Refused

log = logging.getLogger(__name__)

POOL_START_TIMEOUT = 120.0


class PrivatePool:
    """An embedded pool of this machine's GPUs (or virtual ones) that belongs to one run or test
    session.

        Use as a context manager, or call :meth:`start` and :meth:`stop`. ``virtual_gpus`` (e.g.
        ``2x16GiB``) makes the pool use virtual GPUs; ``None`` keeps whatever
        ``JUPYTER_GPU_VIRTUAL_GPUS`` says.
    """

    def __init__(
        self, virtual_gpus: str | None = None, label: str = "run", directory: str | None = None
    ):
        self.virtual_gpus = virtual_gpus
        self.label = label
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix=f"jupyter-gpu-{_safe(label)}-")
        self.path = os.path.join(self.directory, "pool.json")
        self.address: str | None = None
        self.pid: int | None = None
        # the pool's runtime record (address, pid, its TLS credentials' folder)
        self._record: Any = None
        self._client: Any = None

    @property
    def log_path(self) -> str:
        return self.path[: -len(".json")] + ".log"

    def start(self) -> str:
        """Start the pool and return its scheduler address (raises
        EmbeddedPoolError/NoGpuAvailable)."""
        from distributed import Client

        from jupyter_gpu.common.protocol import VIRTUAL_ENV
        from jupyter_gpu.common.security import client_security
        from jupyter_gpu.pool.discovery import read_record
        from jupyter_gpu.pool.launcher import ensure_embedded_pool

        started = time.monotonic()
        with _env(VIRTUAL_ENV, self.virtual_gpus):
            try:
                self.address = ensure_embedded_pool(
                    timeout=POOL_START_TIMEOUT, keep=False, path=self.path
                )
            except BaseException:
                self._own_dir = False  # keep the pool's log for the person reading the error
                raise
        record = self._record = read_record(self.path)
        self.pid = record.pid if record else None
        # the keep-alive client: see the module docstring. Like every client of an embedded pool, it
        # finds the pool's own TLS certificate from its address (client_security)
        self._client = Client(
            self.address,
            set_as_default=False,
            name=f"jupyter-gpu headless {self.label}",
            timeout=30,
            security=client_security(self.address),
        )
        log.info(
            "private pool %s at %s started in %.1f s (log %s)",
            self.label,
            self.address,
            time.monotonic() - started,
            self.log_path,
        )
        return self.address

    def stop(self) -> None:
        """Stop the pool (its workers and sessions with it) and remove its files."""
        from jupyter_gpu.pool.discovery import pid_alive
        from jupyter_gpu.pool.launcher import forget_credentials, stop_embedded_pool

        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close(timeout=5)
            self._client = None
        if self.pid is not None:
            # a short grace: the run is over, nothing in this pool is worth a slow orderly shutdown
            with contextlib.suppress(Exception):
                stop_embedded_pool(self.path, timeout=3)
            # the pool runs in a process group of its own (start_new_session) with its workers and
            # their session processes: make sure none of them outlives it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.pid = None
        if self._record is not None:
            # the pool's key goes with it, even when it had to be killed
            forget_credentials(self._record)
            self._record = None
        self.address = None
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "PrivatePool":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set an environment variable for the duration (the pool process inherits it)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40]


# ---------------------------------------------------------------------- broker queries
async def async_pool_snapshot(address: str, timeout: float = 10.0) -> dict:
    """The broker's ``gpu_snapshot``: GPUs with their leases, and the queue."""
    from jupyter_gpu.common.security import pool_rpc

    async with pool_rpc(address) as r:  # the pool's TLS, client role
        snap: dict = await asyncio.wait_for(r.gpu_snapshot(), timeout)
    return snap


def pool_snapshot(address: str, timeout: float = 10.0) -> dict:
    """Synchronous :func:`async_pool_snapshot` (for code that runs no event loop)."""
    return asyncio.run(async_pool_snapshot(address, timeout))


def kernel_holdings(snapshot: dict, kernel: str) -> tuple[list[str], list[str]]:
    """The lease ids and queued request ids that belong to ``kernel`` in a snapshot."""
    leases = sorted(
        {
            ls["id"]
            for gpu in snapshot.get("gpus", [])
            for ls in gpu.get("leases", [])
            if ls.get("kernel") == kernel
        }
    )
    queued = [item["id"] for item in snapshot.get("queue", []) if item.get("kernel") == kernel]
    return leases, queued


def all_leases(snapshot: dict) -> list[dict]:
    """Every lease in a snapshot, once each (a multi-GPU lease shows under each of its GPUs)."""
    seen: dict[str, dict] = {}
    for gpu in snapshot.get("gpus", []):
        for ls in gpu.get("leases", []):
            seen.setdefault(ls["id"], ls)
    return list(seen.values())


async def async_release_kernel_leases(address: str, kernel: str, wait: float = 10.0) -> list[str]:
    """Make sure ``kernel`` (shut down or dead) holds no lease and has nothing queued in the pool.

    The broker frees a kernel's leases by itself when the kernel's Dask client disconnects,
    which happens when the kernel process exits; this waits up to ``wait`` seconds for that,
    then ends what is left (killing its session). Returns the ids it had to end itself: normally
    none.
    """
    from jupyter_gpu.common.security import pool_rpc

    deadline = time.monotonic() + wait
    while True:
        try:
            leases, queued = kernel_holdings(await async_pool_snapshot(address), kernel)
        except Exception as exc:  # noqa: BLE001 - the pool itself is gone: it holds nothing any more
            log.debug("pool %s did not answer a snapshot: %s", address, exc)
            return []
        if not leases and not queued:
            return []
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    log.warning(
        "kernel %s still held %s in the pool %s after it stopped: ending them",
        kernel,
        ", ".join(leases + queued),
        address,
    )
    async with pool_rpc(address) as r:
        for rid in queued:
            with contextlib.suppress(Refused):  # it left the queue meanwhile
                await r.gpu_cancel(id=rid)
        for lid in leases:
            await r.gpu_release(lease=lid, reason="its headless kernel stopped")
    return leases + queued


def release_kernel_leases(address: str, kernel: str, wait: float = 10.0) -> list[str]:
    """Synchronous :func:`async_release_kernel_leases`."""
    return asyncio.run(async_release_kernel_leases(address, kernel, wait))


def pool_has_real_gpu(address: str) -> bool:
    """Whether the pool offers at least one real (not virtual) GPU: what ``requires-gpu`` cells
    need."""
    snap = pool_snapshot(address)
    return any(not gpu.get("virtual", True) for gpu in snap.get("gpus", []))
