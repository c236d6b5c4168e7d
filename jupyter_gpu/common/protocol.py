"""The wire protocol: every message that crosses a process boundary.

Four kinds of process talk to each other (``docs/architecture.md``): the notebook kernel, the
Dask scheduler with the broker, the Dask worker with the GPU plugin, and the session process
where cells run. The JupyterLab server extension and the CLI read the pool like a kernel does.
This module declares, in one place:

- the environment variables that configure a kernel or a worker (the user contract, DESIGN section 2);
- the value sets of states and options, as ``Literal`` types;
- the request a ``%%gpu`` cell sends (``RequestSpec``, the one message with behaviour: it validates itself
  with the error the notebook user reads, in the kernel before anything waits and again in the broker);
- the shapes of the other messages as ``TypedDict``s (what a field holds is in its comment): the
  arguments and replies of every handler, what a running cell streams, the zygote's datagrams and
  what a session reports to its worker.

The handlers themselves are declared next to their code (``common/handlers.py``): their annotated
signatures, with these types, are the protocol; ``jupyter_gpu/interfaces.py`` builds the tables of
``docs/interfaces.md`` from them. Field types may carry the limits ``common/validation.py`` checks
(``Name``, ``Bytes``...). A refusal is not a message: it is an exception (``common/refusals.py``).

Nothing here imports Dask or any process's code, so every side can import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, Final, Literal, TypedDict, cast

from jupyter_gpu.common.units import format_bytes
from jupyter_gpu.common.validation import (
    Address,
    Bytes,
    Count,
    MaxLen,
    Name,
    Percent,
    Range,
    Steps,
    Text,
    Token,
)

# ---------------------------------------------------------------------- environment (the user contract)
SCHEDULER_ENV: Final = "JUPYTER_GPU_SCHEDULER"  # the pool a kernel joins (else the embedded pool)
USER_ENV: Final = "JUPYTER_GPU_USER"  # who a kernel acts for (else the login name)
TOKEN_ENV: Final = "JUPYTER_GPU_TOKEN"  # that user's token, for pools with a token file
# what JupyterHub puts in the environment of a server it starts (and so of its kernels): behind a
# Hub they take the place of JUPYTER_GPU_USER and JUPYTER_GPU_TOKEN (docs/jupyterhub.md)
HUB_USER_ENV: Final = "JUPYTERHUB_USER"
HUB_TOKEN_ENV: Final = "JUPYTERHUB_API_TOKEN"
# a JupyterHub custom scope: its holders may see and cancel everyone's work on the pool
HUB_ADMIN_SCOPE: Final = "custom:jupyter-gpu:admin"
# e.g. 2x16GiB: virtual GPUs for machines without one
VIRTUAL_ENV: Final = "JUPYTER_GPU_VIRTUAL_GPUS"
# worker-internal: which of the machine's GPUs a worker owns
DEVICES_ENV: Final = "JUPYTER_GPU_DEVICES"
# nanny -> its worker: the key to ask the nanny to close
NANNY_KEY_ENV: Final = "JUPYTER_GPU_NANNY_KEY"
# where a GPU worker proves, when it registers, that it holds the pool key (common/poolkey.py)
STARTUP_PROOF: Final = "jupyter-gpu-proof"

# ---------------------------------------------------------------------- value sets
Priority = Literal["interactive", "batch"]
PRIORITIES: Final[tuple[Priority, ...]] = ("interactive", "batch")
RequestState = Literal["queued", "starting", "granted", "refused", "cancelled", "failed", "unknown"]
LeaseState = Literal["starting", "idle", "running", "ended"]
Isolation = Literal["none", "torch-cap", "mps", "mig"]
OffloadState = Literal["pending", "saved"]
RunState = Literal["running", "done", "failed", "stopped"]
# what an estimated start rests on (broker/estimates.py): the running cells' reported progress,
# idle sessions moving to host memory for it, how long the user's (or the pool's) recent cells ran,
# or nothing known (no estimate then; the note says why)
EtaBasis = Literal["progress", "idle", "user-cells", "pool-cells", "unknown"]


# ---------------------------------------------------------------------- the request of a %%gpu cell
@dataclass
class RequestSpec:
    """What a cell asks for, as the magic sends it (``spec`` of ``gpu_request``).

    Exactly one of ``fraction`` (of one GPU, 0 < f <= 1), ``memory`` (bytes on one GPU) or
    ``gpus`` (whole GPUs on one worker, >= 1) is set. ``workers`` > 1 asks for that many such
    allocations, each on a distinct GPU, granted together (a gang). ``host_memory`` (bytes) and
    ``cpus`` (cores, fractions allowed) are what each session needs on its machine; None leaves
    them to the pool's policy (``broker/hosts.py``: in proportion to the GPU share by default).
    """

    fraction: float | None = None
    memory: int | None = None
    gpus: int | None = None
    workers: int = 1
    priority: Priority = "interactive"
    host_memory: int | None = None
    cpus: float | None = None

    MAX_RANKS: ClassVar[int] = 4096
    MAX_GPUS: ClassVar[int] = 4096
    MAX_CPUS: ClassVar[int] = 1 << 20

    @classmethod
    def from_wire(cls, data: Any) -> RequestSpec:
        """The spec a kernel sent, checked field by field (types, finite numbers, ranges, known
        keys): raises ValueError worded for the notebook user. Nothing is coerced: ``workers: 1.5``
        is refused."""
        if not isinstance(data, dict):
            raise ValueError(f"the request must be a mapping of fields, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(unknown)} in the request; known: "
                f"{', '.join(sorted(known))}"
            )
        spec = cls(**data)
        if spec.fraction is not None and (
            isinstance(spec.fraction, bool)
            or not isinstance(spec.fraction, (int, float))
            or not math.isfinite(spec.fraction)
        ):
            raise ValueError(
                f"a GPU fraction must be a finite number in (0, 1]; got {spec.fraction!r}"
            )
        for name, top in (
            ("memory", 2**62),
            ("gpus", cls.MAX_GPUS),
            ("workers", cls.MAX_RANKS),
            ("host_memory", 2**62),
        ):
            value = getattr(spec, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number; got {value!r}")
            if value > top:
                raise ValueError(f"{name} must be at most {top}; got {value}")
        if spec.cpus is not None and (
            isinstance(spec.cpus, bool)
            or not isinstance(spec.cpus, (int, float))
            or not math.isfinite(spec.cpus)
            or spec.cpus > cls.MAX_CPUS
        ):
            raise ValueError(
                f"cpus must be a finite number of CPU cores up to {cls.MAX_CPUS}; got {spec.cpus!r}"
            )
        if not isinstance(spec.priority, str):
            raise ValueError(
                f"priority must be one of {', '.join(PRIORITIES)}; got {spec.priority!r}"
            )
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise ValueError, worded for the notebook user, for a spec that makes no sense."""
        set_fields = [n for n in ("fraction", "memory", "gpus") if getattr(self, n) is not None]
        if len(set_fields) != 1:
            raise ValueError(
                "ask for exactly one of a fraction (--gpus 0.5), whole GPUs (--gpus 2) or "
                "memory (--memory 8GiB)"
            )
        if self.fraction is not None and not (0 < self.fraction <= 1):
            raise ValueError(f"a GPU fraction must be in (0, 1]; got {self.fraction}")
        if self.memory is not None and self.memory <= 0:
            raise ValueError(f"memory must be positive; got {self.memory}")
        if self.gpus is not None and (self.gpus < 1 or int(self.gpus) != self.gpus):
            raise ValueError(f"whole GPUs must be a whole number >= 1; got {self.gpus}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1; got {self.workers}")
        if self.gpus is not None and self.gpus > 1 and self.workers > 1:
            raise ValueError(
                "--workers N runs one rank per GPU: use --gpus 1 (or a fraction) with --workers"
            )
        if self.priority not in PRIORITIES:
            raise ValueError(
                f"priority must be one of {', '.join(PRIORITIES)}; got {self.priority!r}"
            )
        if self.host_memory is not None and self.host_memory < 0:
            raise ValueError(f"host memory must be 0 or more bytes; got {self.host_memory}")
        if self.cpus is not None and not (self.cpus >= 0):  # NaN fails too
            raise ValueError(f"cpus must be 0 or more CPU cores; got {self.cpus}")

    def need_on(self, gpu: Any) -> int:
        """Bytes this spec reserves on ``gpu`` (anything with ``total_bytes``) for one allocation
        (whole GPUs reserve all of it)."""
        if self.memory is not None:
            return int(self.memory)
        if self.gpus is not None:
            total: int = gpu.total_bytes
            return total
        assert self.fraction is not None  # exactly one of the three is set (validate)
        return int(math.ceil(float(self.fraction) * gpu.total_bytes))

    def describe(self) -> str:
        if self.memory is not None:
            what = f"{format_bytes(self.memory)} of a GPU"
        elif self.gpus is not None:
            what = f"{self.gpus} whole GPU" + ("s" if self.gpus > 1 else "")
        else:
            what = f"{self.fraction:g} GPU"
        host = (
            [f"{format_bytes(self.host_memory)} host memory"]
            if self.host_memory is not None
            else []
        )
        host += [f"{self.cpus:g} CPU cores"] if self.cpus is not None else []
        what += f" with {' and '.join(host)}" if host else ""
        return what if self.workers == 1 else f"{self.workers} x {what}"

    def gpu_equivalents(self, gpu_bytes: int | None = None) -> float:
        """How many GPUs this spec is worth (for quotas and accounting)."""
        if self.gpus is not None:
            per = float(self.gpus)
        elif self.fraction is not None:
            per = float(self.fraction)
        else:
            # memory is set (validate); unread without gpu_bytes
            per = float(cast(int, self.memory)) / float(gpu_bytes) if gpu_bytes else 1.0
        return per * self.workers


