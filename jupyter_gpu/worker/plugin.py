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
(``worker/relay.py``). When the broker says the pool isolates users and this worker runs as root,
each session runs as its user (``worker/accounts.py``, ``session/account.py``).

Load it into any Dask worker with ``--preload jupyter_gpu.worker.plugin``. The GPUs it offers are
this machine's (NVML or ``JUPYTER_GPU_VIRTUAL_GPUS``), restricted to ``JUPYTER_GPU_DEVICES=0,1``
(indices) when several workers share one machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable, Literal

from distributed.diagnostics.plugin import WorkerPlugin

from jupyter_gpu.common import poolkey
from jupyter_gpu.common.handlers import handler, handlers_of
from jupyter_gpu.common.hostmem import sweep_stale
from jupyter_gpu.common.inventory import GpuInfo, discover
from jupyter_gpu.common.protocol import (
    DEVICES_ENV,
    Account,
    FetchedOffload,
    GpuInfoMsg,
    LeaseView,
    OffloadResult,
    RestoreRef,
    SessionStarted,
    StarterInfo,
)
from jupyter_gpu.common.refusals import CallError, NotAuthorized, NotPossible
from jupyter_gpu.common.validation import Address, Name, Seconds, Secret, Text
from jupyter_gpu.worker.accounts import NoAccount, account_of, can_switch_users
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

    # ------------------------------------------------------------------ lifecycle
    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The GPU plugin's worker handlers: its methods declared with ``@handler``."""
        return handlers_of(self)

    async def setup(self, worker) -> None:  # noqa: ANN001
        self.worker = worker
        gpus = discover(self.virtual_gpus)
        wanted = self.devices or os.environ.get(DEVICES_ENV)
        if wanted:
            keep = {int(i) for i in wanted.split(",") if i.strip()}
            gpus = [g for g in gpus if g.index in keep]
        self.gpus = gpus
        self.pool_key = poolkey.read_key(poolkey.key_path(worker.scheduler.address))
        # what earlier workers on this machine left behind when they were killed: host-memory
        # folders (and, in the session manager, cgroups)
        for folder in sweep_stale():
            log.warning("removed the host-memory folder %s of a worker that is gone", folder)
        self.manager = SessionManager(worker, gpus)
        self.manager.copies.pool_key = self.pool_key
        worker.handlers.update(self.handlers())
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
        key: Secret | None = None,
    ) -> SessionStarted:
        """Give a (pre-warmed) session process the lease: its account, its group, pinned, capped,
        restored; returns its address. ``account``: the pool user whose OS account the session runs
        as (the broker sends it when the pool isolates users; it applies when this worker runs as
        root)."""
        self._check_broker(key)
        self.manager.check_lease(lease)
        who: Account | None = None
        if account is not None and can_switch_users():
            try:
                who = account_of(account)
            except NoAccount as exc:
                raise NotPossible(str(exc)) from None
        return await self.manager.start(
            lease, client, secret or "", who, restore, forwarding(self._forward)
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
    def gpu_offload_fetch(self, path: Text, key: Secret | None = None) -> FetchedOffload:
        """Hand an offloaded namespace to the worker where its owner's next session starts, and
        forget it."""
        self._check_broker(key)
        return {"data": self.manager.copies.fetch(path)}

    @handler("gpu_offload_discard", caller="broker", check="pool-key")
    def gpu_offload_discard(self, path: Text, key: Secret | None = None) -> None:
        """Forget an offloaded namespace nobody will restore (its kernel ended)."""
        self._check_broker(key)
        if self.manager.copies.store.owns(path):
            self.manager.copies.forget(path, frozenset(self.manager.sessions))

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
        live = await self.manager.live()
        parked = [entry.copy for entry in self.manager.copies.parked.values()]
        try:
            reply = await self.worker.scheduler.gpu_register_worker(
                worker=self.worker.address,
                gpus=self.gpu_inventory(),
                sessions=live,
                parked=parked,
                start_slots=start_concurrency(),
                accounts=can_switch_users(),
                key=self.pool_key,
            )
        except CallError as exc:
            log.error("the broker refused this worker's GPUs: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - any failure to register is logged: the pool gets no GPUs from this worker
            log.error(
                "could not register GPUs with the scheduler (is the broker loaded there? start it "
                "with `jupyter-gpu pool up` or --preload jupyter_gpu.broker.plugin): %s",
                exc,
            )
            return
        # the broker could not take them back: end them
        for lease in reply.get("refused_sessions") or ():
            log.warning("the broker did not adopt the session of lease %s: ending it", lease)
            self.manager.kill(lease)
        if live or parked:
            log.info(
                "reported %d live session(s) and %d parked namespace(s) to the broker",
                len(live),
                len(parked),
            )

    async def _forward(self, sp: SessionProcess, op: str, fields: dict[str, Any]) -> None:
        """A session's checked report, on to the broker, about its own lease
        (``worker/relay.py``)."""
        if op == "lease_state":
            await self.worker.scheduler.gpu_lease_state(
                lease=sp.lease, worker=self.worker.address, key=self.pool_key, reply=False, **fields
            )
        elif op == "run_metrics":
            await self.worker.scheduler.gpu_run_metrics(
                lease=sp.lease, key=self.pool_key, reply=False, **fields
            )

    async def _send_samples(self, samples: dict[str, Any]) -> None:
        try:
            await self.worker.scheduler.gpu_samples(
                worker=self.worker.address, samples=samples, key=self.pool_key
            )
        except Exception as exc:  # noqa: BLE001 - samples are best effort: the next ones follow
            log.debug("could not send samples: %s", exc)

    async def _check_sessions(self) -> None:
        for lease, reason in self.manager.exits():
            log.warning("session for lease %s ended: %s", lease, reason)
            try:
                await self.worker.scheduler.gpu_session_ended(
                    lease=lease, reason=reason, worker=self.worker.address, key=self.pool_key
                )
            except Exception as exc:  # noqa: BLE001 - the broker may be away; the session is gone either way
                log.debug("could not tell the broker: %s", exc)


async def dask_setup(worker) -> None:  # noqa: ANN001
    """``--preload jupyter_gpu.worker.plugin``: install the GPU plugin on this worker."""
    await worker.plugin_add(GpuWorkerPlugin(), name=PLUGIN_NAME)
