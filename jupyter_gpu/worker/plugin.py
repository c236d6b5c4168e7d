"""The GPU worker plugin: offers this worker's GPUs to the broker and owns their session processes.

It keeps a zygote (``worker/forkserver.py``, ``session/zygote.py``: Python, NumPy, torch, IPython
imported) and forks a session from it in milliseconds, or, with ``session.fork-server: false``, one
spare session process warm; either way a first cell does not pay for the imports. It hands the
session a lease when the broker grants one, watches every session process, and tells the broker when
one ends (crash, OOM kill, exit). On real GPUs a background thread samples NVML for the panel;
nothing NVML runs on the event loop.

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
import functools
import logging
import os
import subprocess
import sys
import time
from typing import Any, Callable, Literal, cast

from distributed.comm import get_address_host
from distributed.core import rpc
from distributed.diagnostics.plugin import WorkerPlugin

from jupyter_gpu.common import config, poolkey, protocol
from jupyter_gpu.common.hostmem import sweep_stale
from jupyter_gpu.common.protocol import DEVICES_ENV, Account, LeaseView, RestoreRef, StandbyPlan
from jupyter_gpu.common.security import security_env
from jupyter_gpu.common.units import format_bytes
from jupyter_gpu.common.validation import (
    Address,
    Name,
    Seconds,
    Secret,
    Text,
    error_reply,
    validated,
)
from jupyter_gpu.worker.accounts import NoAccount, account_of, can_switch_users
from jupyter_gpu.worker.containment import Containment, host_memory_limit
from jupyter_gpu.worker.forkserver import ForkServer
from jupyter_gpu.worker.hoststore import HostStore, UnsafeFile
from jupyter_gpu.worker.inventory import GpuInfo, discover
from jupyter_gpu.worker.nvml_sampler import NvmlSampler
from jupyter_gpu.worker.relay import relay
from jupyter_gpu.worker.spawn import SessionProcess, exit_reason, kill, session_env, spawn_session

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
        self.sessions: dict[str, SessionProcess] = {}
        # variables of ended sessions kept in host memory here, with their owner: lease id ->
        # ParkedCopy
        self.parked: dict[str, dict] = {}
        self.store = HostStore()
        self.spare: SessionProcess | None = None
        self._spare_task: asyncio.Task | None = None
        # the zygote sessions are forked from (None: spares)
        self.forkserver: ForkServer | None = None
        self._start_slots = asyncio.Semaphore(self.start_concurrency())
        self._sampler: NvmlSampler | None = None
        self.containment: Containment | None = None
        self.host_memory_limit: int | None = None
        self.pool_key: str | None = None
        self._relays: dict[str, asyncio.Task] = {}
        # killed processes, waited for so none stays a zombie
        self._reaping: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ lifecycle
    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The GPU plugin's worker handlers: exactly ``protocol.WORKER_OPS``."""
        table: dict[str, Callable[..., Any]] = {
            "gpu_session_start": self.session_start,
            "gpu_session_signal": self.session_signal,
            "gpu_session_offload": self.session_offload,
            "gpu_offload_discard": self.offload_discard,
            "gpu_offload_fetch": self.offload_fetch,
            "gpu_inventory": self.inventory,
            "gpu_session_starter": self.session_starter,
        }
        assert set(table) == protocol.WORKER_OPS, "worker handlers and protocol.WORKER_OPS disagree"
        return table

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
        # folders, groups
        for folder in sweep_stale():
            log.warning("removed the host-memory folder %s of a worker that is gone", folder)
        Containment.sweep_stale()
        self.containment = Containment()
        self.host_memory_limit = self._host_memory_limit()
        worker.handlers.update(self.handlers())
        from tornado.ioloop import PeriodicCallback

        self._monitor = PeriodicCallback(self._check_sessions, 250)
        self._monitor.start()
        if config.get("session.fork-server") and sys.platform == "linux":
            self.forkserver = ForkServer(
                list(config.get("session.preload-modules") or []),
                session_env(security_env(worker.security)),
            )
            if config.get("session.prewarm"):
                self.forkserver.start()
        elif config.get("session.prewarm"):
            self._refill_spare()
        asyncio.ensure_future(self._report_when_registered())
        self._sampler = NvmlSampler(self.gpus, worker.loop.asyncio_loop, self._send_samples)
        self._sampler.start()

    async def teardown(self, worker) -> None:  # noqa: ANN001
        if self._sampler is not None:
            self._sampler.stop()
        self._monitor.stop()
        for sp in list(self.sessions.values()) + ([self.spare] if self.spare else []):
            sp.killed = True
            self._end_process(sp)
        if self.forkserver is not None:
            self.forkserver.close()
        if self.containment is not None:
            self.containment.close()
        self.store.close()  # offloaded namespaces die with their worker

    def _host_memory_limit(self) -> int | None:
        """``session.host-memory-limit`` in bytes for this machine (a typo turns it off, loudly)."""
        import psutil

        setting = config.get("session.host-memory-limit")
        try:
            return host_memory_limit(setting, psutil.virtual_memory().total)
        except (ValueError, TypeError) as exc:
            log.error(
                "jupyter-gpu.session.host-memory-limit is %r (%s): sessions have no host-memory "
                "limit until "
                "it is a size (64GiB), a share of the machine (50%%) or null",
                setting,
                exc,
            )
            return None

    def _broker_refusal(self, key: str | None) -> dict | None:
        return None if poolkey.matches(key, self.pool_key) else error_reply(NOT_THE_BROKER)

    def _end_process(self, sp: SessionProcess) -> None:
        """Kill a session and everything it started (its group), and reap it."""
        kill(sp.proc)
        if sp.group is not None:
            sp.group.kill()
            sp.group.remove()
            sp.group = None
        if sp.control is not None:
            sp.control.close()
            sp.control = None
        task = self._relays.pop(sp.lease or "", None)
        if task is not None:
            task.cancel()
        self._reaping.append(sp.proc)

    # ------------------------------------------------------------------ host memory
    @validated(error_reply)
    async def session_offload(
        self, lease: Name, timeout: Seconds = 60.0, key: Secret | None = None
    ) -> dict:
        """Move a session's variables to host memory on this machine (its lease is being reclaimed);
        the broker ends the process afterwards. Returns what was saved and what could not be."""
        if refused := self._broker_refusal(key):
            return refused
        sp = self.sessions.get(lease)
        if sp is None:
            return {"error": f"no session of lease {lease} runs here"}
        r = rpc(sp.address, connection_args=self.worker.connection_args)
        try:
            reply = await asyncio.wait_for(
                r.offload(path=self.store.offload_path(lease), secret=sp.secret), timeout
            )
        except Exception as exc:  # noqa: BLE001 - the broker then ends the session without its variables
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            await r.close_rpc()
        if not reply.get("error") and sp.grant is not None:
            # kept with its owner, so that a restarted broker can give the variables back
            # (``reconnected``)
            self.parked[lease] = {
                **sp.grant,
                "path": reply["path"],
                "saved": reply["saved"],
                "lost": reply["lost"],
                "bytes": reply["bytes"],
                "standby": bool(reply.get("standby")),
                "account": sp.account,
            }
        return reply

    async def _restore_file(
        self, restore: RestoreRef, lease: str, account: Account | None
    ) -> str | None:
        """The offloaded namespace as a file in the new session's folder: moved there when it was
        parked on this worker, else fetched from the worker that keeps it (a pool across machines).
        None: it is gone, or it is not a file this session's account may trust."""
        path = restore["path"]
        try:
            if self.store.owns(path) and os.path.exists(path):
                moved = self.store.hand_over(path, lease, account)
                self._forget_parked(path)
                return moved
            reply = await self.worker.rpc(restore["worker"]).gpu_offload_fetch(
                path=path, key=self.pool_key
            )
        except UnsafeFile as exc:
            log.warning("not restoring %s for lease %s: %s", path, lease, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - that worker is gone: the variables are lost, said by the kernel
            log.warning(
                "could not fetch offloaded variables %s from %s: %s", path, restore["worker"], exc
            )
            return None
        if reply.get("error"):
            log.warning("could not fetch offloaded variables %s: %s", path, reply["error"])
            return None
        return self.store.receive(reply["data"], lease, account)

    @validated(error_reply)
    def offload_fetch(self, path: Text, key: Secret | None = None) -> dict:
        """Hand an offloaded namespace to the worker where its kernel's new session starts, and
        forget it."""
        if refused := self._broker_refusal(key):
            return refused
        if not self.store.owns(path) or not os.path.isfile(path):
            return {"error": f"no offloaded variables at {path} on this worker"}
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
        self._forget_parked(path)
        return {"data": data}

    @validated(error_reply)
    def offload_discard(self, path: Text, key: Secret | None = None) -> dict:
        """Forget an offloaded namespace nobody will restore (its kernel ended)."""
        if refused := self._broker_refusal(key):
            return refused
        if self.store.owns(path):
            self._forget_parked(path)
        return {"ok": True}

    def _forget_parked(self, path: str) -> None:
        for lease, entry in list(self.parked.items()):
            if entry["path"] == path:
                del self.parked[lease]
                if lease not in self.sessions:
                    self.store.forget(lease)

    def inventory(self) -> list[dict]:
        return [g.to_dict() for g in self.gpus]

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
        live = []
        for lease, sp in list(self.sessions.items()):
            if sp.grant is None or sp.proc.poll() is not None or "address" not in sp.grant["lease"]:
                continue
            live.append({**sp.grant, "busy": await self._busy(sp)})
        parked = [
            {k: v for k, v in entry.items() if k != "account"} for entry in self.parked.values()
        ]
        try:
            reply = await self.worker.scheduler.gpu_register_worker(
                worker=self.worker.address,
                gpus=self.inventory(),
                sessions=live,
                parked=parked,
                start_slots=self.start_concurrency(),
                accounts=can_switch_users(),
                key=self.pool_key,
            )
        except Exception as exc:  # noqa: BLE001 - any failure to register is logged: the pool gets no GPUs from this worker
            log.error(
                "could not register GPUs with the scheduler (is the broker loaded there? start it "
                "with `jupyter-gpu pool up` or --preload jupyter_gpu.broker.plugin): %s",
                exc,
            )
            return
        if reply.get("error"):
            log.error("the broker refused this worker's GPUs: %s", reply["error"])
            return
        # the broker could not take them back: end them
        for lease in reply.get("refused_sessions") or ():
            log.warning("the broker did not adopt the session of lease %s: ending it", lease)
            await self.session_signal(lease=lease, signal="kill", key=self.pool_key)
        if live or self.parked:
            log.info(
                "reported %d live session(s) and %d parked namespace(s) to the broker",
                len(live),
                len(self.parked),
            )

    async def _busy(self, sp: SessionProcess) -> bool:
        r = rpc(sp.address, connection_args=self.worker.connection_args)
        try:
            return bool((await asyncio.wait_for(r.ping(secret=sp.secret), 5))["busy"])
        except Exception:  # noqa: BLE001 - not answering: count it busy, so it is never moved while unsure
            return True
        finally:
            await r.close_rpc()

    async def _forward(self, sp: SessionProcess, op: str, fields: dict) -> None:
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

    async def _send_samples(self, samples: dict) -> None:
        try:
            await self.worker.scheduler.gpu_samples(
                worker=self.worker.address, samples=samples, key=self.pool_key
            )
        except Exception as exc:  # noqa: BLE001 - samples are best effort: the next ones follow
            log.debug("could not send samples: %s", exc)

    # ------------------------------------------------------------------ sessions
    async def _spawn(self) -> SessionProcess:
        """A new session process, started when one of the ``session.start-concurrency`` start slots
        is free: on a busy machine eight sessions importing torch at once each take eight times as
        long (and used to be killed for it); one after another, each is quick, and the queue is
        visible in the broker."""
        async with self._start_slots:
            return await spawn_session(
                get_address_host(self.worker.address),
                self.worker.address,
                security_env(self.worker.security),
                forkserver=self.forkserver,
            )

    async def session_starter(self) -> dict:
        """How this worker starts sessions, and whether a start is warm now (benchmarks and tests
        wait for it)."""
        if self.forkserver is not None:
            return {
                "kind": "fork",
                "ready": self.forkserver.alive() and self.forkserver.ready.is_set(),
                "worker_pid": os.getpid(),
                **self.forkserver.info(),
            }
        spare = self.spare
        return {
            "kind": "spare",
            "ready": spare is not None and spare.proc.poll() is None,
            "worker_pid": os.getpid(),
        }

    def _refill_spare(self) -> None:
        if self.forkserver is not None:
            return
        if self.spare is not None or (self._spare_task is not None and not self._spare_task.done()):
            return

        async def refill() -> None:
            try:
                self.spare = await self._spawn()
            except Exception as exc:  # noqa: BLE001 - a spare is an optimisation: a session start spawns its own
                log.warning("could not pre-warm a session process: %s", exc)

        self._spare_task = asyncio.ensure_future(refill())

    @staticmethod
    def start_concurrency() -> int:
        """How many session processes this worker starts at once (``session.start-concurrency``)."""
        return max(1, int(config.get("session.start-concurrency") or 1))

    @validated(error_reply)
    async def session_start(
        self,
        lease: LeaseView,
        scheduler: Address | None = None,
        restore: RestoreRef | None = None,
        client: Name | None = None,
        secret: Secret | None = None,
        account: Name | None = None,
        key: Secret | None = None,
    ) -> dict:
        """Give a (pre-warmed) session process the lease: its account, its group, pinned, capped,
        restored; return its address. ``account``: the pool user whose OS account the session runs
        as (the broker sends it when the pool isolates users; it applies when this worker runs as
        root)."""
        if refused := self._broker_refusal(key):
            return refused
        ours = {g.index for g in self.gpus}
        if (
            not lease.get("id")
            or not lease.get("gpu_indices")
            or not set(lease["gpu_indices"]) <= ours
        ):
            return error_reply(
                f"gpu_session_start: the lease must name an id and GPUs of this worker "
                f"({sorted(ours)}), not {lease.get('gpu_indices')}"
            )
        if lease["id"] in self.sessions:
            return error_reply(f"gpu_session_start: lease {lease['id']} already has a session here")
        who: Account | None = None
        if account is not None and can_switch_users():
            try:
                who = account_of(account)
            except NoAccount as exc:
                return error_reply(str(exc))
        t0 = time.monotonic()
        try:
            if self._spare_task is not None and not self._spare_task.done():
                await self._spare_task
            sp, self.spare = self.spare, None
            if sp is None or sp.proc.poll() is not None:
                sp = await self._spawn()
            t_process = time.monotonic()
            if config.get("session.prewarm"):
                self._refill_spare()
            by_index = {g.index: g for g in self.gpus}
            gpus = [by_index[i].to_dict() for i in lease["gpu_indices"]]
            sp.lease, sp.secret, sp.account = lease["id"], secret, who
            sp.grant = {"lease": dict(lease), "client": client}
            self.sessions[lease["id"]] = sp
            if sp.control is not None:  # its reports, checked, to the broker
                self._relays[lease["id"]] = asyncio.ensure_future(
                    relay(sp.control, lease["id"], functools.partial(self._forward, sp))
                )
                sp.control = None
            assert self.containment is not None  # made by setup()
            sp.group = self.containment.group(lease["id"], self.host_memory_limit)
            if sp.group is not None:
                sp.group.add(sp.pid)
            # no group: a data-size rlimit stands in for the cap on virtual GPUs (CUDA maps more
            # than it uses)
            rlimit = (
                self.host_memory_limit
                if sp.group is None and all(g["virtual"] for g in gpus)
                else None
            )
            containment = {
                "containment": self.containment.kind
                if sp.group is not None
                else ("rlimit" if rlimit else "process group"),
                "host_memory_limit": self.host_memory_limit
                if (sp.group is not None or rlimit)
                else None,
            }
            folder = self.store.folder(lease["id"], who)
            r = rpc(sp.address, connection_args=self.worker.connection_args)  # the worker's TLS
            try:
                reply = await r.assign(
                    key=sp.spawn_key,
                    secret=secret or "",
                    lease=lease,
                    gpus=gpus,
                    standby=self._standby_for(lease),
                    memory_rlimit=rlimit,
                    account=who,
                    hostmem=folder if who is not None else None,
                )
                restored = None
                if restore and not reply.get("error"):
                    path = await self._restore_file(restore, lease["id"], who)
                    restored = await r.restore(path=path, secret=secret) if path else None
            finally:
                await r.close_rpc()
            if reply.get("error"):
                raise RuntimeError(reply["error"])
            log.info(
                "lease %s: session %d ready in %.0f ms (process %.0f ms, assign %.0f ms)",
                lease["id"],
                sp.pid,
                (time.monotonic() - t0) * 1e3,
                (t_process - t0) * 1e3,
                (time.monotonic() - t_process) * 1e3,
            )
            sp.grant["lease"].update(
                address=sp.address,
                pid=sp.pid,
                isolation=reply.get("isolation", "none"),
                **containment,
            )
            return {
                "address": sp.address,
                "pid": sp.pid,
                "isolation": reply.get("isolation", "none"),
                "restored": restored,
                "as_user": who is not None,
                **containment,
            }
        except Exception as exc:
            log.exception("could not start a session for lease %s", lease.get("id"))
            sp = self.sessions.pop(cast(str, lease.get("id")), None)  # checked above
            if sp is not None:
                sp.killed = True
                self._end_process(sp)
                self.store.forget(lease["id"])
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _standby_for(self, lease: LeaseView) -> StandbyPlan | None:
        """Where (and after how long idle) a session writes its standby copy (``standby.py``); none
        for the ranks of a --workers run (never moved to host memory) or when idle sessions are not
        offloaded."""
        if (
            config.get("session.standby-after") is None
            or not config.get("reclaim-offload")
            or lease.get("world_size", 1) > 1
        ):
            return None
        try:
            after = config.get_seconds("session.standby-after")
        except (ValueError, TypeError, KeyError):
            after = -1.0
        if after < 0:
            log.error(
                "jupyter-gpu.session.standby-after is %r, not a duration: standby copies are off "
                "until it "
                "is set to one (e.g. 2s) or to null",
                config.get("session.standby-after"),
            )
            return None
        return {"path": self.store.standby_path(lease["id"]), "after": after}

    def _ended(self, lease: str) -> None:
        """A session ended: its folder goes, unless its variables are parked there for its owner."""
        if lease not in self.parked:
            self.store.forget(lease)
        else:  # a standby copy it was writing is of no use now
            try:
                os.unlink(self.store.standby_path(lease))
            except OSError:
                pass

    @validated(lambda why: {"ok": False, "error": why})
    async def session_signal(
        self, lease: Name, signal: Literal["interrupt", "kill"] = "kill", key: Secret | None = None
    ) -> dict:
        if refused := self._broker_refusal(key):
            return {"ok": False, **refused}
        sp = self.sessions.get(lease)
        if sp is None:
            return {"ok": False}
        if signal == "interrupt":
            sp.proc.send_signal(2)
        else:
            sp.killed = True
            self.sessions.pop(lease, None)
            self._end_process(sp)
            self._ended(lease)
        return {"ok": True}

    async def _check_sessions(self) -> None:
        self._reaping = [p for p in self._reaping if p.poll() is None]
        for lease, sp in list(self.sessions.items()):
            code = sp.proc.poll()
            if code is None:
                continue
            self.sessions.pop(lease, None)
            over = sp.group is not None and sp.group.oom_killed()
            limit = sp.group.memory_limit if sp.group is not None else None
            self._end_process(sp)  # what the session started ends with it
            self._ended(lease)
            if sp.killed:
                continue
            reason = exit_reason(code)
            if over:
                reason = (
                    f"the session used more host memory than its limit of {format_bytes(limit)} "
                    "and the "
                    "operating system stopped it (jupyter-gpu.session.host-memory-limit); other "
                    "sessions "
                    "were not affected. Use less memory in the cell, or ask the admin for a higher "
                    "limit"
                )
            log.warning("session for lease %s ended: %s", lease, reason)
            try:
                await self.worker.scheduler.gpu_session_ended(
                    lease=lease, reason=reason, worker=self.worker.address, key=self.pool_key
                )
            except Exception as exc:  # noqa: BLE001 - the broker may be away; the session is gone either way
                log.debug("could not tell the broker: %s", exc)
        if self.spare is not None and self.spare.proc.poll() is not None:
            self.spare = None
            if config.get("session.prewarm"):
                self._refill_spare()


async def dask_setup(worker) -> None:  # noqa: ANN001
    """``--preload jupyter_gpu.worker.plugin``: install the GPU plugin on this worker."""
    await worker.plugin_add(GpuWorkerPlugin(), name=PLUGIN_NAME)