# ---------------------------------------------------------------------- worker -> broker
class GpuInfoMsg(TypedDict, total=False):
    """One GPU a worker offers (``gpu_register_worker``'s ``gpus``; ``common/inventory.py``'s
    ``GpuInfo``)."""

    index: int  # position on its worker: what a lease names
    uuid: str  # GPU-..., MIG-... or VGPU-...
    name: str
    total_bytes: int
    virtual: bool
    mig: bool
    parent_uuid: str | None
    nvml_index: int | None
    # handlers' arguments are checked against these types when they arrive (common/validation.py):
    # dict[Any, Any] is checked as a mapping only, keys and values as they come
    extra: dict[Any, Any]


class Sample(TypedDict, total=False):
    """One utilization sample of one GPU (NVML on a worker, or the broker's estimate for virtual
    GPUs)."""

    t: float
    utilization: float | None  # percent
    memory_used_bytes: int | None


class LostVariable(TypedDict, total=False):
    """A variable that could not be moved to host memory (or brought back), and why."""

    name: str
    type: str
    why: str


class OffloadResult(TypedDict):
    """What a session wrote to host memory when its lease was taken back: the session's
    ``offload`` reply, and the worker's ``gpu_session_offload`` reply to the broker."""

    path: str  # the file, on the worker that keeps it (never shown outside the pool)
    saved: list[str]
    lost: list[LostVariable]
    bytes: int
    standby: bool  # handed over from a standby copy (moving it was a rename)


