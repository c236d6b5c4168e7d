"""The GPU broker: a Dask ``SchedulerPlugin`` that owns the pool's GPU inventory, queue and leases.

Workers report their GPUs to it; kernels ask it for leases through scheduler handlers
(``gpu_request``, ``gpu_wait``, ...); it grants leases by best-fit packing in the fair-share order,
asks the owning worker to start a session process for each grant, and frees leases when a session
ends, its kernel's client disconnects or its worker is lost. Everything the panel and ``%gpu
status`` show comes from ``gpu_snapshot``.

The bookkeeping itself is the ``Ledger`` (``broker/ledger.py``, no asyncio); this module adds what
needs the scheduler: the handlers (``handlers()``, exactly ``protocol.SCHEDULER_OPS``), the audit
store, the session starts and kills on workers, host-memory moves, sampling and housekeeping.

Load it into any Dask scheduler with ``--preload jupyter_gpu.broker.plugin``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal

from distributed.diagnostics.plugin import SchedulerPlugin

from jupyter_gpu.broker import gate, views
from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.identity import TokenStore
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import Allocation, GpuSlot, Lease, Request, ids_beyond, new_id
from jupyter_gpu.broker.settings import BrokerSettings, PoolConfigError, load_settings
from jupyter_gpu.broker.waiting import WaitingRoom
from jupyter_gpu.common import config, poolkey, protocol
from jupyter_gpu.common.protocol import (
    GpuInfoMsg,
    LeaseView,
    LiveSession,
    MetricsItem,
    ParkedCopy,
    PoolInfo,
    RequestSpec,
    RequestState,
    RequestStatus,
    RunState,
    Sample,
    Snapshot,
)
from jupyter_gpu.common.validation import (
    Address,
    Bytes,
    Count,
    MaxLen,
    Name,
    Percent,
    Range,
    Secret,
    Steps,
    Text,
    dropped,
    error_reply,
    validated,
)

if TYPE_CHECKING:
    from distributed import Scheduler

log = logging.getLogger(__name__)

PLUGIN_NAME = "jupyter-gpu-broker"
NOT_A_WORKER = (
    "only the pool's workers may call this (they hold the pool key; see docs/security.md)"
)
Token = Annotated[str, MaxLen(512)]
Workers = Annotated[int, Range(0, 100_000)]  # a pool's worker count (scale)
RUNS_KEPT = 50  # the latest runs' streams, for the panel's replay


class GpuBroker(SchedulerPlugin):
    """Grants fractions of GPUs to kernels' sessions; see the module docstring."""

    name = PLUGIN_NAME

    def __init__(
        self,
        policy: FairSharePolicy | None = None,
        embedded: bool = False,
        audit: AuditStore | None = None,
        tokens: TokenStore | None = None,
        settings: BrokerSettings | None = None,
    ):
        # what is not given comes from Dask config (jupyter-gpu.pool-config, token-file, audit-db),
        # checked
        if settings is None and (policy is None or audit is None or tokens is None):
            settings = load_settings()
        if settings is not None:
            # fair share with the configured quotas (none: fair share of use only)
            policy = policy or FairSharePolicy(settings.quotas)
            audit = audit or settings.audit
            tokens = tokens if tokens is not None else settings.tokens
        assert policy is not None and audit is not None  # given, or from the settings
        self.policy: FairSharePolicy = policy
        self.ledger = Ledger(self.policy)
        self.audit: AuditStore = audit
        self.tokens: TokenStore | None = tokens
        self.embedded = embedded
        self.samples: dict[str, collections.deque[Sample]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.scaler: Any = None  # a pool that owns a cluster manager: pool/scaling.py's PoolScaler
        self._events: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # request id -> reclaimed sessions it waits to see gone
        self._drains: dict[str, list[asyncio.Task[None]]] = {}
        # lease id -> when adopted after a restart (its kernel must come back)
        self._adopted: dict[str, float] = {}
        self.start_slots: dict[str, int] = {}  # worker -> session processes it starts at once
        # worker -> whether its sessions run as their users
        self.runs_as_users: dict[str, bool] = {}
        self.pool_key: str | None = None
        self.scheduler: Scheduler | None = None  # set by start()

    @property
    def sched(self) -> Scheduler:
        """The scheduler this broker runs on (it is started)."""
        assert self.scheduler is not None, "the broker is not started"
        return self.scheduler

    # the ledger's state, as the scaler, the embedded pool and tests read it
    @property
    def gpus(self) -> dict[str, GpuSlot]:
        return self.ledger.gpus

    @property
    def leases(self) -> dict[str, Lease]:
        return self.ledger.leases

    @property
    def queue(self) -> WaitingRoom:
        return self.ledger.queue

    @property
    def requests(self) -> dict[str, Request]:
        return self.ledger.requests

    @property
    def ended(self) -> collections.OrderedDict[str, Lease]:
        return self.ledger.ended

    @property
    def worker_gpus(self) -> dict[str, list[str]]:
        return self.ledger.worker_gpus

    # ------------------------------------------------------------------ plugin hooks
    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The broker's scheduler handlers: exactly ``protocol.SCHEDULER_OPS``."""
        table: dict[str, Callable[..., Any]] = {
            "gpu_register_worker": self.register_worker,
            "gpu_request": self.request,
            "gpu_wait": self.wait,
            "gpu_cancel": self.cancel,
            "gpu_release": self.release,
            "gpu_lease_info": self.lease_info,
            "gpu_lease_state": self.lease_state,
            "gpu_session_ended": self.session_ended,
            "gpu_samples": self.add_samples,
            "gpu_snapshot": self.snapshot,
            "gpu_scale": self.scale,
            "gpu_run_update": self.run_update,
            "gpu_run_metrics": self.run_metrics,
            "gpu_usage": self.usage,
        }
        assert set(table) == protocol.SCHEDULER_OPS, (
            "broker handlers and protocol.SCHEDULER_OPS disagree"
        )
        return table

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        # what workers and the broker show each other (common/poolkey.py); users never hold it
        self._key_path = poolkey.key_path(scheduler.address)
        self._made_key = poolkey.read_key(self._key_path) is None
        self.pool_key = poolkey.ensure_key(self._key_path)
        scheduler.handlers.update(self.handlers())
        # a pool shared by several people: nothing but our handlers (broker/gate.py)
        if self.tokens is not None:
            gate.close(scheduler, self.pool_key)
        self.audit.open_boot()
        from tornado.ioloop import PeriodicCallback

        interval_ms = config.get_seconds("worker.sample-interval") * 1000
        self._sampler = PeriodicCallback(self._sample_virtual, interval_ms)
        self._sampler.start()
        self._housekeeper = PeriodicCallback(self._housekeeping, 1000)
        self._housekeeper.start()

    async def close(self) -> None:
        # an embedded pool's key dies with it (a pool up's stays: its workers rejoin a restarted
        # scheduler)
        if self.embedded and getattr(self, "_made_key", False):
            with contextlib.suppress(OSError):
                os.unlink(self._key_path)
        if getattr(self, "_sampler", None):
            self._sampler.stop()
        if getattr(self, "_housekeeper", None):
            self._housekeeper.stop()
        self.audit.heartbeat()

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        gone, leases = self.ledger.remove_worker(worker)
        for gpu_id in gone:
            self.samples.pop(gpu_id, None)
        # e.g. its Slurm job
        note = self.scaler.lost_note(worker) if self.scaler is not None else None
        for lease in leases:
            self._end_lease(
                lease,
                f"the pool worker {worker} holding this session was lost"
                + (f" ({note})" if note else ""),
                kill=False,
            )
        self._schedule()

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        for req in [r for r in self.queue if r.client == client]:
            self._finish_request(req, "cancelled", "its kernel disconnected")
        for lease in [ls for ls in self.leases.values() if ls.client == client]:
            self._end_lease(lease, "its kernel disconnected from the pool", kill=True)
        for lease in [
            ls
            for ls in self.ended.values()
            if ls.client == client and (ls.offload or {}).get("state") == "saved"
        ]:
            self._spawn(self._discard_offload(lease))  # nobody will restore these variables now
        self._schedule()

    async def _discard_offload(self, lease: Lease) -> None:
        offload, lease.offload = lease.offload, None
        if offload is None:  # discarded already
            return
        try:
            await self.sched.rpc(offload["worker"]).gpu_offload_discard(
                path=offload["path"], key=self.pool_key
            )
        except Exception as exc:  # noqa: BLE001 - the worker is gone, and its files with it
            log.debug("could not discard the offload of %s: %s", lease.id, exc)

    # ------------------------------------------------------------------ handlers: workers and sessions
    @validated(error_reply)
    def register_worker(
        self,
        worker: Address,
        gpus: Annotated[list[GpuInfoMsg], MaxLen(1024)],
        sessions: Annotated[list[LiveSession], MaxLen(10_000)] | None = None,
        parked: Annotated[list[ParkedCopy], MaxLen(10_000)] | None = None,
        start_slots: Annotated[int, Range(1, 1024)] = 1,
        accounts: bool = False,
        key: Secret | None = None,
    ) -> dict[str, Any]:
        """A worker's GPU plugin reports the GPUs it owns (replacing any earlier report). A worker
        that joins a restarted scheduler also reports the sessions and parked variables it kept:
        they are adopted, so their owners' kernels carry on as if nothing had happened."""
        if not poolkey.matches(key, self.pool_key):
            return error_reply(NOT_A_WORKER)
        for i, info in enumerate(gpus):
            missing = [k for k in ("index", "uuid", "name", "total_bytes") if k not in info]
            if missing:
                return error_reply(f"gpu_register_worker: gpus[{i}] lacks {', '.join(missing)}")
        if len({int(info["index"]) for info in gpus}) != len(gpus):
            return error_reply("gpu_register_worker: two GPUs have the same index")
        slots = [
            GpuSlot(
                worker=worker,
                index=int(info["index"]),
                uuid=info["uuid"],
                name=info["name"],
                total_bytes=int(info["total_bytes"]),
                virtual=bool(info.get("virtual")),
                mig=bool(info.get("mig")),
            )
            for info in gpus
        ]
        ids = self.ledger.set_worker_gpus(worker, slots)
        self.start_slots[worker] = start_slots
        self.runs_as_users[worker] = accounts
        for gpu_id in ids:
            self.samples.setdefault(
                gpu_id, collections.deque(maxlen=int(config.get("worker.samples-kept")))
            )
        refused = self._adopt(worker, sessions or [], parked or [])
        log.info(
            "worker %s offers %d GPU(s)%s",
            worker,
            len(ids),
            f", with {len(sessions or [])} live session(s) and {len(parked or [])} parked"
            if sessions or parked
            else "",
        )
        self._schedule()
        return {"gpus": ids, "refused_sessions": refused}

    def _adopt(
        self, worker: str, sessions: list[LiveSession], parked: list[ParkedCopy]
    ) -> list[str]:
        """Take back the sessions and parked variables a worker kept across a scheduler restart;
        returns the lease ids that could not be (the worker ends those sessions)."""
        now = time.time()
        refused = []
        ids_beyond(
            [s["lease"].get("id", "") for s in sessions]
            + [p["lease"].get("id", "") for p in parked]
        )
        for live in sessions:
            lease = self._lease_from(worker, live["lease"], live["client"])
            if lease is None:
                refused.append(str(live["lease"].get("id")))
                continue
            lease.state = "running" if live["busy"] else "idle"
            why = self.ledger.adopt(lease, idle=not live["busy"])
            if why is not None:
                log.warning("cannot adopt the session of lease %s on %s: %s", lease.id, worker, why)
                refused.append(lease.id)
                continue
            self._adopted[lease.id] = now
            self.audit.lease_started(lease.public(), lease.preemptible)
            log.info(
                "adopted lease %s of %s on %s (its session outlived the scheduler)",
                lease.id,
                lease.user,
                worker,
            )
        for copy in parked:
            lease = self._lease_from(worker, copy["lease"], copy["client"])
            if lease is None or lease.id in self.ended or lease.id in self.leases:
                continue
            lease.state, lease.ended = "ended", now
            lease.end_reason = (
                copy["lease"].get("end_reason") or "its session was moved to host memory"
            )
            lease.offload = {
                "state": "saved",
                "worker": worker,
                "path": copy["path"],
                "saved": copy["saved"],
                "lost": copy["lost"],
                "bytes": copy["bytes"],
                "standby": copy["standby"],
                "seconds": None,
            }
            self.ended[lease.id] = lease
            self._adopted[lease.id] = now
        return refused

    def _lease_from(self, worker: str, view: LeaseView, client: str | None) -> Lease | None:
        """A ``Lease`` rebuilt from the view a worker kept, on that worker's GPUs (None if it does
        not fit them)."""
        indices = view.get("gpu_indices") or []
        found = [self.gpus.get(f"{worker}#{i}") for i in indices]
        slots = [s for s in found if s is not None]
        if not indices or not view.get("id") or not view.get("user") or len(slots) != len(found):
            return None
        if len(slots) == 1:
            allocations = [
                Allocation(gpu=slots[0].id, index=slots[0].index, bytes=int(view.get("bytes") or 0))
            ]
        else:
            allocations = [Allocation(gpu=s.id, index=s.index, bytes=s.total_bytes) for s in slots]
        return Lease(
            id=view["id"],
            request=view.get("request") or "",
            user=view["user"],
            kernel=view.get("kernel", ""),
            client=client,
            worker=worker,
            allocations=allocations,
            fraction=float(view.get("fraction") or 0),
            priority=view.get("priority") or "interactive",
            notebook=view.get("notebook"),
            cell=view.get("cell"),
            team=view.get("team"),
            rank=int(view.get("rank") or 0),
            world_size=int(view.get("world_size") or 1),
            started=float(view.get("started") or time.time()),
            isolation=view.get("isolation") or "none",
            address=view.get("address"),
            pid=view.get("pid"),
            containment=view.get("containment"),
            host_memory_limit=view.get("host_memory_limit"),
            peak_bytes=view.get("peak_bytes"),
            resident_bytes=view.get("resident_bytes"),
            preemptible=bool(view.get("preemptible")),
        )

    def _end_orphans(self, now: float) -> None:
        """Adopted leases and parked variables whose kernel did not come back after the restart are
        ended."""
        grace = config.get_seconds("adopt-grace")
        for lease_id, since in list(self._adopted.items()):
            if now - since < grace:
                continue
            del self._adopted[lease_id]
            lease = self.leases.get(lease_id)
            if (
                lease is not None
                and lease.client is not None
                and lease.client not in self.sched.clients
            ):
                self._end_lease(
                    lease,
                    f"its kernel did not reconnect within {grace:.0f} s of the pool's scheduler "
                    "restarting",
                    kill=True,
                )
                continue
            parked = self.ended.get(lease_id)
            if (
                parked is not None
                and parked.client is not None
                and parked.client not in self.sched.clients
                and (parked.offload or {}).get("state") == "saved"
            ):
                self._spawn(self._discard_offload(parked))

    @validated(dropped)
    def add_samples(
        self,
        worker: Address,
        samples: Annotated[dict[str, Sample], MaxLen(1024)],
        key: Secret | None = None,
    ) -> None:
        """NVML samples from a worker's sampling thread, keyed by GPU index."""
        if not poolkey.matches(key, self.pool_key):
            return
        for index, sample in samples.items():
            gpu_id = f"{worker}#{index}"
            if gpu_id in self.samples:
                self.samples[gpu_id].append(sample)

    @validated(dropped)
    def lease_state(
        self,
        lease: Name,
        state: Literal["running", "idle"],
        cell: Text | None = None,
        peak_bytes: Bytes | None = None,
        gpu_utilization: Percent | None = None,
        resident_bytes: Bytes | None = None,
        worker: Address | None = None,
        key: Secret | None = None,
        step: Steps | None = None,
        total: Steps | None = None,
    ) -> None:
        """A session says a cell started (``running``), how far its running cell is (``running``
        with ``step`` of ``total``: the queue's estimates use it) or that it finished (``idle``,
        with its measured peak memory and, on real GPUs, its mean utilization: the right-sizing
        numbers; and what it holds now, which is what suspending it would have to move). It arrives
        through the session's worker, which alone knows which lease the session holds; a note about
        a lease on another worker is dropped."""
        live = self.leases.get(lease)
        if (
            not poolkey.matches(key, self.pool_key)
            or live is None
            or (worker is not None and live.worker != worker)
        ):
            return
        ls = self.ledger.set_state(lease, state, resident=resident_bytes, step=step, total=total)
        if ls is None:
            return
        if state == "running":
            # a cell started (a progress report is not a new cell: it keeps its start)
            if step is None:
                ls.cell_started = time.time()
                if cell:
                    ls.cell = cell
        else:
            ls.cell_started = None
        if peak_bytes is not None:
            ls.peak_bytes = max(ls.peak_bytes or 0, int(peak_bytes))
        if gpu_utilization is not None:
            ls.gpu_utilization = float(gpu_utilization)
        if resident_bytes is not None:
            ls.resident_bytes = int(resident_bytes)

    @validated(error_reply)
    def session_ended(
        self, lease: Name, reason: Text, worker: Address | None = None, key: Secret | None = None
    ) -> dict[str, Any] | None:
        """The worker saw a session process exit."""
        if not poolkey.matches(key, self.pool_key):
            return error_reply(NOT_A_WORKER)
        ls = self.leases.get(lease)
        if ls is not None and (worker is None or ls.worker == worker):
            self._end_lease(ls, reason, kill=False)
            self._schedule()
        return None

    @validated(dropped)
    def run_metrics(
        self,
        run: Name,
        rank: Annotated[int, Range(0, RequestSpec.MAX_RANKS)],
        items: Annotated[list[MetricsItem], MaxLen(100_000)],
        lease: Name | None = None,
        key: Secret | None = None,
    ) -> None:
        """Metrics batched by a rank's session (``jupyter_gpu.report``, through its worker); kept so
        a panel can replay them. Only a lease of the run (as its kernel declared it) may add to it,
        as its own rank."""
        live = self.leases.get(lease or "")
        known = self.runs.get(run)
        if (
            not poolkey.matches(key, self.pool_key)
            or live is None
            or live.rank != rank
            or (known is not None and lease not in (known.get("leases") or ()))
        ):
            return
        record = self.runs.setdefault(run, {"id": run, "ranks": {}, "started": time.time()})
        stream = record["ranks"].setdefault(str(rank), [])
        stream.extend(
            {**item, "metrics": _plain_metrics(item.get("metrics") or {})} for item in items
        )
        del stream[:-1000]

    # ------------------------------------------------------------------ handlers: kernels
    @validated(
        lambda why: {"id": None, "state": "refused", "reason": f"The request is not valid: {why}."}
    )
    def request(
        self,
        user: Name,
        kernel: Name,
        spec: dict[Any, Any],  # checked as a mapping here; RequestSpec.from_wire checks its fields
        client: Name | None = None,
        notebook: Text | None = None,
        cell: Text | None = None,
        token: Token | None = None,
        restore: Name | None = None,
    ) -> RequestStatus:
        """Queue a request for GPU memory; grant it at once if it fits, refuse it if it never
        can."""
        denied = self._identity_error(user, token)
        if denied:
            self.audit.refused(None, user, None, spec, denied)
            return {"id": None, "state": "refused", "reason": denied}
        try:
            rspec = RequestSpec.from_wire(spec)
        except (TypeError, ValueError) as exc:
            self.audit.refused(None, user, None, spec, f"not valid: {exc}")
            return {"id": None, "state": "refused", "reason": f"The request is not valid: {exc}."}
        # the new session (of this cell's size, on any GPU) starts with the offloaded variables of
        # an old one
        offloaded = self._offloaded(restore, user, kernel) if restore else None
        req = Request(
            id=new_id("R"),
            user=user,
            kernel=kernel,
            client=client,
            spec=rspec,
            notebook=notebook,
            cell=cell,
            restore=offloaded.offload if offloaded else None,
        )
        if offloaded is not None:
            offloaded.offload = None  # restored once, by this request
        req.team = self.policy.quotas.team_of(user)
        self.ledger.record(req)
        self._events[req.id] = asyncio.Event()
        # what the pool could grow to counts too: a cluster manager's adaptive scaling adds workers
        # for it
        headroom = self.scaler.headroom() if self.scaler is not None else []
        impossible = self.ledger.never_fits(rspec, headroom) or self.policy.never_within_limits(
            user, rspec
        )
        if impossible:
            self._finish_request(
                req, "refused", f"No GPU in this pool can ever satisfy this request: {impossible}"
            )
            return self._status(req)
        self.ledger.submit(req)
        self._schedule()
        return self._status(req)

    def _status(self, req: Request) -> RequestStatus:
        """A request's status, with the cluster manager's word when new workers are on their way."""
        return views.request_status(
            self.ledger, req, self.start_slots, waiting_note=self._waiting_note()
        )

    def _waiting_note(self) -> str | None:
        return self.scaler.waiting_note() if self.scaler is not None else None

    def _offloaded(self, lease_id: str, user: str, kernel: str) -> Lease | None:
        """The ended lease ``lease_id`` of this kernel whose variables wait in host memory on a live
        worker."""
        old = self.ended.get(lease_id)
        if (
            old is None
            or old.user != user
            or old.kernel != kernel
            or (old.offload or {}).get("state") != "saved"
        ):
            return None
        return old if old.worker in self.worker_gpus else None

    @validated(lambda why: {"id": None, "state": "unknown", "reason": why})
    async def wait(
        self,
        id: Name,
        timeout: Annotated[float, Range(0, 60)] = 1.0,
        user: Name | None = None,
        token: Token | None = None,
    ) -> RequestStatus:
        """Long-poll: the request's state once it changes from queued/starting, or after
        ``timeout``. Only its owner may read it (a granted status carries the lease's secret)."""
        req = self.requests.get(id)
        if req is None:
            return {
                "id": id,
                "state": "unknown",
                "reason": f"no request {id} is known to the broker",
            }
        denied = self._identity_error(user, token) or self._owner_refusal(req.user, user, id)
        if denied:
            return {"id": id, "state": "refused", "reason": denied}
        event = self._events.get(id)
        if event is not None and req.state in ("queued", "starting"):
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self._status(req)

    @validated(lambda why: {"cancelled": False, "what": why})
    def cancel(
        self, id: Name, user: Name | None = None, token: Token | None = None
    ) -> dict[str, Any]:
        """Cancel a queued request or end a lease (its session is killed)."""
        denied = self._identity_error(user, token)
        if denied:
            return {"cancelled": False, "what": denied}
        req = self.requests.get(id)
        if req is not None and req.state in ("queued", "starting"):
            if user is not None and req.user != user:
                return {
                    "cancelled": False,
                    "what": f"{id} belongs to {req.user}; you can cancel only your own work",
                }
            for lease_id in list(req.leases):
                if lease_id in self.leases:
                    self._end_lease(self.leases[lease_id], "its request was cancelled", kill=True)
            self._finish_request(req, "cancelled", "cancelled by its owner")
            self._schedule()
            return {"cancelled": True, "what": f"queued request {id}"}
        lease = self.leases.get(id)
        if lease is not None:
            if user is not None and lease.user != user:
                return {
                    "cancelled": False,
                    "what": f"{id} belongs to {lease.user}; you can cancel only your own work",
                }
            self._end_lease(lease, "cancelled by its owner", kill=True)
            self._schedule()
            return {"cancelled": True, "what": f"lease {id} (its session was ended)"}
        return {"cancelled": False, "what": f"nothing queued or running is called {id}"}

    @validated(lambda why: {"released": False, "error": why})
    def release(
        self,
        lease: Name,
        user: Name | None = None,
        reason: Text = "released by its owner",
        token: Token | None = None,
    ) -> dict[str, Any]:
        denied = self._identity_error(user, token)
        if denied:
            return {"released": False, "error": denied}
        ls = self.leases.get(lease)
        if ls is None:
            return {"released": False}
        if user is not None and ls.user != user:
            return {"released": False, "error": f"{lease} belongs to {ls.user}"}
        self._end_lease(ls, reason, kill=True)
        self._schedule()
        return {"released": True}

    @validated(lambda why: {"id": None, "state": "unknown", "end_reason": why})
    def lease_info(
        self, lease: Name, user: Name | None = None, token: Token | None = None
    ) -> LeaseView | dict[str, Any]:
        """A lease, live or ended, for its owner (why it ended, where its variables went)."""
        ls = self.ledger.lease_or_ended(lease)
        if ls is None:
            return {
                "id": lease,
                "state": "unknown",
                "end_reason": "the broker has no record of this lease",
            }
        denied = self._identity_error(user, token) or self._owner_refusal(ls.user, user, lease)
        if denied:
            return {"id": lease, "state": "unknown", "end_reason": denied}
        return ls.public()

    @validated(error_reply)
    def usage(self, since: float = 0.0) -> dict[str, Any]:
        """GPU-hours per user and team from the audit store (everyone may read usage)."""
        return self.audit.usage(since=since)

    @validated(dropped)
    def run_update(
        self,
        run: Name,
        user: Name | None = None,
        notebook: Text | None = None,
        cell: Text | None = None,
        world_size: Annotated[int, Range(1, RequestSpec.MAX_RANKS)] | None = None,
        attempt: Count | None = None,
        state: RunState | None = None,
        leases: Annotated[list[Name], MaxLen(RequestSpec.MAX_RANKS)] | None = None,
        resumes: Name | None = None,
    ) -> None:
        """A kernel says how its scale-out run stands (ranks, state, attempt, the earlier run whose
        checkpoints it continues), for the panel. Every run of a cell has a run id of its own; a run
        that ends (done, failed, stopped) gets its end time."""
        record = self.runs.setdefault(run, {"id": run, "ranks": {}, "started": time.time()})
        fields = {
            "user": user,
            "notebook": notebook,
            "cell": cell,
            "world_size": world_size,
            "attempt": attempt,
            "state": state,
            "leases": leases,
            "resumes": resumes,
        }
        record.update({k: v for k, v in fields.items() if v is not None})
        if state is not None:
            record["ended"] = time.time() if state != "running" else None
        # keep the latest runs' streams for replay, not every run forever
        while len(self.runs) > RUNS_KEPT:
            self.runs.pop(next(iter(self.runs)))

    @validated(error_reply)
    async def scale(
        self,
        n: Workers | None = None,
        minimum: Workers | None = None,
        maximum: Workers | None = None,
        user: Name | None = None,
        token: Token | None = None,
    ) -> dict[str, Any]:
        """Grow or shrink the pool through its cluster manager, where the pool has one, for the
        users the admin allows (Dask config ``jupyter-gpu.scale-users``; everyone when unset).
        Refusals are audited."""
        denied = self._identity_error(user, token) or self._scale_refusal(user)
        if denied:
            self.audit.refused(
                None,
                user,
                None,
                {"scale": {"n": n, "minimum": minimum, "maximum": maximum}},
                denied,
            )
            self.sched.log_event(
                "jupyter-gpu-audit", {"action": "scale refused", "user": user, "reason": denied}
            )
            return {"error": denied}
        if self.scaler is None:
            return {
                "error": "this pool has no cluster manager to scale; add machines with "
                "`jupyter-gpu worker ADDRESS` instead"
            }
        result: dict[str, Any] = await self.scaler(n=n, minimum=minimum, maximum=maximum)
        log.info("user %s scaled the pool: n=%s minimum=%s maximum=%s", user, n, minimum, maximum)
        self.sched.log_event(
            "jupyter-gpu-audit",
            {"action": "scale", "user": user, "n": n, "minimum": minimum, "maximum": maximum},
        )
        return result

    def snapshot(self) -> Snapshot:
        """The whole pool as the panel, ``%gpu status`` and ``jupyter-gpu status`` show it."""
        pool: PoolInfo = {
            "address": self.scheduler.address if self.scheduler else None,
            "embedded": self.embedded,
            "scalable": self.scaler is not None,
            "scale_users": self.scale_users(),
            "cluster": self.scaler.view() if self.scaler is not None else None,
            "default_fraction": float(config.get("default-fraction")),
            "users_isolated": self.users_isolated(),
            "shared": self.tokens is not None,
        }
        return views.snapshot(
            self.ledger,
            self.samples,
            pool,
            self.runs.values(),
            "tokens" if self.tokens is not None else "names",
            waiting_note=self._waiting_note(),
        )

    # ------------------------------------------------------------------ who may
    def sessions_as_users(self) -> bool:
        """Whether sessions are to run as their users' accounts: when the pool checks tokens,
        unless the admin turned it off (``session.as-user: false``, e.g. tokens kept for
        accounting only)."""
        return self.tokens is not None and config.get("session.as-user") is not False

    def users_isolated(self) -> bool:
        """Whether every session runs as its user (as above, and every worker runs as root)."""
        workers = [self.runs_as_users.get(w, False) for w in self.worker_gpus]
        return self.sessions_as_users() and bool(workers) and all(workers)

    @staticmethod
    def scale_users() -> list[str] | None:
        """Who may scale the pool (None: everyone), from Dask config ``jupyter-gpu.scale-users``."""
        allowed = config.get("scale-users")
        if allowed is None:
            return None
        return [str(u) for u in ([allowed] if isinstance(allowed, str) else allowed)]

    def _scale_refusal(self, user: str | None) -> str | None:
        allowed = self.scale_users()
        if allowed is None or (user is not None and user in allowed):
            return None
        return (
            f"user {user!r} may not scale this pool: only {', '.join(allowed) or 'nobody'} may "
            "(Dask config "
            "jupyter-gpu.scale-users on the scheduler). Ask one of them, or an administrator."
        )

    def _owner_refusal(self, owner: str, user: str | None, what: str) -> str | None:
        """In a pool that checks tokens, only the owner may read or change their work."""
        if self.tokens is None or user == owner:
            return None
        return f"{what} belongs to another user; you can see only your own work"

    def _identity_error(self, user: str | None, token: str | None) -> str | None:
        """With a token file configured, the reason ``user``/``token`` is not accepted (None:
        accepted)."""
        return self.tokens.check(user, token) if self.tokens is not None else None

    # ------------------------------------------------------------------ scheduling
    def _schedule(self) -> None:
        """Grant, in policy order, every queued request that fits now; give the others their
        reason."""
        fail = lambda req, reason: self._finish_request(req, "failed", reason)
        for req, leases in self.ledger.schedule(self._preempt, fail=fail):
            for lease in leases:
                self.audit.lease_started(lease.public(), lease.preemptible)
            self._spawn(self._start_sessions(req, leases))

    def _preempt(self, lease_id: str, reason: str, req: Request | None = None) -> None:
        """End a lease for a waiting request (an over-quota lease reclaimed for a guarantee, or an
        idle session suspended for an interactive cell); its owner reads ``reason`` next cell."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return
        log.info("taking lease %s of %s back: %s", lease_id, lease.user, reason)
        self.audit.preempted(
            lease.public(),
            {"id": req.id, "user": req.user, "team": req.team} if req else {},
            reason,
        )
        lease.preempted = True
        self._vacate(lease, reason, req)

    def _vacate(self, lease: Lease, reason: str, req: Request | None = None) -> None:
        """End ``lease`` now: an idle session first moves its variables to host memory (its owner's
        next cell brings them back), anything else is ended at once."""
        if lease.state == "idle" and lease.world_size == 1 and config.get("reclaim-offload"):
            # the memory is booked for ``req`` now; its session starts once this one has written its
            # variables to host memory and exited (``_start_sessions`` waits for that)
            lease.offload = {"state": "pending"}  # a kernel asking now waits for the outcome
            self._end_lease(lease, reason, kill=False)
            task = asyncio.ensure_future(self._offload_then_end(lease))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if req is not None:
                self._drains.setdefault(req.id, []).append(task)
            return
        self._end_lease(lease, reason, kill=True)

    async def _offload_then_end(self, lease: Lease) -> None:
        """Move a reclaimed idle session's variables to host memory on its worker, then end its
        process."""
        timeout = config.get_seconds("offload-timeout")
        started = time.monotonic()
        try:
            reply = await asyncio.wait_for(
                self.sched.rpc(lease.worker).gpu_session_offload(
                    lease=lease.id, timeout=timeout, key=self.pool_key
                ),
                timeout + 5,
            )
        except Exception as exc:  # noqa: BLE001 - the worker is gone or too slow: the variables are lost
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        if reply.get("error"):
            log.warning("could not offload lease %s: %s", lease.id, reply["error"])
            lease.offload = None
            lease.end_reason = (
                f"{lease.end_reason}; its variables could not be kept ({reply['error']})"
            )
        else:
            # ``standby``: the session had copied its variables while idle, so moving it was a
            # rename
            lease.offload = {
                "state": "saved",
                "worker": lease.worker,
                "path": reply["path"],
                "saved": reply["saved"],
                "lost": reply["lost"],
                "bytes": reply["bytes"],
                "standby": bool(reply.get("standby")),
                "seconds": time.monotonic() - started,
            }
            lease.end_reason = (
                f"{lease.end_reason}; its {len(reply['saved'])} variable(s) were moved to host "
                "memory and come back with your next %%gpu cell"
            )
            log.info(
                "lease %s offloaded %d variable(s), %d byte(s) in %.2f s%s",
                lease.id,
                len(reply["saved"]),
                reply["bytes"],
                lease.offload["seconds"],
                " (its standby copy)" if reply.get("standby") else "",
            )
            if lease.client is not None and lease.client not in self.sched.clients:
                # its kernel went away meanwhile: nobody will restore them
                await self._discard_offload(lease)
        await self._kill_session(lease)

    def _housekeeping(self) -> None:
        """Once a second: the admin idle timeout, reservations that aged, orphans of a restart, the
        audit heartbeat."""
        self.audit.heartbeat()
        now = time.time()
        if self._adopted:
            self._end_orphans(now)
        expired = self.policy.idle_expired(now)
        for lease_id in expired:
            lease = self.leases.get(lease_id)
            if lease is not None and lease.state == "idle":
                self._vacate(
                    lease,
                    f"released by the pool after {self.policy.quotas.idle_timeout:g} s idle "
                    "(the admin's idle timeout)",
                )
        if expired or self.queue:
            self._schedule()

    async def _start_sessions(self, req: Request, leases: list[Lease]) -> None:
        # sessions reclaimed for this request must be gone from the GPU before its session starts
        # there
        drains = self._drains.pop(req.id, [])
        if drains:
            await asyncio.gather(*drains, return_exceptions=True)

        async def start_one(lease: Lease) -> None:
            restore = (
                {"worker": req.restore["worker"], "path": req.restore["path"]}
                if (req.restore and lease.rank == 0)
                else None
            )
            # only the worker and the owner's kernel get it
            lease.secret = secrets.token_urlsafe(24)
            reply = await self.sched.rpc(lease.worker).gpu_session_start(
                lease=lease.public(),
                scheduler=self.sched.address,
                restore=restore,
                client=lease.client,
                secret=lease.secret,
                account=lease.user if self.sessions_as_users() else None,
                key=self.pool_key,
            )
            if reply.get("error"):
                raise RuntimeError(reply["error"])
            lease.address, lease.pid = reply["address"], reply["pid"]
            lease.isolation = reply.get("isolation", "none")
            lease.containment, lease.host_memory_limit = (
                reply.get("containment"),
                reply.get("host_memory_limit"),
            )
            if lease.state == "starting":
                self.ledger.set_state(lease.id, "idle")
            if restore:
                req.restored = reply.get("restored")

        try:
            await asyncio.gather(*(start_one(ls) for ls in leases))
        except Exception as exc:  # noqa: BLE001 - a worker's failure comes back as any remote error: free everything, say why
            log.warning("session start for %s failed: %s", req.id, exc)
            for lease in leases:
                if lease.id in self.leases:
                    self._end_lease(lease, f"its session process failed to start: {exc}", kill=True)
            self._finish_request(
                req, "failed", f"The GPU session could not be started on the pool: {exc}"
            )
            self._schedule()
            return
        if req.state == "starting":
            self._finish_request(req, "granted", "")
        else:  # cancelled while starting
            for lease in leases:
                if lease.id in self.leases:
                    self._end_lease(lease, "its request was cancelled", kill=True)

    def _finish_request(self, req: Request, state: RequestState, reason: str) -> None:
        self.ledger.finish_request(req, state, reason)
        event = self._events.pop(req.id, None)
        if event is not None:
            event.set()
        if state == "refused":
            self.audit.refused(req.id, req.user, req.team, req.spec.__dict__, reason)
        if state != "granted":
            if self.scheduler is not None:
                self.scheduler.log_event(
                    "jupyter-gpu-refused" if state == "refused" else "jupyter-gpu-requests",
                    {"id": req.id, "user": req.user, "state": state, "reason": reason},
                )

    def _end_lease(self, lease: Lease, reason: str, kill: bool) -> None:
        if self.ledger.end(lease.id, reason) is None:
            return
        self.audit.lease_ended(lease.id, lease.ended, reason, lease.peak_bytes)
        log.info("lease %s of %s ended: %s", lease.id, lease.user, reason)
        if kill and lease.worker in self.worker_gpus:
            self._spawn(self._kill_session(lease))

    async def _kill_session(self, lease: Lease) -> None:
        try:
            await self.sched.rpc(lease.worker).gpu_session_signal(
                lease=lease.id, signal="kill", key=self.pool_key
            )
        except Exception as exc:  # noqa: BLE001 - the worker may be gone already, failing in any way
            log.debug("could not kill session of %s on %s: %s", lease.id, lease.worker, exc)

    def _sample_virtual(self) -> None:
        """Virtual GPUs have no counter: their utilization is the leased share of sessions running a
        cell."""
        now = time.time()
        for gpu in self.gpus.values():
            if not gpu.virtual:
                continue
            running = sum(
                a.bytes
                for lid in gpu.leases
                if lid in self.leases
                for a in self.leases[lid].allocations
                if a.gpu == gpu.id and self.leases[lid].state == "running"
            )
            self.samples[gpu.id].append(
                {
                    "t": now,
                    "utilization": round(100.0 * running / gpu.total_bytes, 1),
                    "memory_used_bytes": gpu.leased_bytes,
                }
            )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _plain_metrics(metrics: dict[Any, Any]) -> dict[str, Any]:
    """What the panel can show as JSON: numbers, text, true/false and null; NaN and infinities as
    text (JSON has no NaN: one would break the panel's parse for everyone), anything else by its
    repr, cut short."""
    plain: dict[str, Any] = {}
    for key, value in list(metrics.items())[:64]:
        if isinstance(value, float) and not math.isfinite(value):
            value = repr(value)
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            value = repr(value)
        plain[str(key)[:64]] = value[:200] if isinstance(value, str) else value
    return plain


async def dask_setup(scheduler: Scheduler) -> None:
    """``--preload jupyter_gpu.broker.plugin``: install the broker on this scheduler.

    A scheduler whose broker cannot load its settings exits (code 1) instead of serving without
    a broker: a supervisor sees the failure, and the log says which file to fix."""
    if PLUGIN_NAME in scheduler.plugins:
        return
    try:
        settings = load_settings()
    except PoolConfigError as exc:
        log.critical("jupyter-gpu: the broker cannot start: %s", exc)
        logging.shutdown()
        os._exit(1)
    scheduler.add_plugin(GpuBroker(settings=settings))
