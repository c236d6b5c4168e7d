"""The GPU broker: a Dask ``SchedulerPlugin`` that owns the pool's GPU inventory, queue and leases.

Workers report their GPUs to it; kernels ask it for leases through scheduler handlers
(``gpu_request``, ``gpu_wait``, ...); it grants leases by best-fit packing in the fair-share order,
asks the owning worker to start a session process for each grant, and frees leases when a session
ends, its kernel's client disconnects or its worker is lost. Everything the panel and ``%gpu
status`` show comes from ``gpu_snapshot``.

This class is Dask's side of the broker: its hooks (start, close, a worker or a client gone) and its
handlers, each declared with who may call it (``common/handlers.py``). The work is elsewhere in
``broker/``: the bookkeeping in the ``Ledger`` (no asyncio), the life of requests and leases in
``leasing.py``, the calls to workers in ``actuation.py``, adoption after a restart in
``adoption.py``, ``--workers`` runs in ``runs.py``, the checks of callers in ``permissions.py``.

Load it into any Dask scheduler with ``--preload jupyter_gpu.broker.plugin``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any, Callable

from distributed.diagnostics.plugin import SchedulerPlugin

from jupyter_gpu.broker import gate, grant_signer, metrics, views
from jupyter_gpu.broker.admission import Admission
from jupyter_gpu.broker.adoption import Adoption
from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.draining import DrainHandlers, moved_session
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.identity import Identities
from jupyter_gpu.broker.leasing import LeaseKeeper
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import Request, new_id
from jupyter_gpu.broker.permissions import Permissions
from jupyter_gpu.broker.registry import WorkerRegistry
from jupyter_gpu.broker.runs import RunBook
from jupyter_gpu.broker.sampling import GpuSamples
from jupyter_gpu.broker.scaling import PoolScaler
from jupyter_gpu.broker.session_reports import record_session_report
from jupyter_gpu.broker.settings import BrokerSettings, PoolConfigError, load_settings
from jupyter_gpu.common import config, no_pickle, poolkey
from jupyter_gpu.common.handlers import handler, handlers_of
from jupyter_gpu.common.protocol import (
    Caller,
    CancelReply,
    GpuInfoMsg,
    LeaseStateReport,
    LeaseView,
    LiveSession,
    ParkedCopy,
    PoolInfo,
    ReleaseReply,
    RequestSpec,
    RequestStatus,
    RunMetricsReport,
    RunUpdate,
    Sample,
    ScaleReply,
    Snapshot,
    UnknownLease,
    UsageView,
)
from jupyter_gpu.common.refusals import NotPossible
from jupyter_gpu.common.validation import (
    Address,
    Bytes,
    MaxLen,
    Name,
    Range,
    Secret,
    Text,
    Token,
)

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import Unpack

if TYPE_CHECKING:
    from distributed import Scheduler

log = logging.getLogger(__name__)

PLUGIN_NAME = "jupyter-gpu-broker"
Workers = Annotated[int, Range(0, 100_000)]  # a pool's worker count (scale)


class GpuBroker(DrainHandlers, SchedulerPlugin):
    """Grants fractions of GPUs to kernels' sessions; see the module docstring."""

    name = PLUGIN_NAME

    def __init__(
        self,
        policy: FairSharePolicy | None = None,
        embedded: bool = False,
        audit: AuditStore | None = None,
        tokens: Identities | None = None,
        settings: BrokerSettings | None = None,
    ):
        policy, audit, tokens = _configured(policy, audit, tokens, settings)
        self.policy: FairSharePolicy = policy
        self.ledger = Ledger(self.policy)
        self.audit: AuditStore = audit
        self.permissions = Permissions(tokens)
        self.embedded = embedded
        self.samples = GpuSamples()
        self.runs = RunBook()
        self.keeper = LeaseKeeper(self.ledger, self.audit, self.permissions)
        self.metrics = self.keeper.metrics  # Prometheus: broker/metrics.py
        self.adoption = Adoption(self.ledger, self.audit)
        self.admission = Admission(self.ledger, self.audit, self.permissions)
        self.workers = WorkerRegistry(self.ledger, self.samples, self.adoption)
        # a pool that owns a cluster manager: broker/scaling.py's PoolScaler
        self.scaler: PoolScaler | None = None
        self.scheduler: Scheduler | None = None  # set by start()

    @property
    def sched(self) -> Scheduler:
        """The scheduler this broker runs on (it is started)."""
        assert self.scheduler is not None, "the broker is not started"
        return self.scheduler

    @property
    def pool_key(self) -> str | None:
        return self.permissions.pool_key

    # ------------------------------------------------------------------ plugin hooks
    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The broker's scheduler handlers: its methods declared with ``@handler``."""
        return handlers_of(self)

    def stream_handlers(self) -> dict[str, Callable[..., Any]]:
        """The broker's handlers of workers' streams (declared with ``stream=True``)."""
        return handlers_of(self, stream=True)

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        # what workers and the broker show each other (common/poolkey.py); users never hold it
        self._key_path = poolkey.key_path(scheduler.address)
        self._made_key = poolkey.read_key(self._key_path) is None
        self.permissions.pool_key = poolkey.ensure_key(self._key_path)
        self.keeper.attach(scheduler, self.pool_key, self._key_path)
        # grants for sessions that run as their users (broker/grant_signer.py)
        self.keeper.workers.signing_key = grant_signer.signing_key(scheduler.address)
        self.admission.clients = lambda: scheduler.clients
        metrics.install(self)
        # our handlers, and in a pool shared by several people nothing else (broker/gate.py)
        gate.install(
            scheduler,
            self.pool_key,
            self.handlers(),
            self.stream_handlers(),
            shared=self.permissions.shared,
        )
        self.permissions.start(self.policy.quotas)  # JupyterHub: the groups quota teams name
        self.audit.open_boot()
        from tornado.ioloop import PeriodicCallback

        interval_ms = config.get_seconds("worker.sample-interval") * 1000
        self._sampler = PeriodicCallback(
            lambda: self.samples.sample_virtual(self.ledger), interval_ms
        )
        self._sampler.start()
        self._housekeeper = PeriodicCallback(self._housekeeping, 1000)
        self._housekeeper.start()

    async def close(self) -> None:
        metrics.uninstall(self)
        # an embedded pool's key and id mark die with it (a pool up's stay: its workers rejoin a
        # restarted scheduler)
        forget = self.embedded and getattr(self, "_made_key", False)
        self.keeper.close_ids(forget)
        if forget:
            with contextlib.suppress(OSError):
                os.unlink(self._key_path)
        if getattr(self, "_sampler", None):
            self._sampler.stop()
        if getattr(self, "_housekeeper", None):
            self._housekeeper.stop()
        await self.permissions.close()
        self.audit.heartbeat()

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        gone, leases = self.ledger.remove_worker(worker)
        self.samples.forget(gone)
        # what the cluster manager adds: the job it ran in (a Slurm job's walltime...)
        note = self.scaler.lost_note(worker) if self.scaler is not None else None
        self.keeper.worker_lost(worker, leases, note)

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        self.keeper.client_gone(client)
        self.admission.client_gone(client)

    def _housekeeping(self) -> None:
        """Once a second: the admin idle timeout, reservations that aged, orphans of a restart, the
        audit heartbeat."""
        self.audit.heartbeat()
        now = time.time()
        self.keeper.housekeeping(now, self.adoption.orphans(now, self.sched.clients))

    # ------------------------------------------------------------------ handlers: workers
    # each on the worker's own stream: ``worker`` is the stream's (broker/gate.py), which only a
    # worker that proved it holds the pool key registered
    @handler("gpu_register_worker", caller="worker", check="worker-stream", stream=True)
    def gpu_register_worker(
        self,
        worker: Address,
        gpus: Annotated[list[GpuInfoMsg], MaxLen(1024)],
        sessions: Annotated[list[LiveSession], MaxLen(10_000)] | None = None,
        parked: Annotated[list[ParkedCopy], MaxLen(10_000)] | None = None,
        start_slots: Annotated[int, Range(1, 1024)] = 1,
        accounts: bool = False,
        host_memory: Bytes | None = None,
        cpus: Annotated[float, Range(0, RequestSpec.MAX_CPUS)] | None = None,
    ) -> None:
        """A worker's GPU plugin offers its GPUs (replacing any earlier offer) and says what its
        part of its machine leaves to sessions (``host_memory`` bytes, ``cpus`` cores; None:
        unbounded), which the ledger books leases against; after a scheduler restart, with the
        sessions and parked variables it kept, which are adopted (those that cannot be are named
        back to it: ``gpu_sessions_refused``)."""
        self.ledger.set_host(worker, host_memory, cpus)
        offer = self.workers.register(
            worker, gpus, sessions or [], parked or [], start_slots, accounts
        )
        self.workers.tell_refused(self.sched, worker, offer["refused_sessions"])
        self.keeper.schedule()

    @handler("gpu_samples", caller="worker", check="worker-stream", stream=True)
    def gpu_samples(
        self, worker: Address, samples: Annotated[dict[str, Sample], MaxLen(1024)]
    ) -> None:
        """NVML utilization samples from a worker's sampling thread, keyed by GPU index."""
        self.samples.add(worker, samples)

    @handler("gpu_session_ended", caller="worker", check="worker-stream", stream=True)
    def gpu_session_ended(self, worker: Address, lease: Name, reason: Text) -> None:
        """The worker saw a session process of its own exit (crash, OOM kill, exit)."""
        ls = self.ledger.leases.get(lease)
        if ls is not None and ls.worker == worker:
            self.keeper.end_lease(ls, reason, kill=False)
            self.keeper.schedule()

    @handler("gpu_lease_state", caller="session", check="worker-stream", stream=True)
    def gpu_lease_state(
        self, worker: Address, lease: Name, **report: Unpack[LeaseStateReport]
    ) -> None:
        """A session's cell started (``running``), how far it is (``running`` with ``step`` of
        ``total``: the queue's estimates use it) or that it ended (``idle``, with its peak memory,
        its mean utilization on real GPUs and what it holds now). It comes on the stream of the
        session's worker, which alone knows which lease the session holds; a note about a lease
        on another worker is dropped."""
        record_session_report(self.ledger, lease, worker, report)

    @handler("gpu_run_metrics", caller="session", check="worker-stream", stream=True)
    def gpu_run_metrics(
        self, worker: Address, lease: Name, **report: Unpack[RunMetricsReport]
    ) -> None:
        """A ``--workers`` rank's ``jupyter_gpu.report()`` metrics, batched by its session and
        passed on by its worker, kept for the panel's replay. Only a lease of the run (as its
        kernel declared it) on that worker may add to it, as its own rank."""
        run, rank = report["run"], report["rank"]
        ls = self.ledger.leases.get(lease)
        if ls is not None and ls.worker == worker and self.runs.may_report(run, rank, ls):
            self.runs.add_metrics(run, rank, report["items"])

    # ------------------------------------------------------------------ handlers: kernels
    @handler("gpu_request", caller="kernel", check="user-token")
    async def gpu_request(
        self,
        user: Name,
        kernel: Name,
        # checked as a mapping here; RequestSpec.from_wire checks its fields
        spec: Annotated[dict[Any, Any], MaxLen(64)],
        client: Name | None = None,
        notebook: Text | None = None,
        cell: Text | None = None,
        token: Token | None = None,
        restore: Name | None = None,
    ) -> RequestStatus:
        """Queue a request for GPU memory: granted at once if it fits, refused at once (a state,
        with the fix) if no GPU of the pool can ever satisfy it. ``restore``: an ended lease of this
        kernel whose variables the new session starts with. In a shared pool it must come from a
        connected kernel, and each user's waiting requests are capped (``broker/admission.py``);
        refusals are audited once the caller proved who they are."""
        rspec = await self.admission.admitted(user, token, client, spec)
        if restore and (moved := moved_session(self.keeper, restore, user, kernel)):
            return self._status(moved)  # its worker was drained: the session it moved to
        offload = self.keeper.take_offload(restore, user, kernel) if restore else None
        req = Request(
            id=new_id("R"),
            user=user,
            kernel=kernel,
            client=client,
            spec=rspec,
            notebook=notebook,
            cell=cell,
            team=self.policy.quotas.team_of(user),
            restore=offload,
        )
        # what the pool could grow to counts too: adaptive scaling adds workers for it
        self.keeper.admit(req, self.scaler.headroom() if self.scaler is not None else [])
        return self._status(req)

    def _status(self, req: Request) -> RequestStatus:
        """A request's status, with the cluster manager's word when new workers are on their way."""
        return views.request_status(
            self.ledger, req, self.workers.start_slots, waiting_note=self._waiting_note()
        )

    def _waiting_note(self) -> str | None:
        return self.scaler.waiting_note() if self.scaler is not None else None

    @handler("gpu_wait", caller="kernel", check="user-token")
    async def gpu_wait(
        self,
        id: Name,
        timeout: Annotated[float, Range(0, 60)] = 1.0,
        user: Name | None = None,
        token: Token | None = None,
    ) -> RequestStatus:
        """Long-poll a request until it leaves queued/starting, or the timeout. Only its owner may
        read it (a granted status carries the lease's secret); a request the broker does not know
        (it restarted) is ``unknown``."""
        req = self.ledger.requests.get(id)
        if req is None:
            return {
                "id": id,
                "state": "unknown",
                "reason": f"no request {id} is known to the broker",
            }
        await self.permissions.check_identity(user, token)
        self.permissions.check_owner(req.user, user, id)
        await self.keeper.wait(req, timeout)
        return self._status(req)

    @handler("gpu_cancel", caller="kernel", check="user-token")
    async def gpu_cancel(
        self,
        id: Name,
        user: Name | None = None,
        token: Token | None = None,
        secret: Secret | None = None,
    ) -> CancelReply:
        """Cancel my queued request (its secret is proof enough: ``Permissions.cancel_verdict``),
        or end my lease (its session is killed); admins: anyone's."""
        req = self.ledger.requests.get(id)
        verdict = await self.permissions.cancel_verdict(req, user, token, secret)
        return self.keeper.cancel(id, user, verdict)

    @handler("gpu_release", caller="kernel", check="user-token")
    async def gpu_release(
        self,
        lease: Name,
        user: Name | None = None,
        reason: Text = "released by its owner",
        token: Token | None = None,
        secret: Secret | None = None,
    ) -> ReleaseReply:
        """End my lease now (``%gpu release``, ``--fresh`` cells, ``--workers`` runs); a lease that
        has ended already is not released again. Its secret is proof enough of ownership."""
        ls = self.ledger.leases.get(lease)
        await self.permissions.check_holder(ls, user, token, secret)
        if ls is None:
            return {"released": False}
        self.keeper.end_lease(ls, reason, kill=True)
        self.keeper.schedule()
        return {"released": True}

    @handler("gpu_lease_info", caller="kernel", check="user-token")
    async def gpu_lease_info(
        self, lease: Name, user: Name | None = None, token: Token | None = None
    ) -> LeaseView | UnknownLease:
        """A lease of mine, live or ended (why it ended, where its variables went); one the broker
        does not know is ``unknown``."""
        ls = self.ledger.lease_or_ended(lease)
        if ls is None:
            return {"id": lease, "state": "unknown", "end_reason": "the broker has no record of it"}
        await self.permissions.check_identity(user, token)
        self.permissions.check_owner(ls.user, user, lease)
        return ls.public()

    @handler("gpu_run_update", caller="kernel", check="user-token")
    async def gpu_run_update(
        self, run: Name, token: Token | None = None, **update: Unpack[RunUpdate]
    ) -> None:
        """How a ``--workers`` run of mine stands (ranks, state, attempt, the earlier run whose
        checkpoints it continues), for the panel. A run is its first reporter's; the leases it
        names must be that user's."""
        user = update.get("user")
        await self.permissions.check_identity(user, token)
        if self.permissions.shared:
            self.runs.check_reporter(run, user, update.get("leases") or (), self.ledger.leases)
        self.runs.update(run, update)

    @handler("gpu_scale", caller="kernel", check="user-token")
    async def gpu_scale(
        self,
        n: Workers | None = None,
        minimum: Workers | None = None,
        maximum: Workers | None = None,
        user: Name | None = None,
        token: Token | None = None,
    ) -> ScaleReply:
        """Grow or shrink a pool that owns a cluster manager, for the users the admin allows (Dask
        config ``jupyter-gpu.scale-users``; everyone when unset): jobs are submitted and cancelled;
        a worker holding a session or a host-memory copy is never retired. Refusals are audited."""
        asked = {"n": n, "minimum": minimum, "maximum": maximum}
        await self.permissions.check_scale(user, token, asked, self.audit, self.sched.log_event)
        if self.scaler is None:
            raise NotPossible(
                "this pool has no cluster manager to scale; add machines with "
                "`jupyter-gpu worker ADDRESS` instead"
            )
        return await self.scaler.scale_for(user, n, minimum, maximum)

    @handler("gpu_snapshot", caller="anyone", check="none")
    async def gpu_snapshot(self, user: Name | None = None, token: Token | None = None) -> Snapshot:
        """The whole pool as the panel, ``%gpu status`` and ``jupyter-gpu status`` show it: GPUs,
        leases, queue, quotas, runs; with a user, their ``viewer`` rights."""
        snap = views.snapshot(
            self.ledger,
            self.samples.by_gpu,
            _pool_info(self),
            self.runs.views(),
            self.permissions.kind,
            waiting_note=self._waiting_note(),
        )
        return await self.permissions.with_viewer(snap, user, token)

    @handler("gpu_usage", caller="anyone", check="none")
    async def gpu_usage(self, since: float = 0.0, **who: Unpack[Caller]) -> UsageView:
        """GPU-hours per user and team from the audit store (behind a Hub: others' for admins)."""
        return await self.permissions.usage_view(self.audit.usage(since=since), **who)