# ---------------------------------------------------------------------- broker -> kernel, panel, CLI
class OffloadView(TypedDict, total=False):
    """Where an idle session's variables went when its lease was taken back (no file path: that
    stays between the broker and the workers; ``broker/model.py``'s ``Offload.view``)."""

    state: OffloadState
    worker: str
    saved: list[str]
    lost: list[LostVariable]
    bytes: int
    standby: bool  # handed over from a standby copy (moving it was a rename)
    seconds: float | None  # how long moving it took (None: adopted after a restart)


class LeaseView(TypedDict, total=False):
    """A lease as the kernel, the CLI and the panel see it (``Lease.public()`` plus the policy's
    view)."""

    id: str
    request: str
    user: str
    kernel: str
    worker: str
    gpus: list[str]  # GPU ids: "<worker>#<index>"
    gpu_indices: list[int]
    bytes: int
    fraction: float
    priority: Priority
    notebook: str | None
    cell: str | None
    rank: int
    world_size: int
    started: float
    state: LeaseState
    isolation: Isolation
    # how its processes are kept together: "cgroup v2", ..., "process group"
    containment: str | None
    host_memory_limit: int | None  # the host memory its processes may use together (bytes)
    host_memory: int  # host memory booked for it on its machine (bytes; 0: none reported there)
    cpus: float  # CPU cores booked for it on its machine (0: none reported there)
    address: str | None  # the session's comm address
    pid: int | None
    cell_started: float | None
    peak_bytes: int | None
    end_reason: str | None
    gpu_utilization: float | None
    resident_bytes: int | None
    preempted: bool
    offload: OffloadView | None
    # its worker was drained: the request whose session carries on with its variables (its
    # kernel's next cell takes that session; broker/draining.py)
    moved_to: str | None
    team: str | None
    preemptible: bool
    bytes_on_gpu: int  # in a snapshot's GPU entry: the part of the lease on that GPU
    # the broker's right-sizing hint (views.right_size_hint), None: none
    right_size: str | None
    gpu_names: list[str]  # in a granted request's status
    # in a granted request's status (its owner's only): what the session asks
    secret: str | None
    virtual: bool  # in a granted request's status


class UnknownLease(TypedDict):
    """``gpu_lease_info`` about a lease the broker has no record of (it restarted, or it never
    was)."""

    id: str
    state: Literal["unknown"]
    end_reason: str


class LiveSession(TypedDict):
    """A session a worker reports when it joins a (restarted) scheduler, for the broker to adopt."""

    lease: LeaseView  # as the broker granted it, with the session's address and pid
    client: str | None  # the owning kernel's Dask client
    busy: bool  # running a cell right now


