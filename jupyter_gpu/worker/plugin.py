"""The GPU worker plugin: offers this worker's GPUs to the broker and owns their session processes.

It keeps a zygote (``worker/forkserver.py``, ``session/zygote.py``: Python, NumPy, torch, IPython
imported) and forks a session from it in milliseconds, or, with ``session.fork-server: false``, one
spare session process warm; either way a first cell does not pay for the imports. It hands the
session a lease when the broker grants one, watches every session process, and tells the broker when
one ends (crash, OOM kill, exit). On real GPUs a background thread samples NVML for the panel;
nothing NVML runs on the event loop.

This class is Dask's side of the worker: its hooks, its handlers (each declared with who may call
it: ``common/handlers.py``) and what it tells the broker. The sessions themselves, and their
variables in host memory, are the ``SessionManager``'s (``worker/session_manager.py``).

Who may call it: the broker (and, for a parked namespace, another worker) with the pool key
(``common/poolkey.py``); nobody else. Sessions report through their private socket
(``worker/relay.py``). When the pool isolates users and ``jupyter-gpu worker`` was started as root,
each session runs as its user: the launcher it forked starts it on the broker's signed grant
(``worker/launcher_link.py``, ``launcher/``); this worker itself runs as the pool's service
account.

Load it into any Dask worker with ``--preload jupyter_gpu.worker.plugin``. The GPUs it offers are
this machine's (NVML or ``JUPYTER_GPU_VIRTUAL_GPUS``), restricted to ``JUPYTER_GPU_DEVICES=0,1``
(indices) when several workers share one machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable, Literal

from distributed.diagnostics.plugin import WorkerPlugin

from jupyter_gpu.common import no_pickle, poolkey
from jupyter_gpu.common.handlers import handler, handlers_of
from jupyter_gpu.common.hostmem import spill_base, sweep_stale
from jupyter_gpu.common.inventory import GpuInfo, discover
from jupyter_gpu.common.protocol import (
    DEVICES_ENV,
    FetchedOffload,
    GpuInfoMsg,
    LeaseView,
    OffloadResult,
    RestoreRef,
    SessionStarted,
    StarterInfo,
)
from jupyter_gpu.common.refusals import NotAuthorized, NotPossible
from jupyter_gpu.common.validation import Address, Name, Seconds, Secret, Text
from jupyter_gpu.worker.host_share import HostShare, left_to_sessions
from jupyter_gpu.worker.launcher_link import LauncherLink
from jupyter_gpu.worker.nvml_sampler import NvmlSampler
from jupyter_gpu.worker.session_manager import SessionManager, forwarding, start_concurrency
from jupyter_gpu.worker.spawn import SessionProcess

log = logging.getLogger(__name__)

PLUGIN_NAME = "jupyter-gpu-worker"
NOT_THE_BROKER = (
    "only the pool's broker may call this (it holds the pool key; see docs/security.md)"
)


class GpuWorkerPlugin(WorkerPlugin):
    """See the module docstring."""

    name = PLUGIN_NAME

    def __init__(self, virtual_gpus: str | None = None, devices: str | None = None):
        self.virtual_gpus = virtual_gpus
        self.devices = devices
        self.gpus: list[GpuInfo] = []
        self.manager: SessionManager  # its sessions: made by setup(), with the worker
        self._sampler: NvmlSampler | None = None
        self.pool_key: str | None = None
        self.host_share = HostShare(None, None)  # its part of the machine (host_share.py)

    # ------------------------------------------------------------------ lifecycle
    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The GPU plugin's worker handlers: its methods declared with ``@handler``."""
        return handlers_of(self)

    async def setup(self, worker) -> None:  # noqa: ANN001
        self.worker = worker
        gpus = discover(self.virtual_gpus)
        machine_gpus = len(gpus)
        wanted = self.devices or os.environ.get(DEVICES_ENV)
        if wanted:
            keep = {int(i) for i in wanted.split(",") if i.strip()}
            gpus = [g for g in gpus if g.index in keep]
        self.gpus = gpus
        try:  # what this worker's part of the machine leaves to sessions, said at registration
            self.host_share = left_to_sessions(len(gpus), machine_gpus)
        except ValueError as exc:
            log.error("%s. Until then this worker's sessions book no host memory or cores.", exc)
        self.pool_key = poolkey.read_key(poolkey.key_path(worker.scheduler.address))
        # what earlier workers on this machine left behind when they were killed: host-memory
        # folders, disk folders of spilled copies (and, in the session manager, cgroups)
        for folder in sweep_stale() + sweep_stale(spill_base()):
            log.warning("removed the copies' folder %s of a worker that is gone", folder)
        launcher = LauncherLink.from_environment()
        if launcher is not None:
            await launcher.open(worker.address)
            launcher.on_exit = lambda proc: None  # seen by _check_sessions (LaunchedProcess.poll)
        elif os.geteuid() == 0:
            log.warning(
                "this worker runs as root without jupyter-gpu's launcher: in a pool that isolates "
                "users it refuses sessions (start it with `jupyter-gpu worker`, which gives root up "
                "and keeps it only in the launcher)"
            )
        self.manager = SessionManager(worker, gpus, launcher)
        self.manager.copies.pool_key = self.pool_key
        worker.handlers.update(self.handlers())
        # what the broker tells this worker on the scheduler's stream (nobody else writes there)
        worker.stream_handlers["gpu_sessions_refused"] = self.gpu_sessions_refused
        from tornado.ioloop import PeriodicCallback

        self._monitor = PeriodicCallback(self._check_sessions, 250)
        self._monitor.start()
        self.manager.prewarm()
        asyncio.ensure_future(self._report_when_registered())
        self._sampler = NvmlSampler(self.gpus, worker.loop.asyncio_loop, self._send_samples)
        self._sampler.start()

    async def teardown(self, worker) -> None:  # noqa: ANN001
        if self._sampler is not None:
            self._sampler.stop()
        self._monitor.stop()
        self.manager.close()

    def _check_broker(self, key: str | None) -> None:
        if not poolkey.matches(key, self.pool_key):
            raise NotAuthorized(NOT_THE_BROKER)

    # ------------------------------------------------------------------ handlers: sessions
    @handler("gpu_session_start", caller="broker", check="pool-key")
    async def gpu_session_start(
        self,
        lease: LeaseView,
        scheduler: Address | None = None,
        restore: RestoreRef | None = None,
        client: Name | None = None,
        secret: Secret | None = None,
        account: Name | None = None,
        grant: Text | None = None,
        key: Secret | None = None,
    ) -> SessionStarted:
        """Start a session for the lease: pinned, capped, restored; returns its address.
        ``account``: the pool user whose OS account the session runs as (the pool isolates users);
        ``grant``: the broker's signed grant, which a worker started as root hands to its launcher
        (it checks it: as the user, or as the pool's service account, confined either way); a
        worker without one runs sessions as its own account (users not isolated)."""
        self._check_broker(key)
        self.manager.check_lease(lease)
        launched: tuple[str | None, str] | None = None
        if self.manager.launcher is not None and grant is not None:
            launched = (account, grant)  # the launcher checks the grant: as the user, or us
        elif self.manager.launcher is not None and account is not None:
            raise NotPossible(
                "the broker sent no signed grant for a session that runs as its user: start "
                "`jupyter-gpu pool up` as root (it signs grants with a key only root reads)"
            )
        elif account is not None and os.geteuid() == 0:
            raise NotPossible(
                "this worker runs as root without jupyter-gpu's launcher, so its sessions would "
                "run as root: start it with `jupyter-gpu worker` (it keeps root only in the "
                "launcher, which runs sessions as their users)"
            )
        return await self.manager.start(
            lease, client, secret or "", launched, restore, forwarding(self._forward)
        )

    @handler("gpu_session_signal", caller="broker", check="pool-key")
    async def gpu_session_signal(
        self, lease: Name, signal: Literal["interrupt", "kill"] = "kill", key: Secret | None = None
    ) -> None:
        """Interrupt or kill a lease's session (nothing to do when none runs here)."""
        self._check_broker(key)
        if signal == "kill":
            self.manager.kill(lease)
            return
        sp = self.manager.sessions.get(lease)
        if sp is not None:
            sp.proc.send_signal(2)

    @handler("gpu_session_starter", caller="anyone", check="none")
    async def gpu_session_starter(self) -> StarterInfo:
        """How this worker starts sessions (its zygote, or a spare) and whether a start is warm now
        (benchmarks and tests wait for it)."""
        return self.manager.starter_info()

    @handler("gpu_inventory", caller="anyone", check="none")
    def gpu_inventory(self) -> list[GpuInfoMsg]:
        """The GPUs this worker owns."""
        return [g.message() for g in self.gpus]

    # ------------------------------------------------------------------ handlers: host memory
    @handler("gpu_session_offload", caller="broker", check="pool-key")
    async def gpu_session_offload(
        self, lease: Name, timeout: Seconds = 60.0, key: Secret | None = None
    ) -> OffloadResult:
        """Move a session's variables to host memory on this machine (its lease is being
        reclaimed); the broker ends the process afterwards."""
        self._check_broker(key)
        return await self.manager.offload(lease, timeout)

    @handler("gpu_offload_fetch", caller="worker", check="pool-key")
    async def gpu_offload_fetch(self, lease: Name, key: Secret | None = None) -> FetchedOffload:
        """Hand the offloaded namespace of ended lease ``lease`` to the worker where its owner's
        next session starts, and forget it."""
        self._check_broker(key)
        return {"data": await self.manager.copies.fetch(lease)}

    @handler("gpu_offload_discard", caller="broker", check="pool-key")
    def gpu_offload_discard(self, lease: Name, key: Secret | None = None) -> None:
        """Forget the offloaded namespace of ended lease ``lease``: nobody will restore it (its
        kernel ended)."""
        self._check_broker(key)
        self.manager.copies.forget(lease, frozenset(self.manager.sessions))

    @handler("gpu_offload_spill", caller="broker", check="pool-key")
    async def gpu_offload_spill(self, lease: Name, key: Secret | None = None) -> int:
        """Move the offloaded namespace of ended lease ``lease`` from host memory to the pool's
        disk folder: the broker needs the memory for sessions (``broker/hosts.py``); its owner's
        next cell restores it from there. Returns the bytes moved."""
        self._check_broker(key)
        return await self.manager.copies.spill(lease)

    # ------------------------------------------------------------------ talking to the broker
    async def _report_when_registered(self) -> None:
        from distributed.core import Status

        for _ in range(600):
            if self.worker.status == Status.running:
                break
            await asyncio.sleep(0.05)
        await self._report()

    async def reconnected(self) -> None:
        """The worker joined a restarted scheduler (``dask_worker.GpuDaskWorker``): offer the GPUs
        again, with the sessions that live here and the variables parked here, for the new broker to
        adopt."""
        await self._report()

    async def _report(self) -> None:
        """Offer the GPUs on this worker's own stream (only it can write there: the broker takes
        the worker's address from the stream, not from what the message says)."""
        try:  # a scheduler without the broker would drop this worker's stream for an unknown op
            await self.worker.scheduler.gpu_usage(since=time.time())
        except Exception as exc:  # noqa: BLE001 - any failure: the pool gets no GPUs from this worker, said once
            log.error(
                "could not register GPUs with the scheduler (is the broker loaded there? start it "
                "with `jupyter-gpu pool up` or --preload jupyter_gpu.broker.plugin): %s",
                exc,
            )
            return
        live = await self.manager.live()
        parked = [entry.copy for entry in self.manager.copies.parked.values()]
        self._tell(
            "gpu_register_worker",
            gpus=self.gpu_inventory(),
            sessions=live,
            parked=parked,
            start_slots=start_concurrency(),
            accounts=self.manager.launcher is not None,
            host_memory=self.host_share.memory,
            cpus=self.host_share.cpus,
        )
        if live or parked:
            log.info(
                "reported %d live session(s) and %d parked namespace(s) to the broker",
                len(live),
                len(parked),
            )

    def _tell(self, op: str, **fields: Any) -> None:
        """One report to the broker, on this worker's stream to the scheduler."""
        if self.worker.batched_stream is None or self.worker.batched_stream.comm is None:
            log.debug("not connected to the scheduler: %s not sent", op)
            return
        self.worker.batched_stream.send({"op": op, **fields})

    def gpu_sessions_refused(self, leases: list[str] | tuple[str, ...] = (), **_: Any) -> None:
        """The broker (on the scheduler's stream to this worker) could not adopt these sessions
        after a restart: end them."""
        for lease in leases:
            if isinstance(lease, str):
                log.warning("the broker did not adopt the session of lease %s: ending it", lease)
                self.manager.kill(lease)

    async def _forward(self, sp: SessionProcess, op: str, fields: dict[str, Any]) -> None:
        """A session's checked report, on to the broker, about its own lease
        (``worker/relay.py``)."""
        if op == "lease_state":
            self._tell("gpu_lease_state", lease=sp.lease, **fields)
        elif op == "run_metrics":
            self._tell("gpu_run_metrics", lease=sp.lease, **fields)

    async def _send_samples(self, samples: dict[str, Any]) -> None:
        self._tell("gpu_samples", samples=samples)

    async def _check_sessions(self) -> None:
        for lease, reason in self.manager.exits():
            log.warning("session for lease %s ended: %s", lease, reason)
            self._tell("gpu_session_ended", lease=lease, reason=reason)


async def dask_setup(worker) -> None:  # noqa: ANN001
    """``--preload jupyter_gpu.worker.plugin``: install the GPU plugin on this worker (which then
    reads no pickles: ``common/no_pickle.py``)."""
    no_pickle.install()
    await worker.plugin_add(GpuWorkerPlugin(), name=PLUGIN_NAME)
