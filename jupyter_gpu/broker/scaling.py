"""Growing and shrinking a pool through the cluster manager it owns: the broker's ``scaler``.

It runs inside the scheduler, next to the broker, and reads the broker's ``Ledger`` through narrow
queries only (``largest_gpu_bytes``, ``busy_workers``, ``queued``, ``note_end_on``): what is held
where, what waits. The cluster's jobs and what the cluster manager says about them are
``ClusterJobs``; the targets and the adaptive loop are ``PoolScaler``.

A pool that owns a Dask cluster manager (the embedded pool's ``SpecCluster``, or ``jupyter-gpu
pool up`` with ``jupyter-gpu.cluster-manager``: dask-jobqueue's ``SLURMCluster`` and the like)
grows and shrinks by its
**jobs**: a job is one entry of the cluster's worker spec (a Slurm job, a local Nanny) and starts
``per_job`` GPU workers. Counts given by users (``%gpu scale N``, the panel's Scale dialog) are
GPU workers.

- **Manual** (``n``): the pool keeps ``n`` workers. Jobs are submitted at once; surplus ones are retired at
  once when they hold nothing (pending jobs first), the others as soon as they do; a job that ends by
  itself (Slurm's walltime, a node failure) is replaced.
- **Adaptive** (``minimum``, ``maximum``): driven by the broker, not by Dask's task load (GPU pools run no
  tasks): a job is submitted for requests that have waited one interval and that the jobs already on their
  way do not cover; a job is retired only when nothing waits, once its workers have held no session and no
  host-memory copy for ``idle`` seconds, and not within ``cooldown`` seconds of the last growth, one job per
  interval. That hysteresis is what keeps the pauses between interactive cells (a session stays leased while
  its notebook thinks) from cancelling a job that the next cell would submit again (dask-jobqueue's
  ``adapt()`` does that, dask/dask-jobqueue#701).
- **Never** is a worker retired while it holds a session (a live lease) or a session's variables in host
  memory (an ended lease whose offload is saved or being written there): the broker knows both.

What the cluster manager says about each job (Slurm's ``squeue`` state and reason, through
``states``) is polled every ``interval`` and shown in the snapshot (``ClusterView``) and in the
queue's reasons (:meth:`PoolScaler.waiting_note`: ``waiting for a new worker (job 123
pending)``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import GpuSlot
from jupyter_gpu.common.protocol import AdaptiveView, ClusterView, JobView, ScaleReply
from jupyter_gpu.common.refusals import Malformed, NotPossible

if TYPE_CHECKING:
    from distributed import Scheduler

log = logging.getLogger(__name__)

ENDED_KEPT = 10  # jobs that ended by themselves, shown in the snapshot
_GPU_SUFFIX = re.compile(r"^(.*)-gpu\d+$")


class JobStates(Protocol):
    """What a cluster manager says about its jobs (``pool/slurm.py``'s ``SlurmStates``)."""

    kind: str

    async def poll(self, job_ids: list[str]) -> dict[str, tuple[str, str | None]]: ...

    @staticmethod
    def ended(state: str | None) -> bool: ...

    @staticmethod
    def describe(state: str, reason: str | None) -> str: ...


@dataclass
class JobRecord:
    """What the scaler knows of one job beyond the cluster's spec."""

    name: str
    since: float = field(default_factory=time.time)  # when it was asked for (epoch)
    asked: float = field(default_factory=time.monotonic)
    # the cluster manager's word (PENDING, RUNNING...)
    state: str | None = None
    reason: str | None = None
    seen: bool = False  # the cluster manager has reported it
    workers: set[str] = field(default_factory=set)  # addresses of its workers that joined


class ClusterJobs:
    """The jobs of a started ``SpecCluster`` (one entry of its worker spec each), their workers in
    the scheduler, and what its cluster manager (``states``; None: it tells none) says of them."""

    def __init__(
        self, cluster: Any, scheduler: Scheduler, ledger: Ledger, states: JobStates | None
    ) -> None:
        self.cluster, self.scheduler, self.ledger, self.states = cluster, scheduler, ledger, states
        self.records: dict[str, JobRecord] = {
            name: JobRecord(str(name)) for name in cluster.worker_spec
        }
        self.ended: collections.deque[JobView] = collections.deque(maxlen=ENDED_KEPT)
        # worker address -> job name (kept after the worker left)
        self.worker_job: dict[str, str] = {}

    def names(self) -> list[str]:
        return [str(n) for n in self.cluster.worker_spec]

    def record(self, name: str) -> JobRecord:
        return self.records.setdefault(name, JobRecord(name))

    def job_id(self, name: str) -> str | None:
        job = self.cluster.workers.get(name)
        value = getattr(job, "job_id", None)
        return str(value) if value is not None else None

    def label(self, name: str) -> str:
        return f"job {self.job_id(name) or name}"

    def job_of(self, worker_name: str) -> str | None:
        spec = set(self.names())
        if worker_name in spec:
            return worker_name
        m = _GPU_SUFFIX.match(worker_name)
        return m.group(1) if m and m.group(1) in spec else None

    def joined(self) -> dict[str, list[str]]:
        """Job name -> addresses of its workers connected to the scheduler now."""
        joined: dict[str, list[str]] = {}
        for addr, ws in self.scheduler.workers.items():
            job = self.job_of(str(ws.name))
            if job is not None:
                joined.setdefault(job, []).append(addr)
                self.worker_job[addr] = job
                self.record(job).workers.add(addr)
        return joined

    def pending(self) -> list[str]:
        """Jobs asked for whose workers have not joined yet, oldest first."""
        joined = self.joined()
        waiting = [n for n in self.names() if not joined.get(n)]
        return sorted(waiting, key=lambda n: self.records.get(n, JobRecord(n)).asked)

    def waiting_note(self) -> str | None:
        """For the reasons of waiting requests: ``waiting for a new worker (job 123 pending)``, with
        what the cluster manager says about that job; None when no job is on its way."""
        pending = self.pending()
        if not pending:
            return None
        ids = [self.job_id(n) or n for n in pending]
        what = f"job {ids[0]}" if len(ids) == 1 else f"jobs {', '.join(ids)}"
        note = f"waiting for a new worker ({what} pending)"
        rec = self.records.get(pending[0])
        if rec is not None and rec.state and self.states is not None:
            note += f", {self.states.kind.capitalize()}: "
            note += self.states.describe(rec.state, rec.reason)
        return note

    def lost_note(self, worker: str) -> str | None:
        """What the cluster manager adds to "the worker was lost": the job it ran in (and how it
        ended)."""
        self.joined()
        name = self.worker_job.get(worker)
        if name is None or self.states is None:
            return None
        rec = self.records.get(name)
        note = f"it ran in {self.states.kind.capitalize()} {self.label(name)}"
        if rec is not None and rec.state and self.states.ended(rec.state):
            note += f", which ended: {self.states.describe(rec.state, rec.reason)}"
        return note

    def views(self) -> list[JobView]:
        joined = self.joined()
        jobs: list[JobView] = []
        for name in self.names():
            rec = self.record(name)
            jobs.append(
                {
                    "name": name,
                    "job_id": self.job_id(name),
                    "state": rec.state or ("running" if joined.get(name) else "submitted"),
                    "reason": rec.reason,
                    "workers": len(joined.get(name, [])),
                    "since": rec.since,
                    "ended": None,
                }
            )
        jobs.sort(key=lambda j: (j["workers"] > 0, j["since"]))
        return jobs

    async def read_states(self) -> list[str]:
        """Read the cluster manager's job states; returns the jobs it says ended (or forgot)."""
        if self.states is None:
            return []
        ids = {n: j for n in self.names() if (j := self.job_id(n))}
        if not ids:
            return []
        try:
            states = await self.states.poll(list(ids.values()))
        except Exception as exc:  # noqa: BLE001 - keep what we knew; say so once in a while
            log.warning("could not read the job states: %s", exc)
            return []
        ended = []
        for name, job_id in ids.items():
            rec = self.record(name)
            if job_id in states:
                rec.state, rec.reason = states[job_id]
                rec.seen = True
                if self.states.ended(rec.state):
                    ended.append(name)
            elif rec.seen:  # gone from the cluster manager's memory: it ended a while ago
                if not self.states.ended(rec.state):
                    rec.state = "ENDED"
                ended.append(name)
        return ended

    async def job_ended(self, name: str) -> None:
        """A job ended by itself (walltime, node failure, cancelled outside the pool): forget it,
        keep it in ``ended`` for the panel, and add how it ended to the end reasons of the sessions
        it held."""
        assert self.states is not None  # only a cluster manager that tells states says so
        rec = self.records.pop(name, JobRecord(name))
        job_id = self.job_id(name)
        how = self.states.describe(rec.state or "ENDED", rec.reason)
        log.warning(
            "%s (%s) ended: %s; its workers and their sessions are lost",
            self.label(name),
            name,
            how,
        )
        self.ended.appendleft(
            {
                "name": name,
                "job_id": job_id,
                "state": rec.state or "ENDED",
                "reason": rec.reason,
                "workers": 0,
                "since": rec.since,
                "ended": time.time(),
            }
        )
        self.scheduler.log_event(
            "jupyter-gpu-audit",
            {
                "action": "job ended",
                "job": job_id,
                "name": name,
                "state": rec.state,
                "reason": rec.reason,
            },
        )
        self.ledger.note_end_on(rec.workers, f"{self.label(name)} ended: {how}")
        with contextlib.suppress(Exception):
            await self.cluster.scale_down([name])  # its scancel finds nothing to cancel
        self.cluster.worker_spec.pop(name, None)
        self.cluster.workers.pop(name, None)


def checked_counts(
    n: int | None,
    minimum: int | None,
    maximum: int | None,
    floor: int,
    max_workers: int | None,
) -> tuple[int, int]:
    """(low, top) of a scale request: a count, or adaptive bounds; refused with the reason."""
    if n is None and (minimum is None or maximum is None):
        raise Malformed("give a worker count (n), or adaptive bounds (minimum and maximum)")
    top = n if n is not None else maximum
    low = n if n is not None else minimum
    assert top is not None and low is not None  # n, or both bounds (checked above)
    if low < floor or top < low:
        raise Malformed(
            f"worker counts must satisfy {floor} <= minimum <= maximum (got {low}..{top})"
        )
    if max_workers is not None and top > max_workers:
        raise NotPossible(
            f"this machine has {max_workers} GPU(s); the embedded pool cannot grow past that. "
            "Add machines with `jupyter-gpu worker ADDRESS`."
        )
    return low, top


class PoolScaler:
    """The broker's ``scaler``: ``await scaler(n=...)`` or ``await scaler(minimum=...,
    maximum=...)``.

    ``cluster``: a started ``SpecCluster`` whose scheduler runs the broker; ``ledger``: the broker's.
    ``max_workers``: a hardware bound (the embedded pool on real GPUs), None for none. ``states``:
    the cluster manager's job states (None: it tells none). ``allow_zero``: whether the pool may
    have no worker (a cluster manager's pool; not the embedded one). ``gpu_bytes``: the size of the
    GPUs a new job brings, when known before one joins.
    """

    def __init__(
        self,
        cluster: Any,
        scheduler: Scheduler,
        ledger: Ledger,
        *,
        max_workers: int | None = None,
        per_job: int = 1,
        states: JobStates | None = None,
        kind: str = "embedded",
        manager: str = "",
        allow_zero: bool = False,
        idle: float = 60.0,
        cooldown: float = 30.0,
        interval: float = 2.0,
        gpu_bytes: int | None = None,
    ):
        self.cluster, self.ledger, self.scheduler = cluster, ledger, scheduler
        self.jobs = ClusterJobs(cluster, scheduler, ledger, states)
        self.max_workers = max_workers
        self.per_job = max(1, int(per_job))
        self.kind, self.manager = kind, manager
        self.allow_zero = allow_zero
        self.idle, self.cooldown, self.interval = idle, cooldown, interval
        self.gpu_bytes = gpu_bytes
        self.target: int | None = None  # manual: GPU workers to keep
        self.bounds: tuple[int, int] | None = None  # adaptive: GPU workers, minimum and maximum
        self._idle_since: dict[str, float] = {}
        self._last_growth = -math.inf
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the gpu_scale handler
    async def __call__(
        self, n: int | None = None, minimum: int | None = None, maximum: int | None = None
    ) -> ScaleReply:
        floor = 0 if self.allow_zero else 1
        checked_counts(n, minimum, maximum, floor, self.max_workers)
        self.start()
        async with self._lock:
            if n is not None:
                self.target, self.bounds = n, None
                left = await self._scale_jobs(self._jobs_for(n), retire_idle_for=0.0)
                reply: ScaleReply = {"workers": n, "adaptive": None}
            else:
                assert minimum is not None and maximum is not None  # adaptive: both bounds
                self.target, self.bounds = None, (minimum, maximum)
                want = min(max(self.workers_asked(), minimum), maximum)
                left = await self._scale_jobs(self._jobs_for(want), retire_idle_for=0.0)
                reply = {"workers": want, "adaptive": {"minimum": minimum, "maximum": maximum}}
        reply["jobs"] = len(self.cluster.worker_spec)
        if left:
            reply["note"] = (
                f"{left} job(s) hold a session or a session's variables in host memory: they are "
                "retired once they hold none"
            )
        return reply

    async def scale_for(
        self, user: str | None, n: int | None, minimum: int | None, maximum: int | None
    ) -> ScaleReply:
        """Scale as ``user`` asked (``gpu_scale``, its permission checked), and record who changed
        the pool's size to what: the log and the scheduler's ``jupyter-gpu-audit`` events."""
        reply = await self(n=n, minimum=minimum, maximum=maximum)
        log.info("user %s scaled the pool: n=%s minimum=%s maximum=%s", user, n, minimum, maximum)
        self.scheduler.log_event(
            "jupyter-gpu-audit",
            {"action": "scale", "user": user, "n": n, "minimum": minimum, "maximum": maximum},
        )
        return reply

    def start(self) -> None:
        """Run the loop that converges, adapts and reads job states (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def stop_adaptive(self) -> None:
        self.bounds = None

    # ------------------------------------------------------------------ what the broker shows
    def workers_asked(self) -> int:
        """GPU workers the cluster's jobs (running or on their way) start."""
        return len(self.cluster.worker_spec) * self.per_job

    def waiting_note(self) -> str | None:
        return self.jobs.waiting_note()

    def lost_note(self, worker: str) -> str | None:
        return self.jobs.lost_note(worker)

    def headroom(self) -> list[GpuSlot]:
        """The GPUs adaptive scaling could still add (for the broker: a request larger than today's
        pool waits for them instead of being refused)."""
        if self.bounds is None:
            return []
        size = self.gpu_bytes or self.ledger.largest_gpu_bytes()
        if not size:
            return []
        joined_jobs = len(self.cluster.worker_spec) - len(self.jobs.pending())
        count = max(0, self._jobs_for(self.bounds[1]) - joined_jobs) * self.per_job
        return [
            GpuSlot(
                worker=f"future:{i}",
                index=0,
                uuid=f"future-{i}",
                name="a GPU worker scaling can add",
                total_bytes=size,
                virtual=True,
            )
            for i in range(count)
        ]

    def view(self) -> ClusterView:
        adaptive: AdaptiveView | None = (
            {"minimum": self.bounds[0], "maximum": self.bounds[1], "idle": self.idle}
            if self.bounds
            else None
        )
        states = self.jobs.states
        return {
            "kind": states.kind if states else self.kind,
            "manager": self.manager,
            "gpus_per_job": self.per_job,
            "target": self.target,
            "adaptive": adaptive,
            "jobs": self.jobs.views(),
            "ended": list(self.jobs.ended),
        }

    # ------------------------------------------------------------------ jobs and their workers
    def _jobs_for(self, workers: int) -> int:
        return math.ceil(workers / self.per_job)

    def _retirable(self, idle_for: float) -> list[str]:
        """Jobs that may go now, in the order to retire them: jobs whose workers have not joined
        (the newest first), then jobs whose workers held nothing for ``idle_for`` seconds (the
        longest idle first). Never a job whose workers hold a session or a session's variables in
        host memory."""
        joined = self.jobs.joined()
        busy = self.ledger.busy_workers()
        now = time.monotonic()
        pending, idle = [], []
        for name in self.jobs.names():
            addrs = joined.get(name, [])
            rec = self.jobs.record(name)
            if set(addrs) & busy:
                self._idle_since.pop(name, None)
                continue
            since = self._idle_since.setdefault(name, now if addrs else rec.asked)
            if now - since < idle_for:
                continue
            if addrs:
                idle.append((since, name))
            else:
                pending.append((rec.asked, name))
        return [n for _, n in sorted(pending, reverse=True)] + [n for _, n in sorted(idle)]

    async def _scale_jobs(self, target: int, retire_idle_for: float) -> int:
        """Submit or retire jobs towards ``target``; returns how many surplus jobs could not go
        now."""
        current = len(self.cluster.worker_spec)
        if target > current:
            for _ in range(target - current):
                spec = self.cluster.new_worker_spec()
                self.cluster.worker_spec.update(spec)
                for name in spec:
                    self.jobs.records[str(name)] = JobRecord(str(name))
            self._last_growth = time.monotonic()
            # submits them (sbatch) or starts them; it does not wait for them to join
            await self.cluster
            log.info(
                "asked the cluster manager for %d more job(s): %d in all", target - current, target
            )
            self._audit(target)
            return 0
        if target < current:
            retire = self._retirable(retire_idle_for)[: current - target]
            if retire:
                await self.cluster.scale_down(retire)
                for name in retire:
                    self._idle_since.pop(name, None)
                log.info(
                    "retired %s (they held no session and no host-memory copy): %d job(s) left",
                    ", ".join(self.jobs.label(n) for n in retire),
                    len(self.cluster.worker_spec),
                )
                self._audit(len(self.cluster.worker_spec))
            return current - target - len(retire)
        return 0

    def _audit(self, jobs: int) -> None:
        self.jobs.scheduler.log_event(
            "jupyter-gpu-audit", {"action": "scaled", "jobs": jobs, "workers": jobs * self.per_job}
        )

    # ------------------------------------------------------------------ the loop
    async def _run_forever(self) -> None:
        while True:
            try:
                async with self._lock:
                    await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("a scaling pass failed; trying again in %g s", self.interval)
            await asyncio.sleep(self.interval)

    async def _tick(self) -> None:
        for name in await self.jobs.read_states():
            self._idle_since.pop(name, None)
            await self.jobs.job_ended(name)
        if self.target is not None:
            await self._scale_jobs(self._jobs_for(self.target), retire_idle_for=0.0)
        elif self.bounds is not None:
            await self._adapt()

    async def _adapt(self) -> None:
        assert self.bounds is not None  # adaptive (see _tick)
        low, high = (self._jobs_for(b) for b in self.bounds)
        jobs = len(self.cluster.worker_spec)
        if jobs < low or jobs > high:
            await self._scale_jobs(min(max(jobs, low), high), retire_idle_for=0.0)
            return
        need = self._gpus_needed()
        on_their_way = len(self.jobs.pending()) * self.per_job
        if need > on_their_way and jobs < high:
            await self._scale_jobs(
                min(high, jobs + math.ceil((need - on_their_way) / self.per_job)), 0.0
            )
            return
        self._retirable(self.idle)  # keeps the idle clocks of every job current
        if need == 0 and jobs > low and time.monotonic() - self._last_growth >= self.cooldown:
            await self._scale_jobs(jobs - 1, retire_idle_for=self.idle)

    def _gpus_needed(self) -> int:
        """GPUs the requests that have waited one interval want (whole GPUs and ranks count one
        each; shares add up), leaving out requests that wait for their quota, which new GPUs do not
        change."""
        now, total = time.time(), 0.0
        size = self.gpu_bytes or self.ledger.largest_gpu_bytes()
        for req in self.ledger.queued():
            if now - req.submitted < self.interval or "quota" in (req.reason or ""):
                continue
            spec = req.spec
            if spec.workers > 1 or spec.gpus is not None:
                total += spec.workers * (spec.gpus or 1)
            elif spec.fraction is not None:
                total += spec.fraction
            else:
                assert spec.memory is not None  # exactly one of the three (RequestSpec.validate)
                total += min(1.0, spec.memory / size) if size else 1.0
        return math.ceil(total - 1e-9)