class _ParkedCopyPlace(TypedDict, total=False):
    spilled: bool  # moved to the pool's disk folder: takes no host memory (absent: in memory)


class ParkedCopy(OffloadResult, _ParkedCopyPlace):
    """An ended session's variables a worker keeps in host memory (or, spilled, on disk),
    reported for adoption the same way."""

    lease: LeaseView
    client: str | None


class WorkerRegistered(TypedDict):
    """``gpu_register_worker``'s reply."""

    gpus: list[str]  # the GPU ids the broker gave the worker's GPUs
    refused_sessions: list[str]  # leases the broker could not adopt: the worker ends their sessions


class RestoreResult(TypedDict):
    """What an earlier session's variables became in a new session (its ``restore`` reply)."""

    restored: list[str]
    failed: list[LostVariable]


class RequestStatus(TypedDict, total=False):
    """What ``gpu_request`` and ``gpu_wait`` answer."""

    id: str | None
    state: RequestState
    reason: str
    eta: float | None  # estimated start (epoch seconds), "not before"
    eta_basis: EtaBasis | None  # what the estimate rests on (how sure it is)
    eta_note: str | None  # the same in words ("median of alice's last 12 cells: 40 s")
    request: str  # RequestSpec.describe()
    position: int | None  # queued: place in the fair order
    queue_length: int
    leases: list[LeaseView]  # granted: one per rank, with gpu_names
    # granted with ``restore``: what the new session got back (None: the copy was gone)
    restored: RestoreResult | None
    # the request's own secret, for its owner only: proof enough to withdraw it (``gpu_cancel``)
    # when the pool no longer accepts the kernel's token (a revoked JupyterHub token)
    secret: str


class CancelReply(TypedDict):
    """``gpu_cancel``'s reply (a refusal raises: ``common/refusals.py``)."""

    cancelled: Literal[True]
    what: str  # "queued request R12", "lease L3 (its session was ended)"


class ReleaseReply(TypedDict):
    """``gpu_release``'s reply."""

    released: bool  # False: the lease had ended already


class AdaptiveBounds(TypedDict):
    minimum: int  # GPU workers
    maximum: int


class DrainReport(TypedDict):
    """``gpu_drain``'s reply: what became of the sessions of the drained workers."""

    moved: list[str]  # leases whose sessions moved to other workers with their variables
    ended: list[str]  # leases ended without them (a rank of a run, a cell over the bound, no room)
    waited: float  # seconds the drain waited for running cells and moves


class ScaleReply(TypedDict, total=False):
    """``gpu_scale``'s reply: what the pool is asked to have now."""

    workers: int
    adaptive: AdaptiveBounds | None
    jobs: int  # the cluster manager's jobs (a job may start several GPU workers)
    note: str  # why some jobs stay for now (they hold sessions or host-memory copies)


class GpuView(TypedDict, total=False):
    """One GPU in a snapshot."""

    id: str
    worker: str
    host: str
    index: int
    uuid: str
    name: str
    total_bytes: int
    leased_bytes: int
    virtual: bool
    mig: bool
    utilization: float | None
    memory_used_bytes: int | None
    samples: list[Sample]
    leases: list[LeaseView]


class QueueItem(TypedDict, total=False):
    """One waiting request in a snapshot, in the policy's order."""

    id: str
    user: str
    kernel: str
    notebook: str | None
    cell: str | None
    request: str
    priority: Priority
    position: int
    reason: str  # why it waits, always set
    eta: float | None
    eta_basis: EtaBasis | None
    eta_note: str | None
    since: float


class ParkedView(TypedDict, total=False):
    """A session taken off its GPU whose variables wait in host memory for its owner's next cell."""

    id: str
    user: str
    kernel: str
    notebook: str | None
    cell: str | None
    state: OffloadState
    saved: list[str]
    lost: list[str]
    bytes: int | None
    standby: bool | None
    spilled: bool | None  # moved to disk to leave host memory to sessions
    move_seconds: float | None
    since: float | None
    reason: str | None


class HostView(TypedDict):
    """One machine of the pool in a snapshot: its workers' GPUs (the panel groups GPUs by host),
    and its host memory and cores (``broker/hosts.py``), summed over its workers."""

    host: str  # the address its workers listen on
    workers: int
    gpus: list[str]  # GPU ids, in the snapshot's order
    total_bytes: int
    leased_bytes: int
    host_memory: int | None  # bytes left to sessions (None: a worker reports none, unbounded)
    host_memory_leased: int  # booked by its leases
    host_memory_parked: int  # idle sessions' copies booked in its memory
    host_memory_spilled: int  # idle sessions' copies moved to its disk folder
    cpus: float | None  # cores left to sessions (None: not reported, unbounded)
    cpus_leased: float