def _pool_info(broker: GpuBroker) -> PoolInfo:
    """What the pool says of itself in a snapshot: where it is, how it scales, whom it isolates."""
    scaler = broker.scaler
    return {
        "address": broker.scheduler.address if broker.scheduler else None,
        "embedded": broker.embedded,
        "scalable": scaler is not None,
        "scale_users": broker.permissions.scale_users(),
        "cluster": scaler.view() if scaler is not None else None,
        "default_fraction": float(config.get("default-fraction")),
        "users_isolated": broker.workers.users_isolated(broker.permissions),
        "shared": broker.permissions.shared,
    }


def _configured(
    policy: FairSharePolicy | None,
    audit: AuditStore | None,
    tokens: Identities | None,
    settings: BrokerSettings | None,
) -> tuple[FairSharePolicy, AuditStore, Identities | None]:
    """What is not given comes from Dask config (``jupyter-gpu.pool-config``, ``token-file``,
    ``audit-db``), checked: fair share with the configured quotas (none: of use only)."""
    if settings is None and (policy is None or audit is None or tokens is None):
        settings = load_settings()
    if settings is not None:
        policy = policy or FairSharePolicy(settings.quotas)
        audit = audit or settings.audit
        tokens = tokens if tokens is not None else settings.tokens
    assert policy is not None and audit is not None  # given, or from the settings
    return policy, audit, tokens


async def dask_setup(scheduler: Scheduler) -> None:
    """``--preload jupyter_gpu.broker.plugin``: install the broker on this scheduler.

    A scheduler whose broker cannot load its settings exits (code 1) instead of serving without
    a broker: a supervisor sees the failure, and the log says which file to fix."""
    if PLUGIN_NAME in scheduler.plugins:
        return
    no_pickle.install()  # a scheduler of the pool reads no pickles (common/no_pickle.py)
    try:
        settings = load_settings()
    except PoolConfigError as exc:
        log.critical("jupyter-gpu: the broker cannot start: %s", exc)
        logging.shutdown()
        os._exit(1)
    scheduler.add_plugin(GpuBroker(settings=settings))
