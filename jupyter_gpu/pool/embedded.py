"""The embedded pool: a whole GPU pool on this machine, in its own process, started on demand.

This is the pool's process (``pool/launcher.py`` starts it, detached, for a kernel, the panel, the
CLI or a headless run): a Dask scheduler with the broker and one worker per GPU (a Nanny-managed
process each, with the GPU worker plugin). It advertises itself in the Jupyter runtime directory and
shuts itself down once nobody has used it for ``jupyter-gpu.embedded.idle-timeout`` (no clients, no
leases, no queue) unless started with ``keep``.

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
import time
from typing import TYPE_CHECKING, Any

from jupyter_gpu.broker.plugin import PLUGIN_NAME, GpuBroker
from jupyter_gpu.broker.scaling import PoolScaler
from jupyter_gpu.common import config, no_pickle
from jupyter_gpu.common.inventory import discover, parse_virtual_spec
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

if TYPE_CHECKING:
    from distributed.security import Security

log = logging.getLogger(__name__)


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
        # Dask puts it on the worker's module path: private, never a name another account could
        # make first (Dask's default /tmp/dask-scratch-space)
        "local_directory": _scratch(),
    }
    if security is not None:
        options["security"] = security
    return {"cls": Nanny, "options": options}


_scratch_folder: list[str] = []


def _scratch() -> str:
    """This pool's private scratch folder (random name, 0700; removed when the process exits)."""
    if not _scratch_folder:
        import atexit
        import shutil
        import tempfile

        _scratch_folder.append(tempfile.mkdtemp(prefix="jupyter-gpu-dask-"))
        atexit.register(shutil.rmtree, _scratch_folder[0], True)
    return _scratch_folder[0]


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
    no_pickle.install()  # the nannies of this process too (common/no_pickle.py)
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
    virtual = os.environ.get(VIRTUAL_ENV) or config.get("embedded.virtual-gpus")
    n_gpus = len(discover(virtual))
    cluster, broker = await _start_cluster(host, sec, virtual, n_gpus)
    sched = broker.sched
    try:
        # the pool is ready when every worker has reported its GPUs to the broker
        deadline = time.monotonic() + 120
        while len(broker.ledger.gpus) < n_gpus and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        _advertise(path, keep, sched.address, sec, own)
        log.info(
            "embedded GPU pool at %s with %d GPU(s); %s%s",
            sched.address,
            len(broker.ledger.gpus),
            describe(sec, "scheduler"),
            f" (its own, in {own.directory})" if own else "",
        )
        await _until_idle(path, keep, broker)
    finally:
        record = live_embedded_pool(path)
        if record is None or record.pid == os.getpid():
            with contextlib.suppress(OSError):
                os.remove(path)
        if own is not None:
            unregister(sched.address)
        assert broker.scaler is not None  # set by _start_cluster
        await broker.scaler.close()
        await cluster.close()


async def _start_cluster(
    host: str, sec: Security, virtual: str | None, n_gpus: int
) -> tuple[Any, GpuBroker]:
    """The pool's ``SpecCluster``: a scheduler with the broker (whose scaler adds a worker per GPU
    it is asked for) and a worker per GPU."""
    from distributed import SpecCluster

    protocol = listen_scheme("scheduler", sec)
    if protocol == "tls":
        require_certificate(sec, "scheduler", "The embedded pool's scheduler is to listen on TLS")

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
    broker: GpuBroker = sched.plugins[PLUGIN_NAME]
    broker.embedded = True
    broker.scaler = PoolScaler(
        cluster,
        sched,
        broker.ledger,
        max_workers=None if virtual else n_gpus,
        kind="embedded",
        manager="jupyter-gpu embedded pool",
    )
    return cluster, broker


def _advertise(
    path: str, keep: bool, address: str, sec: Security, own: PoolCredentials | None
) -> None:
    """Write the pool's record in the runtime directory (its credentials' index entry first: a
    kernel that finds the pool finds its key)."""
    if own is not None:
        register(address, own)
    write_record(
        PoolRecord(
            address=address,
            pid=os.getpid(),
            started=time.time(),
            keep=keep,
            log=path[: -len(".json")] + ".log",
            tls=own.directory if own else None,
        ),
        path,
    )


def _in_use(broker: GpuBroker) -> bool:
    """Whether anyone uses the pool: a kernel connected, a lease, a request waiting."""
    clients = [c for c in broker.sched.clients if c != "fire-and-forget"]
    return bool(clients or broker.ledger.leases or broker.ledger.queue)


async def _until_idle(path: str, keep: bool, broker: GpuBroker) -> None:
    """Serve until nobody has used the pool for the idle timeout (or SIGTERM, SIGINT)."""
    idle_timeout = config.get_seconds(
        "embedded.keep-idle-timeout" if keep else "embedded.idle-timeout"
    )
    idle_since: float | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # stop_embedded_pool(): close workers and sessions cleanly
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
            break
        except asyncio.TimeoutError:
            pass
        if _in_use(broker):
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > idle_timeout:
            if await _withdraw(path, broker):
                log.info("embedded pool idle for %.0f s: shutting down", idle_timeout)
                return
            idle_since = None


async def _withdraw(path: str, broker: GpuBroker, grace: float = 1.0) -> bool:
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
    if _in_use(broker):
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