class JobView(TypedDict, total=False):
    """A job (Slurm job, pod, ...) the pool's cluster manager runs or was asked for: one or more GPU
    workers."""

    # the Dask worker name it starts (its GPU workers: name, or name-gpuN)
    name: str
    # the cluster manager's id (a Slurm job id); None where it has none
    job_id: str | None
    # the cluster manager's own state (Slurm: PENDING, RUNNING, TIMEOUT...), or "submitted" /
    # "running" where it tells none
    state: str
    # the cluster manager's reason for that state (Slurm: Resources, TimeLimit)
    reason: str | None
    workers: int  # its GPU workers that have joined the pool
    since: float  # when it was asked for (epoch seconds)
    ended: float | None  # when it was seen to end (in ``ClusterView.ended``)


class AdaptiveView(AdaptiveBounds):
    # seconds a worker with no session and no host-memory copy waits to be retired
    idle: float


class ClusterView(TypedDict, total=False):
    """The cluster manager behind the Scale button: what it was asked for and its jobs, as it
    reports them."""

    # "slurm" (squeue states), "dask" (any Dask cluster class), "embedded"
    kind: str
    manager: str  # the class, e.g. dask_jobqueue.SLURMCluster
    gpus_per_job: int
    # GPU workers asked for by a fixed scale (None: adaptive or never scaled)
    target: int | None
    adaptive: AdaptiveView | None
    jobs: list[JobView]  # asked for and not ended: pending ones first
    # the latest that ended on their own (walltime, failure), newest first
    ended: list[JobView]


class PoolInfo(TypedDict, total=False):
    """The snapshot's ``pool``: what kind of pool this is and who may do what in it."""

    address: str | None
    embedded: bool
    scalable: bool  # the pool owns a cluster manager (%gpu scale works)
    cluster: ClusterView | None  # that cluster manager and its jobs (None: the pool has none)
    scale_users: list[str] | None  # who may scale (None: everyone)
    workers: int
    virtual: bool
    default_fraction: float
    shared: bool  # the pool checks tokens: several people use it
    users_isolated: bool  # every session runs as its user's account (docs/security.md)


class Viewer(TypedDict):
    """Who asked for a snapshot, as the pool's identity source says (``gpu_snapshot`` with a user
    and token): ``admin`` may see and cancel everyone's work (a JupyterHub admin, or the Hub's
    admin scope); ``error`` why the token was not accepted (then the pool-wide view only)."""

    user: str
    admin: bool
    groups: list[str]
    error: str | None


class TeamQuotaView(TypedDict):
    """A team of the quota file, with the GPUs its leases hold now."""

    team: str
    guarantee: float
    limit: float | None
    priority: int
    held: float
    members: list[str]


class UserQuotaView(TypedDict):
    """A user the quota file names or who holds GPUs now, with the team whose quota holds them."""

    user: str
    team: str
    limit: float | None
    priority: int
    held: float
    parked_bytes: int  # her idle sessions' copies booked in host memory


class QuotasView(TypedDict, total=False):
    """The snapshot's ``quotas`` (``broker/views.py``'s ``quota_view``)."""

    configured: bool  # False: a pool without a quota file
    default_team: str
    teams: list[TeamQuotaView]
    users: list[UserQuotaView]
    # the broker checks tokens (a token file's, or JupyterHub's), or trusts names
    identity: Literal["tokens", "hub", "names"]


class Caller(TypedDict, total=False):
    """Who asks, where anyone may ask (``gpu_usage``): a user name and token, both optional."""

    user: Name | None
    token: Token | None


class RunUpdate(TypedDict, total=False):
    """What a kernel says of its ``--workers`` run (``gpu_run_update``): each field it sends."""

    user: Name | None
    notebook: Text | None
    cell: Text | None
    world_size: Annotated[int, Range(1, RequestSpec.MAX_RANKS)] | None
    attempt: Count | None
    state: RunState | None
    leases: Annotated[list[Name], MaxLen(RequestSpec.MAX_RANKS)] | None  # its ranks' leases
    resumes: Name | None  # the earlier run whose checkpoints it continues


class RunView(TypedDict, total=False):
    """A ``--workers`` run as the broker keeps it for the panel (``broker/runs.py``)."""

    id: str
    user: str
    notebook: str | None
    cell: str | None
    world_size: int
    attempt: int
    state: RunState
    leases: list[str]  # its ranks' leases, as its kernel declared them
    resumes: str | None  # the earlier run whose checkpoints it continues
    started: float
    ended: float | None
    ranks: dict[str, list[MetricsItem]]  # rank -> its reports, oldest first


