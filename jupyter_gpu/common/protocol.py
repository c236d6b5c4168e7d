"""The wire protocol: every message that crosses a process boundary, and every handler table.

Four kinds of process talk to each other (``docs/architecture.md``): the notebook kernel, the
Dask scheduler with the broker, the Dask worker with the GPU plugin, and the session process
where cells run. The JupyterLab server extension and the CLI read the pool like a kernel does.
This module declares, in one place:

- the environment variables that configure a kernel or a worker (the user contract, DESIGN section 2);
- the value sets of states and options, as ``Literal`` types;
- the request a ``%%gpu`` cell sends (``RequestSpec``, the one message with behaviour: it validates itself
  with the error the notebook user reads, in the kernel before anything waits and again in the broker);
- the shapes of the other messages as ``TypedDict``s (what a field holds is in its comment);
- the handler tables of the three servers (``SCHEDULER_HANDLERS``, ``WORKER_HANDLERS``,
  ``SESSION_HANDLERS``): each op, who may call it and what it does. Each server registers exactly these ops
  (``broker/plugin.py``, ``worker/plugin.py``, ``session/server.py``), the tests pin them, and
  ``docs/interfaces.md`` is generated from them (``python -m jupyter_gpu.common.protocol``).

Nothing here imports Dask or any process's code, so every side can import it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, Literal, NamedTuple, TypedDict, cast

from jupyter_gpu.common.units import format_bytes

# ---------------------------------------------------------------------- environment (the user contract)
SCHEDULER_ENV: Final = "JUPYTER_GPU_SCHEDULER"  # the pool a kernel joins (else the embedded pool)
USER_ENV: Final = "JUPYTER_GPU_USER"  # who a kernel acts for (else the login name)
TOKEN_ENV: Final = "JUPYTER_GPU_TOKEN"  # that user's token, for pools with a token file
# e.g. 2x16GiB: virtual GPUs for machines without one
VIRTUAL_ENV: Final = "JUPYTER_GPU_VIRTUAL_GPUS"
# worker-internal: which of the machine's GPUs a worker owns
DEVICES_ENV: Final = "JUPYTER_GPU_DEVICES"
# worker -> session: the key its first ``assign`` must carry
SPAWN_KEY_ENV: Final = "JUPYTER_GPU_SESSION_KEY"
# nanny -> its worker: the key to ask the nanny to close
NANNY_KEY_ENV: Final = "JUPYTER_GPU_NANNY_KEY"
# where a GPU worker shows the pool key when it registers
STARTUP_KEY: Final = "jupyter-gpu-pool-key"

# ---------------------------------------------------------------------- value sets
Priority = Literal["interactive", "batch"]
PRIORITIES: Final[tuple[Priority, ...]] = ("interactive", "batch")
RequestState = Literal["queued", "starting", "granted", "refused", "cancelled", "failed", "unknown"]
LeaseState = Literal["starting", "idle", "running", "ended"]
Isolation = Literal["none", "torch-cap", "mps", "mig"]
OffloadState = Literal["pending", "saved"]
RunState = Literal["running", "done", "failed", "stopped"]
# what an estimated start rests on: the running cells' reported progress, idle sessions moving to
# host memory for it, or how long recent leases lasted (a rough guess)
EtaBasis = Literal["progress", "idle", "history"]
Caller = Literal["kernel", "session", "worker", "broker", "anyone"]


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
    """One GPU a worker offers (``gpu_register_worker``'s ``gpus``; ``worker/inventory.py``'s
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


# ---------------------------------------------------------------------- broker -> kernel, panel, CLI
class OffloadView(TypedDict, total=False):
    """Where an idle session's variables went when its lease was taken back (no file path: that
    stays between the broker and the workers)."""

    state: OffloadState
    worker: str
    saved: list[str]
    lost: list[dict[Any, Any]]  # [{"name", "type", "why"}]
    bytes: int
    standby: bool  # handed over from a standby copy (moving it was a rename)
    seconds: float


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
    team: str | None
    preemptible: bool
    bytes_on_gpu: int  # in a snapshot's GPU entry: the part of the lease on that GPU
    # the broker's right-sizing hint (views.right_size_hint), None: none
    right_size: str | None
    gpu_names: list[str]  # in a granted request's status
    # in a granted request's status (its owner's only): what the session asks
    secret: str | None
    virtual: bool  # in a granted request's status


class LiveSession(TypedDict):
    """A session a worker reports when it joins a (restarted) scheduler, for the broker to adopt."""

    lease: LeaseView  # as the broker granted it, with the session's address and pid
    client: str | None  # the owning kernel's Dask client
    busy: bool  # running a cell right now


class ParkedCopy(TypedDict):
    """An ended session's variables a worker keeps in host memory, reported for adoption the same
    way."""

    lease: LeaseView
    client: str | None
    path: str
    saved: list[str]
    lost: list[dict[Any, Any]]  # as OffloadView.lost
    bytes: int
    standby: bool


class RequestStatus(TypedDict, total=False):
    """What ``gpu_request`` and ``gpu_wait`` answer."""

    id: str | None
    state: RequestState
    reason: str
    eta: float | None  # estimated start (epoch seconds), "not before"
    eta_basis: EtaBasis | None  # what the estimate rests on (how sure it is)
    request: str  # RequestSpec.describe()
    position: int | None  # queued: place in the fair order
    queue_length: int
    leases: list[LeaseView]  # granted: one per rank, with gpu_names
    # granted with ``restore``: {"restored": [names], "failed": [...]}
    restored: dict[str, Any] | None


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
    move_seconds: float | None
    since: float | None
    reason: str | None


class HostView(TypedDict):
    """One machine of the pool in a snapshot: its workers' GPUs (the panel groups GPUs by host)."""

    host: str  # the address its workers listen on
    workers: int
    gpus: list[str]  # GPU ids, in the snapshot's order
    total_bytes: int
    leased_bytes: int


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


class AdaptiveView(TypedDict):
    minimum: int  # GPU workers
    maximum: int
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


class Snapshot(TypedDict, total=False):
    """``gpu_snapshot``: the whole pool as ``%gpu status``, ``jupyter-gpu status`` and the panel
    show it."""

    time: float
    pool: PoolInfo
    gpus: list[GpuView]  # grouped by host (then worker, index)
    hosts: list[HostView]  # the machines, in the order their GPUs are listed
    queue: list[QueueItem]
    in_host_memory: list[ParkedView]
    quotas: dict[str, Any]  # {"configured", "teams", "users", "identity", "default_team"}
    # the latest --workers runs: {"id", "ranks": {rank: [metrics]}, ...}
    runs: list[dict[str, Any]]


class Account(TypedDict):
    """The OS account a session runs as (worker -> session at ``assign``, when users are
    isolated)."""

    user: str
    uid: int
    gid: int
    groups: list[int]
    home: str


class RestoreRef(TypedDict):
    """Where an offloaded namespace waits: the worker that keeps it and the file there (broker ->
    worker)."""

    worker: str
    path: str


class StandbyPlan(TypedDict):
    """Where (and after how long idle) a session writes its standby copy (worker -> session at
    ``assign``)."""

    path: str
    after: float


# ---------------------------------------------------------------------- kernel <-> session
class CellPayload(TypedDict, total=False):
    """The ``execute`` call of a session (its keyword arguments): one cell to run."""

    code: str
    # name -> Serialized (Dask frames; modules as ModuleRef) or, on the same machine and account, a
    # pipe marker (common/local_transfer.py)
    inputs: dict[str, Any]
    # names to send back (plain data comes back, the rest stays remote)
    outputs: list[str]
    exact_outputs: bool  # --out given: bring back exactly these, whatever they are
    cell_name: str  # "<%%gpu cell In[n]>": the file name of the cell's code
    label: str | None  # for the panel and the queue
    max_bytes: int  # larger values stay remote
    cwd: str | None  # the kernel's working directory
    # --workers: rank, world_size, master_addr/port, run, attempt, ...
    dist: dict[str, Any] | None
    checkpoint_dir: str | None  # where jupyter_gpu.checkpoint() writes for this cell
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


class MetricsItem(TypedDict, total=False):
    """One ``report()`` of a --workers rank, as the session batches it to the broker
    (``gpu_run_metrics``)."""

    step: int | None
    time: float
    # scalars; the broker keeps numbers, text and null (NaN becomes "nan")
    metrics: dict[str, Any]


class MetricsMsg(TypedDict):
    """``jupyter_gpu.report(step=..., **metrics)`` inside a cell."""

    op: Literal["metrics"]
    rank: int
    step: int | None
    time: float
    metrics: dict[str, Any]


OutputMsg = StreamMsg | DisplayMsg | ClearMsg | MetricsMsg


class ErrorPayload(TypedDict, total=False):
    """A remote exception (``session/tracebacks.py``), rebuilt in the kernel."""

    type: str  # module.qualname
    message: str
    pickled: bytes | None
    traceback: dict[str, Any] | None  # tblib
    text: str
    cell: str | None


class ExecuteReply(TypedDict, total=False):
    """The final message of ``execute``."""

    status: Literal["ok", "error", "retired"]
    elapsed: float
    finished: float
    peak_bytes: int | None
    gpu_utilization: float | None
    execution_count: int
    error: ErrorPayload
    outputs: dict[
        str, dict[str, Any]
    ]  # name -> {"kind": "value", "data"} | {"kind": "remote", ...}
    result: dict[str, Any] | None  # the last expression: {"bundle", "value"}


# ---------------------------------------------------------------------- handler tables
class Op(NamedTuple):
    """One handler: who may call it, its arguments and reply, and what it is for."""

    caller: Caller
    arguments: str
    returns: str
    doc: str


SCHEDULER_HANDLERS: Final[dict[str, Op]] = {
    "gpu_register_worker": Op(
        "worker",
        "worker, gpus: list[GpuInfoMsg], sessions?: list[LiveSession], "
        "parked?: list[ParkedCopy], start_slots?: int",
        "{gpus: [GPU id], refused_sessions: [lease id]}",
        "a worker's GPU plugin offers its GPUs (replacing any earlier offer); after a "
        "scheduler restart, with the sessions and parked variables it keeps, to adopt",
    ),
    "gpu_samples": Op(
        "worker",
        "worker, samples: {index: Sample}",
        "-",
        "NVML utilization samples from a worker's sampling thread",
    ),
    "gpu_session_ended": Op(
        "worker",
        "lease, reason",
        "-",
        "the worker saw a session process exit (crash, OOM kill, exit)",
    ),
    "gpu_lease_state": Op(
        "session",
        "lease, state, cell?, peak_bytes?, gpu_utilization?, resident_bytes?",
        "-",
        "a session's cell started (running) or ended (idle, with its peak and what it holds)",
    ),
    "gpu_run_metrics": Op(
        "session",
        "run, rank, items: [metrics]",
        "-",
        "a --workers rank's jupyter_gpu.report() metrics, batched, for the panel",
    ),
    "gpu_request": Op(
        "kernel",
        "user, kernel, spec: RequestSpec, client?, notebook?, cell?, token?, restore?",
        "RequestStatus",
        "queue a request for GPU memory; granted at once if it fits, refused "
        "at once if it never can",
    ),
    "gpu_wait": Op(
        "kernel",
        "id, timeout",
        "RequestStatus",
        "long-poll a request until it leaves queued/starting, or the timeout",
    ),
    "gpu_cancel": Op(
        "kernel",
        "id, user, token?",
        "{cancelled: bool, what: str}",
        "cancel my queued request, or end my lease (its session is killed)",
    ),
    "gpu_release": Op(
        "kernel",
        "lease, user, reason?, token?",
        "{released: bool, error?}",
        "end my lease now (%gpu release, --fresh cells, --workers runs)",
    ),
    "gpu_lease_info": Op(
        "kernel",
        "lease",
        "LeaseView",
        "a lease, live or ended (with why it ended and where its variables went)",
    ),
    "gpu_run_update": Op(
        "kernel",
        "run, ...fields",
        "-",
        "how a --workers run stands (ranks, state, attempt), for the panel",
    ),
    "gpu_scale": Op(
        "kernel",
        "n | minimum, maximum, user, token?",
        "{workers, adaptive, jobs?, note?} | {error}",
        "grow or shrink a pool that owns a cluster manager (jupyter-gpu.scale-users may): jobs are "
        "submitted and cancelled; a worker holding a session or a host-memory copy is never retired",
    ),
    "gpu_snapshot": Op(
        "anyone", "-", "Snapshot", "the whole pool: GPUs, leases, queue, quotas, runs"
    ),
    "gpu_usage": Op("anyone", "since", "usage", "GPU-hours per user and team from the audit store"),
}

WORKER_HANDLERS: Final[dict[str, Op]] = {
    "gpu_session_start": Op(
        "broker",
        "lease: LeaseView, scheduler, restore?: {worker, path}, client?",
        "{address, pid, isolation, restored} | {error}",
        "give a (pre-warmed) session process the lease: pinned, capped, restored",
    ),
    "gpu_session_signal": Op(
        "broker",
        'lease, signal: "interrupt" | "kill"',
        "{ok}",
        "interrupt or kill a lease's session",
    ),
    "gpu_session_offload": Op(
        "broker",
        "lease, timeout",
        "{path, saved, lost, bytes, standby?} | {error}",
        "move a session's variables to host memory (its lease is being taken back)",
    ),
    "gpu_offload_fetch": Op(
        "worker",
        "path",
        "{data: bytes} | {error}",
        "hand an offloaded namespace to the worker where its owner's next session starts",
    ),
    "gpu_offload_discard": Op(
        "broker", "path", "{ok}", "forget an offloaded namespace nobody will restore"
    ),
    "gpu_inventory": Op("anyone", "-", "[GpuInfoMsg]", "the GPUs this worker owns"),
    "gpu_session_starter": Op(
        "anyone",
        "-",
        "{kind: fork | spare, ready, worker_pid, pid?, sessions?}",
        "how this worker starts sessions (its zygote, or a spare) and whether one is warm",
    ),
}

SESSION_HANDLERS: Final[dict[str, Op]] = {
    "assign": Op(
        "worker",
        "lease, gpus, scheduler?, env?, standby?: {path, after}",
        "{isolation, pid} | {error}",
        "take a lease: pin the GPU, cap memory, start measuring",
    ),
    "execute": Op(
        "kernel",
        "CellPayload (streams OutputMsg batches)",
        "ExecuteReply",
        "run one cell in the session's namespace, streaming its output",
    ),
    "interrupt": Op("kernel", "-", "{interrupted: bool}", "SIGINT to the running cell"),
    "pull": Op(
        "kernel", "name, local?", "{data} | {error}", "a copy of one variable (moved to CPU)"
    ),
    "ping": Op(
        "kernel",
        "probe?: pipe marker",
        "{pid, busy, lease, probe_ok?, probe?}",
        "is the session alive, and busy; with a probe, can the two read each other's pipes",
    ),
    "free_port": Op(
        "kernel", "-", "{host, port}", "a free port on this host for a --workers rendezvous"
    ),
    "offload": Op(
        "worker",
        "path",
        "{path, saved, lost, bytes}",
        "write the variables to host memory; the session runs no more cells",
    ),
    "restore": Op(
        "worker",
        "path",
        "{restored: [names], failed: [...]}",
        "load an earlier session's offloaded variables into this one",
    ),
}

SCHEDULER_OPS: Final = frozenset(SCHEDULER_HANDLERS)
WORKER_OPS: Final = frozenset(WORKER_HANDLERS)
SESSION_OPS: Final = frozenset(SESSION_HANDLERS)


def handler_tables_markdown() -> str:
    """The three handler tables as Markdown (the generated part of ``docs/interfaces.md``)."""
    out = []
    for title, table in (
        ("Scheduler handlers (the broker, `broker/plugin.py`)", SCHEDULER_HANDLERS),
        ("Worker handlers (the GPU worker plugin, `worker/plugin.py`)", WORKER_HANDLERS),
        ("Session handlers (the session process, `session/server.py`)", SESSION_HANDLERS),
    ):
        out += [
            f"### {title}",
            "",
            "| handler | caller | arguments | returns | what it does |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, op in sorted(table.items()):
            cells = [f"`{name}`", op.caller, op.arguments, op.returns, op.doc]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


GENERATED_BEGIN: Final = "<!-- BEGIN GENERATED: python -m jupyter_gpu.common.protocol -->"
GENERATED_END: Final = "<!-- END GENERATED -->"


def render_interfaces(doc: str) -> str:
    """``doc`` (docs/interfaces.md) with its generated section replaced by the current tables."""
    head, _, rest = doc.partition(GENERATED_BEGIN)
    _, _, tail = rest.partition(GENERATED_END)
    return f"{head}{GENERATED_BEGIN}\n\n{handler_tables_markdown()}\n{GENERATED_END}{tail}"


if __name__ == "__main__":  # regenerate docs/interfaces.md's tables in place
    path = sys.argv[1] if len(sys.argv) > 1 else "docs/interfaces.md"
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(render_interfaces(text))
