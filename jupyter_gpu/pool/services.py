"""Long-running pool services for a pool that spans machines: the scheduler with the broker, and GPU
workers.

``jupyter-gpu pool up`` runs the scheduler (Dask ``Scheduler`` with the broker preloaded);
``jupyter-gpu worker ADDRESS`` runs one Nanny-managed Dask worker per local GPU, each with the GPU
worker plugin, so that a lost GPU process is restarted and reported like any Dask worker.

Each listens only where it was asked (the scheduler on ``--host``; nannies, workers and their
session processes on the worker's ``--host``, by default the address that reaches the scheduler),
with no HTTP server unless ``jupyter-gpu.http`` is set: see ``jupyter_gpu.pool.listeners``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
from typing import TYPE_CHECKING, Any

from jupyter_gpu.common import no_pickle
from jupyter_gpu.common.inventory import discover
from jupyter_gpu.common.protocol import DEVICES_ENV, VIRTUAL_ENV
from jupyter_gpu.common.security import (
    check_address,
    describe,
    listen_scheme,
    pool_security,
    require_certificate,
)
from jupyter_gpu.pool.draining import drain_before_stopping
from jupyter_gpu.pool.listeners import (
    PoolScheduler,
    PoolWorker,
    quiet_reachability_probes,
    worker_host,
)
from jupyter_gpu.worker.nanny import GpuNanny

if TYPE_CHECKING:
    from distributed.security import Security

    from jupyter_gpu.pool.cluster_manager import ManagerSettings

log = logging.getLogger(__name__)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_scheduler(host: str, port: int, security: Security | None = None) -> None:
    """The pool's scheduler with the broker; runs until SIGTERM/SIGINT.

    Stopping it leaves its workers running with their sessions: they wait for a scheduler at the
    same address (``worker.reconnect-timeout``), so starting it again on the same port is a restart
    that users see as a pause (docs/administration.md, Restarting the scheduler).

    ``security``: TLS of the ``scheduler`` role (default: Dask config, see
    ``jupyter_gpu.common.security``); when TLS is configured the scheduler listens on ``tls://``
    and accepts only peers with the pool's certificates.
    """
    from jupyter_gpu.broker.settings import load_settings
    from jupyter_gpu.pool import cluster_manager

    load_settings()  # the quota file, token file and audit store, checked before anything listens
    manager = cluster_manager.load_settings()  # and the cluster manager, if the pool owns one
    quiet_reachability_probes()
    sec = security or pool_security(roles=("scheduler",))
    protocol = listen_scheme("scheduler", sec)
    if protocol == "tls":
        require_certificate(sec, "scheduler", "The pool's scheduler is to listen on TLS")
    if manager is not None:
        await run_managed_scheduler(manager, host, port, protocol, sec)
        return
    async with PoolScheduler(
        host=host,
        port=port,
        protocol=protocol,
        security=sec,
        dashboard=False,
        preload=["jupyter_gpu.broker.plugin"],
        # a restart (SIGTERM, Ctrl-C) keeps the workers and their sessions: they wait for it
        leave_workers=True,
    ) as scheduler:
        print(f"jupyter-gpu pool scheduler at {scheduler.address}", flush=True)
        print(f"  {describe(sec, 'scheduler')}", flush=True)
        print(f"  join GPU machines with:  jupyter-gpu worker {scheduler.address}", flush=True)
        print(f"  use it from notebooks:   %gpu connect {scheduler.address}", flush=True)
        await _until_signalled()


async def run_managed_scheduler(
    settings: ManagerSettings, host: str, port: int, protocol: str, security: Security
) -> None:
    """The pool's scheduler inside the cluster manager that owns it
    (``jupyter-gpu.cluster-manager``): the broker's ``scaler`` submits and cancels its jobs. Every
    job is cancelled when this returns."""
    from jupyter_gpu.broker.plugin import PLUGIN_NAME
    from jupyter_gpu.broker.scaling import PoolScaler
    from jupyter_gpu.pool import cluster_manager
    from jupyter_gpu.pool.slurm import SlurmStates

    cluster = cluster_manager.build(settings, host, port, protocol, security)
    await cluster
    scaler = None
    try:
        broker = cluster.scheduler.plugins[PLUGIN_NAME]
        slurm = "SLURM" in type(cluster).__name__.upper()
        scaler = PoolScaler(
            cluster,
            cluster.scheduler,
            broker.ledger,
            per_job=settings.gpus_per_job,
            states=SlurmStates() if slurm else None,
            kind="slurm" if slurm else "dask",
            manager=settings.cls,
            allow_zero=True,
            idle=settings.idle,
            cooldown=settings.cooldown,
            interval=settings.interval,
            gpu_bytes=cluster_manager.gpu_bytes(settings),
        )
        broker.scaler = scaler
        address = cluster.scheduler.address
        print(f"jupyter-gpu pool scheduler at {address}", flush=True)
        print(f"  {describe(security, 'scheduler')}", flush=True)
        print(
            f"  GPU workers from {settings.cls} ({settings.gpus_per_job} per job): scale with %gpu "
            "scale N or "
            "the panel's Scale button",
            flush=True,
        )
        print(f"  use it from notebooks:   %gpu connect {address}", flush=True)
        scaler.start()
        if settings.adaptive is not None:
            await scaler(minimum=settings.adaptive[0], maximum=settings.adaptive[1])
        elif settings.workers:
            await scaler(n=settings.workers)
        await _until_signalled()
    finally:
        if scaler is not None:
            await scaler.close()
        await cluster.close()  # cancels every job (scancel), then stops the scheduler


def worker_names(gpus: list, name: str | None) -> list[str]:
    """The Dask names of a machine's GPU workers: ``name`` for a job with one GPU, ``name-gpuN`` for
    each of several (what a cluster manager's job spec expects, ``pool/cluster_manager.py``);
    without a name, the GPU's name and the end of its UUID."""
    if name is None:
        return [f"{gpu.name}-{gpu.uuid[-8:]}" for gpu in gpus]
    return [name] if len(gpus) == 1 else [f"{name}-gpu{gpu.index}" for gpu in gpus]


async def run_workers(
    address: str,
    host: str | None,
    virtual: str | None,
    security: Security | None = None,
    name: str | None = None,
    death_timeout: float | None = None,
    local_directory: str | None = None,
    launcher: int | None = None,
) -> int:
    """One Nanny-managed worker per GPU of this machine; runs until SIGTERM/SIGINT, then drains
    (``pool/draining.py``: its sessions move to other workers) and exits 0.

    ``security``: TLS of the ``worker`` role (default: Dask config). The workers listen with the
    scheme of ``address`` and hand their TLS settings on to their session processes (see the
    worker plugin). ``host``: where the nannies, workers and sessions listen; None: the address
    that reaches the scheduler (``worker_host``), not every interface. ``name``,
    ``death_timeout``, ``local_directory``: as dask-worker's (a cluster manager's job passes
    them). ``launcher``: the pid of the launcher this (root-started) service forked: if it dies,
    the service exits non-zero too (no session could start).
    """
    from distributed.core import Status

    no_pickle.install()  # the nannies run in this process (common/no_pickle.py)
    sec = security or pool_security(roles=("worker",))
    check_address(address, "worker", sec)
    gpus = discover(virtual)
    host = host or worker_host(address)
    env = {VIRTUAL_ENV: virtual} if virtual else {}
    # Dask puts a worker's local directory on its module path: a fresh private one, never a
    # predictable name another account could make first (Dask's /tmp/dask-scratch-space)
    scratch = private_scratch(local_directory)
    extra: dict[str, Any] = {"local_directory": scratch}
    if death_timeout is not None:
        extra["death_timeout"] = death_timeout
    nannies = [
        GpuNanny(
            address,
            nthreads=1,
            host=host,
            name=worker_name,
            env={**env, DEVICES_ENV: str(gpu.index)},
            dashboard=False,
            security=sec,
            worker_class=PoolWorker,
            preload=["jupyter_gpu.worker.plugin"],
            **extra,
        )
        for gpu, worker_name in zip(gpus, worker_names(gpus, name))
    ]
    await asyncio.gather(*(n.start() for n in nannies))
    print(
        f"jupyter-gpu: {len(nannies)} GPU worker(s) joined {address}: "
        + ", ".join(g.name for g in gpus)
        + f"; listening on {host}",
        flush=True,
    )
    print(f"  {describe(sec, 'worker')}", flush=True)
    signalled = asyncio.ensure_future(_until_signalled())
    try:
        # a worker that could not get back to its scheduler closes (with its nanny): then this
        # service exits non-zero, so that whatever supervises it (systemd, Slurm, Kubernetes) starts
        # it again
        while not signalled.done():
            await asyncio.wait({signalled}, timeout=1.0)
            closed = [
                n for n in nannies if n.status in (Status.closed, Status.closing, Status.failed)
            ]
            if closed and not signalled.done():
                print(
                    f"jupyter-gpu worker: {len(closed)} of {len(nannies)} GPU worker(s) stopped "
                    "(their scheduler "
                    f"at {address} is gone); exiting so that a supervisor restarts this service",
                    flush=True,
                )
                return 1
            if launcher is not None and os.waitpid(launcher, os.WNOHANG)[0] != 0:
                print(
                    "jupyter-gpu worker: its launcher exited (see above); exiting so that a "
                    "supervisor restarts this service",
                    flush=True,
                )
                return 1
        # stopped (systemd's stop or restart: SIGTERM to this process only): drain, then close
        await drain_before_stopping(
            address, [n.worker_address for n in nannies if n.worker_address], sec
        )
        return 0
    finally:
        signalled.cancel()
        await asyncio.gather(*(n.close() for n in nannies), return_exceptions=True)
        shutil.rmtree(scratch, ignore_errors=True)


def private_scratch(under: str | None = None) -> str:
    """A new folder for the workers' scratch space: random name, 0700, this account's (in
    ``under`` when a cluster manager's job names one)."""
    return tempfile.mkdtemp(prefix="jupyter-gpu-dask-", dir=under)