class Snapshot(TypedDict, total=False):
    """``gpu_snapshot``: the whole pool as ``%gpu status``, ``jupyter-gpu status`` and the panel
    show it."""

    time: float
    pool: PoolInfo
    gpus: list[GpuView]  # grouped by host (then worker, index)
    hosts: list[HostView]  # the machines, in the order their GPUs are listed
    queue: list[QueueItem]
    in_host_memory: list[ParkedView]
    quotas: QuotasView
    runs: list[RunView]  # the latest --workers runs, each rank's stream thinned to its last points
    viewer: Viewer  # only when the caller sent a user name (and token)


class UserUsage(TypedDict, total=False):
    user: str
    team: str | None
    gpu_hours: float
    leases: int
    measured: int  # leases whose peak memory was measured
    oversized: int  # ... of them, those that used under a quarter of what they reserved


class TeamUsage(TypedDict):
    team: str
    gpu_hours: float
    leases: int


class UsageReport(TypedDict):
    """``gpu_usage``: GPU-hours from the audit store (``broker/audit.py``)."""

    since: float
    until: float
    first: float | None  # the first lease recorded (None: none yet)
    users: list[UserUsage]
    teams: list[TeamUsage]
    preemptions: int
    refused: int


class UsageView(UsageReport, total=False):
    """``gpu_usage``'s reply: the report; behind JupyterHub, a user who is not an admin gets their
    own rows only (``others_hidden``)."""

    others_hidden: bool


# ---------------------------------------------------------------------- broker -> worker -> session
class Account(TypedDict):
    """The OS account a session runs as (worker -> session at ``assign``, when users are
    isolated)."""

    user: str
    uid: int
    gid: int
    groups: list[int]
    home: str


class RestoreRef(TypedDict):
    """Where an offloaded namespace waits: the worker that keeps it, the ended lease whose session
    wrote it (what that worker knows it by), and the file there (broker -> worker)."""

    worker: str
    path: str
    lease: str


class StandbyPlan(TypedDict):
    """Where (and after how long idle) a session writes its standby copy (worker -> session at
    ``assign``)."""

    path: str
    after: float


class SessionStarted(TypedDict):
    """``gpu_session_start``'s reply: where the session answers and how it is contained."""

    address: str
    pid: int
    isolation: Isolation
    restored: RestoreResult | None  # with ``restore``: what came back (None: nothing could)
    as_user: bool  # the session runs as its user's account
    containment: str  # "cgroup v2", "rlimit", "process group"
    host_memory_limit: int | None


class FetchedOffload(TypedDict):
    """``gpu_offload_fetch``'s reply: an offloaded namespace, for the worker of its new session."""

    data: bytes


class StarterInfo(TypedDict, total=False):
    """``gpu_session_starter``: how a worker starts sessions, and whether a start is warm now."""

    kind: Literal["fork", "spare"]  # its zygote, or a spare process
    ready: bool
    worker_pid: int
    pid: int | None  # the zygote's
    sessions: int  # sessions forked by the zygote and alive


class AssignReply(TypedDict):
    """``assign``'s reply: the session took the lease."""

    isolation: Isolation
    pid: int


# ---------------------------------------------------------------------- worker <-> zygote
# JSON datagrams on the SOCK_SEQPACKET socket between a worker's forkserver and its zygote
# (worker/forkserver.py, session/zygote.py)
class _ForkFields(TypedDict):
    op: Literal["fork"]
    id: int
    env: dict[str, str]  # the session's whole environment (the launcher's zygote: its settings)
    host: str
    worker: str


class ForkRequest(_ForkFields, total=False):
    """Parent -> zygote: fork a session (three descriptors travel with it: the session's end of its
    private socket to the worker, the pipe on which the child announces its address, the pipe its
    log goes to)."""

    confine: Any  # the launcher's zygote: launcher/confine.py's Confinement for this child


class ZygoteReady(TypedDict):
    op: Literal["ready"]
    pid: int


class Forked(TypedDict):
    op: Literal["forked"]
    id: int
    pid: int


class ForkFailed(TypedDict):
    op: Literal["failed"]
    id: int | None
    error: str


class ChildExited(TypedDict):
    """A session the zygote forked ended: ``code`` is its exit code, or minus the signal."""

    op: Literal["exited"]
    pid: int
    code: int


ZygoteMessage = ZygoteReady | Forked | ForkFailed | ChildExited


# ---------------------------------------------------------------------- worker <-> launcher
# JSON messages on the SOCK_SEQPACKET connection between a worker (the pool's service account) and
# the privileged launcher of its machine (launcher/server.py, worker/launcher_link.py). Every
# request has an ``op`` and an ``id``; the reply carries the same ``id``. A lease a request names
# must be one this connection started.
class LaunchHello(TypedDict):
    """The worker names itself (its Dask address) before anything else: grants name it too."""

    op: Literal["hello"]
    id: int
    worker: Address


