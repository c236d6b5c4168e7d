"""The embedded pool: a whole GPU pool on this machine, started on demand, in its own processes.

``ensure_embedded_pool()`` returns the address of this user's pool, starting one if none runs: a
detached process (so it never blocks a kernel and survives the kernel that started it) that runs a
Dask scheduler with the broker and one worker per GPU (a Nanny-managed process each, with the GPU
worker plugin). It advertises itself in the Jupyter runtime directory and shuts itself down once
nobody has used it for ``jupyter-gpu.embedded.idle-timeout`` (no clients, no leases, no queue)
unless started with ``keep``.

It is private to its user: it listens on 127.0.0.1 only, serves no HTTP, and, unless the
administrator configured TLS in Dask config, runs every comm on mutual TLS with a CA and certificate
it makes on start (``jupyter_gpu.common.pool_credentials``; its clients find them from its address),
so another local account can neither connect to it nor read its key.

Run directly: ``python -m jupyter_gpu.pool.embedded`` (what ``jupyter-gpu pool up --embedded``
does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from jupyter_gpu.common import config
from jupyter_gpu.common.pool_credentials import (
    PoolCredentials,
    create_credentials,
    credentials_dir,
    register,
    remove_credentials,
    unregister,
)
from jupyter_gpu.common.protocol import DEVICES_ENV, VIRTUAL_ENV
from jupyter_gpu.common.security import (
    ROLES,
    describe,
    has_certificate,
    listen_scheme,
    pool_security,
    require_certificate,
)
from jupyter_gpu.pool.discovery import PoolRecord, live_embedded_pool, runtime_file, write_record
from jupyter_gpu.pool.listeners import PoolScheduler, PoolWorker, quiet_reachability_probes
from jupyter_gpu.worker.inventory import discover, parse_virtual_spec

if TYPE_CHECKING:
    from distributed.security import Security

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


def _worker_spec(
    index: int, virtual: str | None, host: str, security: Security | None = None
) -> dict:
    from distributed import Nanny

    env = {DEVICES_ENV: str(index)}
    if virtual:
        env[VIRTUAL_ENV] = virtual
    options = {
        "nthreads": 1,
        "host": host,
        "env": env,
        "name": f"gpu-{index}",
        "worker_class": PoolWorker,
        "preload": ["jupyter_gpu.worker.plugin"],
        "dashboard": False,
    }
    if security is not None:
        options["security"] = security
    return {"cls": Nanny, "options": options}


def _extend_virtual(spec: str, count: int) -> str:
    """A virtual spec with at least ``count`` GPUs (new ones the size of the first), for scaling
    out."""
    gpus = parse_virtual_spec(spec)
    sizes = [g.total_bytes for g in gpus] + [gpus[0].total_bytes] * max(0, count - len(gpus))
    return ",".join(f"{s}B" for s in sizes)


def pool_tls(
    path: str, security: Security | None = None
) -> tuple[Security, PoolCredentials | None]:
    """The embedded pool's TLS: the administrator's when Dask config (or ``pool up --embedded
    --tls-*``) gives the scheduler a certificate, else fresh credentials of its own next to its
    runtime file ``path`` (returned too, so that the pool removes them when it stops).

        Why always TLS: the pool listens on 127.0.0.1, which every account of the machine can reach,
        and any Dask peer can run code in its processes; its own certificate, readable only by its
        user, keeps the pool private with nothing to configure (its clients find it from its
        address: ``client_security``).
    """
    sec = security or pool_security()
    if has_certificate(sec, "scheduler"):
        return sec, None
    creds = create_credentials(credentials_dir(path))
    return creds.security(ROLES), creds


async def run_pool(
    path: str, keep: bool = False, host: str = "127.0.0.1", security: Security | None = None
) -> None:
    """Run the pool until it has been idle (no clients, leases or queue) for the idle timeout.

    ``security``: the pool's TLS (default: Dask config, see ``jupyter_gpu.common.security``);
    without a certificate there, the pool makes its own (:func:`pool_tls`). The scheduler
    listens on ``tls://``, the workers follow it, and kernels present the client certificate.
    """
    quiet_reachability_probes()
    # its credentials go next to the runtime file: `pool up --embedded` may be the first thing this
    # account runs, before Jupyter has made its runtime folder (private, as Jupyter makes it)
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    sec, own = pool_tls(path, security)
    try:
        await _serve(path, keep, host, sec, own)
    finally:
        if own is not None:
            remove_credentials(own.directory)


async def _serve(
    path: str, keep: bool, host: str, sec: Security, own: PoolCredentials | None
) -> None:
    from distributed import SpecCluster

    from jupyter_gpu.broker.plugin import PLUGIN_NAME

    protocol = listen_scheme("scheduler", sec)
    if protocol == "tls":
        require_certificate(sec, "scheduler", "The embedded pool's scheduler is to listen on TLS")
    virtual = os.environ.get(VIRTUAL_ENV) or config.get("embedded.virtual-gpus")
    gpus = discover(virtual)
    n_gpus = len(gpus)

    class GpuPool(SpecCluster):
        """SpecCluster whose new workers each take the next GPU."""

        def new_worker_spec(self) -> dict:
            used = {int(str(name).split("-")[-1]) for name in self.worker_spec}
            index = next(i for i in range(10_000) if i not in used)
            spec = _extend_virtual(virtual, index + 1) if virtual else None
            return {f"gpu-{index}": _worker_spec(index, spec, host, sec)}

    scheduler = {
        "cls": PoolScheduler,
        "options": {
            "host": host,
            "port": 0,
            "dashboard": False,
            "protocol": protocol,
            "security": sec,
            "preload": ["jupyter_gpu.broker.plugin"],
        },
    }
    workers = {f"gpu-{i}": _worker_spec(i, virtual, host, sec) for i in range(n_gpus)}
    cluster = await GpuPool(
        scheduler=scheduler, workers=workers, asynchronous=True, name="jupyter-gpu", security=sec
    )
    sched = cluster.scheduler
    assert sched is not None  # the cluster is started
    broker = sched.plugins[PLUGIN_NAME]
    broker.embedded = True

    from jupyter_gpu.pool.scaling import PoolScaler

    broker.scaler = PoolScaler(
        cluster,
        broker,
        max_workers=None if virtual else n_gpus,
        kind="embedded",
        manager="jupyter-gpu embedded pool",
    )
    # the pool is ready when every worker has reported its GPUs to the broker
    deadline = time.monotonic() + 120
    while len(broker.gpus) < n_gpus and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if own is not None:
        # before the advertisement: a kernel that finds the pool finds its key
        register(sched.address, own)
    write_record(
        PoolRecord(
            address=sched.address,
            pid=os.getpid(),
            started=time.time(),
            keep=keep,
            log=path[: -len(".json")] + ".log",
            tls=own.directory if own else None,
        ),
        path,
    )
    log.info(
        "embedded GPU pool at %s with %d GPU(s); %s%s",
        sched.address,
        len(broker.gpus),
        describe(sec, "scheduler"),
        f" (its own, in {own.directory})" if own else "",
    )
    idle_timeout = config.get_seconds(
        "embedded.keep-idle-timeout" if keep else "embedded.idle-timeout"
    )
    idle_since: float | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # stop_embedded_pool(): close workers and sessions cleanly
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
                break
            except asyncio.TimeoutError:
                pass
            clients = [c for c in sched.clients if c != "fire-and-forget"]
            idle = not clients and not broker.leases and not broker.queue
            if not idle:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > idle_timeout:
                if await _withdraw(path, sched, broker):
                    log.info("embedded pool idle for %.0f s: shutting down", idle_timeout)
                    break
                idle_since = None
    finally:
        record = live_embedded_pool(path)
        if record is None or record.pid == os.getpid():
            with contextlib.suppress(OSError):
                os.remove(path)
        if own is not None:
            unregister(sched.address)
        await broker.scaler.close()
        await cluster.close()  # type: ignore[misc]  # asynchronous: Dask types it sync-or-async


async def _withdraw(path: str, sched, broker, grace: float = 1.0) -> bool:  # noqa: ANN001
    """Stop advertising the pool, then give a kernel that read the file just before a moment to
    connect.

        Returns True if nobody came (shut down), False if somebody did (the pool is advertised
        again).
    """
    record = live_embedded_pool(path)
    with open(path + ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a kernel is looking for the pool right now: stay
        with contextlib.suppress(OSError):
            os.remove(path)
        fcntl.flock(lock, fcntl.LOCK_UN)
    await asyncio.sleep(grace)
    if [c for c in sched.clients if c != "fire-and-forget"] or broker.leases or broker.queue:
        if record is not None:
            write_record(record, path)
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run this user's embedded jupyter-gpu pool.")
    parser.add_argument("--runtime-file", default=None)
    parser.add_argument(
        "--keep", action="store_true", help="stay up for keep-idle-timeout when unused"
    )
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s pool %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run_pool(args.runtime_file or runtime_file(), keep=args.keep, host=args.host))


if __name__ == "__main__":
    main()