class LaunchStart(TypedDict):
    """Start a session for a lease the broker granted (three descriptors travel with it: the
    session's end of its private socket to the worker, the write end of the pipe on which it
    announces its address, the write end of the pipe its log goes to)."""

    op: Literal["start"]
    id: int
    lease: Name
    grant: Text  # signed by the broker (common/grants.py)
    host: Name  # where the session listens
    env: Annotated[
        dict[Name, Text], MaxLen(256)
    ]  # its Dask settings (launcher/confine.py keeps some)


class LaunchSignal(TypedDict):
    op: Literal["signal"]
    id: int
    lease: Name
    signal: Literal["interrupt", "kill"]


class LaunchEnd(TypedDict):
    """The session is over: its group is killed and removed, and its folder too unless its
    variables are parked there (``keep_folder``)."""

    op: Literal["end"]
    id: int
    lease: Name
    keep_folder: bool


class LaunchCopy(TypedDict, total=False):
    """A session's variables in host memory: ``move_copy`` (a parked copy of ``lease`` into the
    folder of ``to_lease``, the same user's), ``open_copy`` (a descriptor to read it, to send it to
    another machine), ``create_copy`` (a descriptor to write one fetched from another machine into
    ``lease``'s folder), ``spill_copy`` (move a parked copy to the launcher's disk folder, where
    the others find it), ``forget_copy`` (remove a parked folder)."""

    op: Literal["move_copy", "open_copy", "create_copy", "spill_copy", "forget_copy"]
    id: int
    lease: Name
    to_lease: Name


LAUNCHER_REQUESTS: Final[dict[str, type]] = {
    "hello": LaunchHello,
    "start": LaunchStart,
    "signal": LaunchSignal,
    "end": LaunchEnd,
    "move_copy": LaunchCopy,
    "open_copy": LaunchCopy,
    "create_copy": LaunchCopy,
    "spill_copy": LaunchCopy,
    "forget_copy": LaunchCopy,
}


class LauncherReply(TypedDict, total=False):
    """The launcher's answer to request ``id``: ``error`` (why not), or what it did. A descriptor
    travels with the reply to ``open_copy`` and ``create_copy``."""

    id: int
    error: str
    pid: int  # start: the session's
    folder: str  # start: its host-memory folder (bound at the same path in its namespace)
    containment: str  # start: "cgroup v2", "cgroup v2 + v1 memory", ...
    host_memory_limit: int | None
    cpu_quota: int | None  # start: its cpu.max, microseconds per 100 ms (None: no CPU limit)
    pids_limit: int | None
    path: str  # move_copy / create_copy: the copy's path in the session's folder
    bytes: int  # spill_copy: the bytes moved to disk


class LauncherEvent(TypedDict):
    """Launcher -> worker, unasked: a session of this connection exited (``code``: its exit code, or
    minus the signal; ``oom``: its cgroup counted an out-of-memory kill after its usage reached its
    own limit; ``peak``, ``limit``: its
    host memory's peak and limit as its cgroup counted them, None where it has none)."""

    event: Literal["exited"]
    lease: str
    pid: int
    code: int
    oom: bool
    peak: int | None
    limit: int | None


# ---------------------------------------------------------------------- session -> worker -> broker
# JSON lines on a session's private socket to its worker (session/worker_link.py); the worker checks
# each field against these types (worker/relay.py), names the lease itself and forwards them to the
# broker's gpu_lease_state / gpu_run_metrics, which check them again
class MetricsItem(TypedDict, total=False):
    """One ``report()`` of a --workers rank, as the session batches it to the broker
    (``gpu_run_metrics``)."""

    step: int | None
    time: float
    # scalars; the broker keeps numbers, text and null (NaN becomes "nan")
    metrics: dict[str, Any]


class _LeaseStateFields(TypedDict):
    state: Literal["running", "idle"]


class LeaseStateReport(_LeaseStateFields, total=False):
    """A session's cell started (``running``), how far it is (``running`` with ``step`` of
    ``total``) or that it ended (``idle``, with what it measured)."""

    cell: Text | None  # the cell's label
    peak_bytes: Bytes | None
    gpu_utilization: Percent | None
    resident_bytes: Bytes | None  # what the session holds now (what suspending it would move)
    step: Steps | None
    total: Steps | None


class RunMetricsReport(TypedDict):
    """A ``--workers`` rank's ``jupyter_gpu.report()`` calls, batched."""

    run: Name
    rank: Annotated[int, Range(0, RequestSpec.MAX_RANKS)]
    items: Annotated[list[MetricsItem], MaxLen(100_000)]


# what a session may report, by op (nothing else is passed on)
SESSION_REPORTS: Final[dict[str, type]] = {
    "lease_state": LeaseStateReport,
    "run_metrics": RunMetricsReport,
}


# ---------------------------------------------------------------------- kernel <-> session
class _CellFields(TypedDict):
    code: Annotated[str, MaxLen(64 * 2**20)]
    # name -> Serialized (Dask frames; modules as ModuleRef) or, on the same machine and account, a
    # pipe marker (common/local_transfer.py)
    inputs: dict[str, Any]


class CellPayload(_CellFields, total=False):
    """The ``execute`` call of a session (its keyword arguments besides the secret): one cell."""

    # names to send back (plain data comes back, the rest stays remote)
    outputs: Annotated[list[Name], MaxLen(100_000)] | None
    exact_outputs: bool  # --out given: bring back exactly these, whatever they are
    cell_name: Text  # "<%%gpu cell In[n]>": the file name of the cell's code
    label: Text | None  # for the panel and the queue
    max_bytes: Bytes  # larger values stay remote
    cwd: Text | None  # the kernel's working directory
    # --workers: rank, world_size, master_addr/port, run, attempt, ...
    dist: dict[str, Any] | None
    checkpoint_dir: Text | None  # where jupyter_gpu.checkpoint() writes for this cell
    local: bool  # send large outputs back through pipes (the probe passed)


class StreamMsg(TypedDict):
    op: Literal["stream"]
    name: Literal["stdout", "stderr"]
    text: str


class DisplayMsg(TypedDict, total=False):
    op: Literal["display"]
    data: dict[str, Any]
    metadata: dict[str, Any]
    transient: dict[str, Any]
    update: bool


class ClearMsg(TypedDict):
    op: Literal["clear"]
    wait: bool


class MetricsMsg(TypedDict):
    """``jupyter_gpu.report(step=..., **metrics)`` inside a cell."""

    op: Literal["metrics"]
    rank: int
    step: int | None
    time: float
    metrics: dict[str, Any]


# what a running cell streams to its kernel, in batches (lists), before the ``ExecuteReply``
OutputMsg = StreamMsg | DisplayMsg | ClearMsg | MetricsMsg


class ErrorPayload(TypedDict, total=False):
    """A remote exception (``session/tracebacks.py``), rebuilt in the kernel."""

    type: str  # module.qualname
    message: str
    pickled: bytes | None
    traceback: dict[str, Any] | None  # tblib
    text: str
    cell: str | None


def pool_error(message: str) -> ErrorPayload:
    """An error about the pool, not the user's code, as the kernel rebuilds it (a
    ``GpuPoolError``): the session's, and the kernel's own for a cell its session refused."""
    return {
        "type": "jupyter_gpu.errors.GpuPoolError",
        "pickled": None,
        "traceback": None,
        "message": message,
        "text": "",
    }


class OutputItem(TypedDict, total=False):
    """One name a cell sends back: its value (``kind: value``), or what stays remote and why
    (``common/datacontract.py``'s ``classify_output``)."""

    kind: Literal["value", "remote"]
    data: Any  # value: Serialized, or a pipe marker (common/local_transfer.py)
    name: str  # remote: what it is, where it lives, why it stays there
    type_name: str
    summary: str
    nbytes: int | None
    device: str | None
    reason: str
    lease: str | None


class LastValue(TypedDict):
    """The cell's last expression: its display bundle, and its value when it may come back."""

    bundle: dict[str, Any]
    value: Any


class ExecuteReply(TypedDict, total=False):
    """The final message of ``execute`` (the session's; the kernel's own outcomes of a rank, a lost
    session or one it killed, are ``kernelext/rank_runner.py``'s ``LostRank`` and ``KilledRank``)."""

    # retired: the session's variables were just moved to host memory; it runs no more cells
    status: Literal["ok", "error", "retired"]
    elapsed: float
    finished: float
    peak_bytes: int | None
    gpu_utilization: float | None
    execution_count: int
    error: ErrorPayload
    outputs: dict[str, OutputItem]
    result: LastValue | None
    timed_out: bool  # added by the kernel: the cell failed after --timeout interrupted it


class PingReply(TypedDict, total=False):
    """``ping``: the session is alive; with a probe, whether the kernel's pipes can be read."""

    pid: int
    busy: bool
    lease: str | None
    probe_ok: bool
    probe: dict[str, Any]  # the session's own probe, for the kernel to read


class InterruptReply(TypedDict, total=False):
    interrupted: bool  # False: no cell was running or on its way
    before_start: bool  # the cell had not reached the main thread: it will not start


class PullReply(TypedDict):
    data: Any  # Serialized, or a pipe marker


class FreePort(TypedDict):
    host: str
    port: int
