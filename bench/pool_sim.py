"""Pool simulator: the REAL fair-share policy and packing under a synthetic notebook workload.

Imports ``jupyter_gpu.broker.fair_share`` (order, reclaim, reservations, ETA) and ``packing`` (best
fit) and drives them with a reproducible discrete-event workload: N users in teams on G GPUs;
notebooks whose cells are short bursts with idle gaps (a session holds its lease for the notebook's
life, as in the pool); some batch jobs. Requests: 44% fractional (fraction p10 0.23, p50 0.47, p90
0.81), the rest a whole GPU.

It prints, side by side for (fair) fair share with quotas, reclaim, suspension of idle sessions for
waiting cells (``suspend-idle-after``, 0 s here) and an idle timeout, (a) one whole GPU per notebook
for its lifetime, and (b) plain FIFO of fractional requests: allocated and busy utilization, p50/p95
wait of interactive cells, Jain's fairness index, preemptions/hour, idle sessions moved to host
memory per hour, and the largest team (users on the G GPUs) whose p95 interactive wait stays under
10 s. Moving a session costs time, and it is charged to the cells that wait for it (``MoveCosts``):
the cell that displaced a session waits until that session has written its state out (nothing when
the session's standby copy, written once it had been idle ``standby_after`` seconds, is complete),
and the displaced owner's next cell waits for a new session to read it back. How the result depends
on those costs, ``suspend-idle-after`` and standby copies is printed too. Then the policy's decision
time with 10,000 GPUs and 100,000 queued requests: the fair queue's order alone, and the broker's
whole scheduling pass (``Ledger.schedule``) with requests that can never fit among them; and how
much a flood of 10,000 requests by one user delays another user's grant.

    python bench/pool_sim.py            # full (a few minutes)
    python bench/pool_sim.py --quick    # under 60 s
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jupyter_gpu.broker import packing
from jupyter_gpu.broker.fair_share import FairQueue, FairSharePolicy
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import GpuSlot, Lease, Request
from jupyter_gpu.broker.quotas import PoolQuotas, Team, UserQuota
from jupyter_gpu.common.protocol import RequestSpec

GiB = 2**30
GPU_BYTES = 80 * GiB


@dataclass
class MoveCosts:
    """What moving an idle session's variables to host memory and back costs (reclaim and
    suspension).

        A reclaimed or suspended session first writes its GPU state out (the request that displaced
        it starts only once it is gone: ``save``), and its owner's next cell waits for a new session
        that reads it back (``resume``). The state is what the session really holds on the GPU,
        usually far less than its lease (``state_gib_median``, lognormal, capped at the lease: an
        assumption, no public trace gives it). The rates default to what ``bench/offload.py``
        measured for ``save_namespace`` and ``load_namespace`` on the 2-core VM of
        docs/benchmarks.md (2.0 and 7.5 GB/s; there the "GPU" is host memory, so that is the whole
        move); a GPU server adds the host link for CUDA tensors but has faster memory.

        ``standby_after`` is the pool's ``session.standby-after``: a session idle that long writes a
        standby copy of its state (at ``save_gbps``), so that suspending it once the copy is
        complete costs nothing, and mid-copy costs the rest of the copy. A cell that arrives while
        its own session is writing the copy waits for the rest of it (conservative: the session
        stops the copy at its next write, one tensor, not at the end). None: no copies, every move
        writes its state when it is suspended.
    """

    state_gib_median: float = 4.0
    state_sigma: float = 1.0
    save_gbps: float = 2.0
    load_gbps: float = 7.5
    session_start: float = 0.5
    # the session's own measure of what it holds is off by ~30% (RSS, allocator)
    measure_sigma: float = 0.3
    standby_after: float | None = 2.0

    def state_bytes(self, rng: random.Random, lease_bytes: int) -> int:
        return int(
            min(
                lease_bytes,
                rng.lognormvariate(math.log(self.state_gib_median * GiB), self.state_sigma),
            )
        )

    def save(self, state: int) -> float:
        return state / (self.save_gbps * 1e9)

    def resume(self, state: int) -> float:
        return self.session_start + state / (self.load_gbps * 1e9)


# ---------------------------------------------------------------------- the pool, on the real policy
class FifoFractions(FairSharePolicy):
    """Baseline (b): first come first served with backfill, no quotas, no reservations, no
    reclaim."""

    name = "fifo"

    def key(self, req: Request, now: float, *_: object) -> tuple:
        # the fair-share key's shape (what a scheduling pass's walk orders by), arrival order only
        return (1, 0, 0.0, 0.0, 0, 0, req.submitted, req.id)

    def team_context(self, team: str, now: float, held: float | None = None) -> tuple[float, float]:
        return math.inf, 0.0  # no guarantees, every team alike


class SimPool:
    """The broker's own ``Ledger`` on simulated time: GPUs, queue and leases, scheduled by the very
    pass the broker runs (``Ledger.schedule``); only the clock, the ids and the workload are the
    simulator's."""

    def __init__(self, gpus: list[GpuSlot], policy: FairSharePolicy):
        self.policy = policy
        self.now = 0.0
        policy.clock = lambda: self.now
        self._ids = 0
        # sessions start the instant they are granted here: idle until their first cell runs
        self.ledger = Ledger(
            policy, clock=lambda: self.now, new_id=self.new_id, sessions_start_idle=True
        )
        by_worker: dict[str, list[GpuSlot]] = {}
        for g in gpus:
            by_worker.setdefault(g.worker, []).append(g)
        for worker, slots in by_worker.items():
            self.ledger.set_worker_gpus(worker, slots)
        self.on_preempt: Callable[[Lease, Request], None] = lambda lease, req: None
        self.eta_for = 0  # estimated starts cost O(leases) per request: the simulator skips them
        self._preempted: list[tuple[Lease, str]] = []

    @property
    def gpus(self) -> dict[str, GpuSlot]:
        return self.ledger.gpus

    @property
    def queue(self) -> list[Request]:
        return self.ledger.queue

    @property
    def leases(self) -> dict[str, Lease]:
        return self.ledger.leases

    def new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids}"

    def req_of(self, lease: Lease) -> Request:
        """The request a lease was granted for."""
        return self.ledger.requests[lease.request]

    def submit(self, req: Request) -> None:
        req.submitted = self.now
        req.team = req.team or self.policy.quotas.team_of(req.user)
        self.ledger.submit(req)

    def cancel(self, req: Request) -> None:
        if req in self.queue:
            self.queue.remove(req)

    def _preempt(self, lease_id: str, reason: str, req: Request) -> None:
        lease = self.leases.get(lease_id)
        if lease is not None:
            self.on_preempt(lease, req)
            self._preempted.append((lease, reason))
            self.end(lease_id)

    def end(self, lease_id: str) -> Lease | None:
        return self.ledger.end(lease_id, "ended", now=self.now)

    def schedule(self) -> tuple[list[tuple[Request, Lease]], list[tuple[Lease, str]]]:
        """One pass; returns (grants, preemptions) made by it, one (request, lease) per granted
        rank."""
        self._preempted = []
        grants = self.ledger.schedule(self._preempt, now=self.now)
        if self.eta_for:  # what a kernel reading its request would be told now
            self.ledger.view.eta_for = self.eta_for
            self.ledger.view.refresh(self.now, force=True)
        return [(req, lease) for req, leases in grants for lease in leases], self._preempted

    def check_invariants(self) -> None:
        self.ledger.check()


def make_gpus(n: int, per_worker: int = 4, size: int = GPU_BYTES) -> list[GpuSlot]:
    return [
        GpuSlot(
            worker=f"w{i // per_worker}",
            index=i % per_worker,
            uuid=f"G{i}",
            name="sim",
            total_bytes=size,
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------- the workload
def fraction_draw(rng: random.Random) -> float:
    """44% fractional with p10 0.23, p50 0.47, p90 0.81 (a two-sided logit-normal through those
    points); the rest a whole GPU."""
    if rng.random() >= 0.44:
        return 1.0
    z = rng.gauss(0, 1)
    mid = math.log(0.47 / 0.53)
    lo, hi = mid - math.log(0.23 / 0.77), math.log(0.81 / 0.19) - mid
    x = mid + z * ((lo if z < 0 else hi) / 1.2816)
    return min(0.95, max(0.05, 1 / (1 + math.exp(-x))))


@dataclass
class Notebook:
    user: str
    fraction: float
    cells: list[tuple[float, float]]  # (idle gap before the cell, burst length)
    # open and idle after the last cell before the kernel stops
    linger: float
    lease: str | None = None
    request: Request | None = None
    cell: int = 0
    asked: float = 0.0
    # its variables are in host memory: the next cell reads them back
    suspended: bool = False
    state: int = 0  # bytes it holds on the GPU when idle
    measured: float = 1.0  # what its session reports of that, relative to the truth
    copy_from: float = math.inf  # its standby copy is being written from then ...
    copy_done: float = math.inf  # ... and is complete then (inf: no copy while it runs)


@dataclass
class Job:
    user: str
    fraction: float
    duration: float
    workers: int = 1
    request: Request | None = None
    submitted: float = 0.0


@dataclass
class Result:
    name: str
    waits: list[float] = field(default_factory=list)
    first_waits: list[float] = field(default_factory=list)  # cells that had to ask for a session
    alloc_area: float = 0.0
    busy_area: float = 0.0
    horizon: float = 1.0
    gpus: int = 1
    preemptions: int = 0  # running work interrupted
    moved: int = 0  # idle sessions moved to host memory (reclaimed or suspended)
    moved_by_copy: int = 0  # ... whose standby copy was complete: nothing left to write
    copy_bytes: float = 0.0  # bytes written to standby copies (complete or stopped)
    # most bytes held in host memory by standby copies at once (sampled every 30 s)
    copy_peak: int = 0
    served: dict[str, float] = field(default_factory=dict)
    demanded: dict[str, float] = field(default_factory=dict)

    def pct(self, q: float) -> float:
        if not self.waits:
            return float("nan")
        s = sorted(self.waits)
        k = (len(s) - 1) * q / 100
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    def jain(self) -> float:
        xs = [self.served.get(u, 0.0) / d for u, d in self.demanded.items() if d > 0]
        return (sum(xs) ** 2) / (len(xs) * sum(x * x for x in xs)) if xs else float("nan")


def workload(
    users: int, hours: float, seed: int
) -> tuple[list[tuple[float, object]], dict[str, str]]:
    """Arrivals (time, notebook|job) and each user's team (4 teams), reproducible from ``seed``."""
    rng = random.Random(seed)
    teams = {f"u{i}": f"team{i % 4}" for i in range(users)}
    arrivals: list[tuple[float, object]] = []
    horizon = hours * 3600
    for u in teams:
        t = rng.uniform(0, 600)
        batch_user = rng.random() < 0.2
        while t < horizon:
            if batch_user and rng.random() < 0.5:
                workers = 2 if rng.random() < 0.15 else 1
                arrivals.append(
                    (
                        t,
                        Job(
                            user=u,
                            fraction=1.0 if workers > 1 else fraction_draw(rng),
                            duration=rng.lognormvariate(math.log(900), 0.6),
                            workers=workers,
                        ),
                    )
                )
                t += rng.expovariate(1 / 1800)
                continue
            cells = [
                (rng.lognormvariate(math.log(45), 1.0), rng.lognormvariate(math.log(15), 1.0))
                for _ in range(rng.randint(5, 30))
            ]
            nb = Notebook(
                user=u,
                fraction=fraction_draw(rng),
                cells=cells,
                linger=rng.lognormvariate(math.log(600), 1.0),
            )
            arrivals.append((t, nb))
            t += sum(g + b for g, b in cells) + nb.linger + rng.expovariate(1 / 1200)
    arrivals.sort(key=lambda a: a[0])
    return arrivals, teams


def quotas_for(teams: dict[str, str], gpus: int, idle_timeout: float | None) -> PoolQuotas:
    """Guarantees proportional to team size, summing to the pool; borrowing allowed up to the whole
    pool."""
    sizes: dict[str, int] = {}
    for t in teams.values():
        sizes[t] = sizes.get(t, 0) + 1
    n = len(teams)
    q = PoolQuotas(
        teams={
            t: Team(
                name=t, guarantee=gpus * k / n, members={u for u, tt in teams.items() if tt == t}
            )
            for t, k in sizes.items()
        },
        users={u: UserQuota(name=u, team=t) for u, t in teams.items()},
        half_life=1800,
        reserve_after=60,
        min_run_time=60,
        idle_timeout=idle_timeout,
        configured=True,
    )
    return q


def simulate(
    mode: str,
    users: int,
    n_gpus: int,
    hours: float,
    seed: int,
    costs: MoveCosts | None = None,
    suspend_after: float | None = 0.0,
) -> Result:
    """Run one mode: ``fair`` (quotas, reclaim, suspension of idle sessions for waiting cells, idle
    timeout), ``whole`` (a), ``fifo`` (b)."""
    costs = costs or MoveCosts()
    arrivals, teams = workload(users, hours, seed)
    state_rng = random.Random(seed + 1)
    measure_rng = random.Random(seed + 2)
    if mode == "fair":
        policy: FairSharePolicy = FairSharePolicy(quotas_for(teams, n_gpus, idle_timeout=300))
        policy.quotas.suspend_idle_after = suspend_after
    else:
        policy = FifoFractions(
            PoolQuotas(reserve_after=math.inf, min_run_time=math.inf, suspend_idle_after=None)
        )
        policy.quotas.users = {u: UserQuota(name=u, team=t) for u, t in teams.items()}
    pool = SimPool(make_gpus(n_gpus), policy)
    # request id -> seconds until the sessions displaced for it are gone
    drain: dict[str, float] = {}
    res = Result(name=mode, horizon=hours * 3600, gpus=n_gpus)
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(t: float, kind: str, obj: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, obj))

    for t, obj in arrivals:
        push(t, "arrive", obj)
    for t in range(0, int(res.horizon), 30):
        push(float(t), "tick", None)
    running: dict[str, float] = {}  # lease id -> fraction while a cell/job runs
    owners: dict[str, object] = {}
    last = 0.0

    def frac_of(obj: object) -> float:
        return 1.0 if mode == "whole" else obj.fraction

    def ask(obj: object) -> None:
        if isinstance(obj, Notebook):
            spec = (
                RequestSpec(gpus=1) if frac_of(obj) >= 1.0 else RequestSpec(fraction=frac_of(obj))
            )
            obj.request = Request(
                id=pool.new_id("R"), user=obj.user, kernel="k", client=None, spec=spec
            )
            obj.asked = pool.now
            pool.submit(obj.request)
            owners[obj.request.id] = obj
        else:
            f = frac_of(obj)
            spec = (
                RequestSpec(gpus=1, workers=obj.workers, priority="batch")
                if f >= 1.0 and obj.workers == 1
                else RequestSpec(
                    fraction=f if f < 1 else 1.0, workers=obj.workers, priority="batch"
                )
            )
            obj.request = Request(
                id=pool.new_id("R"), user=obj.user, kernel="j", client=None, spec=spec
            )
            obj.submitted = pool.now
            pool.submit(obj.request)
            owners[obj.request.id] = obj

    def displaced(lease: Lease, req: Request) -> None:
        """An idle session leaves for ``req``: it writes its state out first (``req`` waits for
        that), unless its standby copy is complete (mid-copy: the rest of the copy)."""
        owner = owners.get(lease.request)
        if isinstance(owner, Notebook) and lease.id not in running:
            owner.suspended = True
            started, complete = owner.copy_from <= pool.now, owner.copy_done <= pool.now
            rest = stop_copy(owner)  # 0 once complete
            res.moved_by_copy += complete
            drain[req.id] = max(
                drain.get(req.id, 0.0), rest if started else costs.save(owner.state)
            )

    def stop_copy(nb: Notebook) -> float:
        """The notebook's standby copy ends (a cell, a move): count what was written; returns the
        seconds still needed to finish it (what a cell that arrives mid-copy waits for,
        conservatively)."""
        rest = 0.0
        if nb.copy_from <= pool.now:
            done = min(pool.now, nb.copy_done)
            res.copy_bytes += (done - nb.copy_from) * costs.save_gbps * 1e9
            rest = max(0.0, nb.copy_done - pool.now)
        nb.copy_from = nb.copy_done = math.inf
        return rest

    pool.on_preempt = displaced

    def start_cell(nb: Notebook, extra: float = 0.0) -> float:
        """The cell runs after ``extra`` seconds (displaced sessions leaving, its own state coming
        back, its own standby copy being written); returns how long it waited for the copy."""
        copying = stop_copy(nb)
        extra += copying
        gap, burst = nb.cells[nb.cell]
        running[nb.lease] = pool.policy.leases[nb.lease].gpus
        pool.policy.lease_state(nb.lease, "running", pool.now)
        res.served[nb.user] = res.served.get(nb.user, 0.0) + burst
        push(pool.now + extra + burst, "cell_end", (nb, nb.lease))
        return copying

    while events:
        t, _, kind, obj = heapq.heappop(events)
        if t > res.horizon:
            break
        leased = sum(g.leased_bytes for g in pool.gpus.values()) / GPU_BYTES
        res.alloc_area += leased * (t - last)
        res.busy_area += sum(running.values()) * (t - last)
        last = pool.now = t
        if kind == "arrive":
            if isinstance(obj, Notebook):
                gap, burst = obj.cells[0]
                obj.state = costs.state_bytes(state_rng, int(frac_of(obj) * GPU_BYTES))
                obj.measured = measure_rng.lognormvariate(0.0, costs.measure_sigma)
                res.demanded[obj.user] = res.demanded.get(obj.user, 0.0) + sum(
                    b for _, b in obj.cells
                )
                push(t, "cell", obj)
            else:
                res.demanded[obj.user] = res.demanded.get(obj.user, 0.0) + obj.duration
                ask(obj)
        elif kind == "cell":
            nb = obj
            if nb.lease is not None and nb.lease in pool.leases:
                res.waits.append(start_cell(nb))
            else:
                nb.lease = None
                ask(nb)
        elif kind == "cell_end":
            nb, lease_id = obj
            running.pop(lease_id, None)
            # the session says what it holds now (measured, so not exactly)
            if lease_id in pool.leases:
                pool.policy.lease_state(lease_id, "idle", t, resident=int(nb.state * nb.measured))
                if mode == "fair" and costs.standby_after is not None:
                    nb.copy_from = t + costs.standby_after
                    nb.copy_done = nb.copy_from + costs.save(nb.state)
            nb.cell += 1
            if nb.cell < len(nb.cells):
                push(t + nb.cells[nb.cell][0], "cell", nb)
            else:
                push(t + nb.linger, "close", nb)
        elif kind == "close":
            stop_copy(obj)
            if obj.lease is not None:
                pool.end(obj.lease)
                running.pop(obj.lease, None)
                obj.lease = None
        elif kind == "job_end":
            job, lease_ids = obj
            for lid in lease_ids:
                pool.end(lid)
                running.pop(lid, None)
        elif kind == "tick":
            if mode == "fair":
                held = sum(
                    nb.state
                    for nb in (owners.get(ls.request) for ls in pool.leases.values())
                    if isinstance(nb, Notebook) and nb.copy_done <= t
                )
                res.copy_peak = max(res.copy_peak, held)
                for lid in pool.policy.idle_expired(t):
                    if lid in pool.leases and lid not in running:
                        owner = owners.get(pool.leases[lid].request)
                        if isinstance(owner, Notebook):
                            # released to host memory: the next cell reads it back
                            owner.suspended = True
                            stop_copy(owner)
                        pool.end(lid)
        grants, preempted = pool.schedule()
        for lease, _reason in preempted:
            if lease.id in running:
                res.preemptions += 1
            else:
                res.moved += 1
            running.pop(lease.id, None)
            owner = owners.get(lease.request)
            if isinstance(owner, Job):  # a preempted job is requeued from the start
                res.served[owner.user] = res.served.get(owner.user, 0.0) - owner.duration
                owner.request = None
                for lid in pool.req_of(lease).leases:
                    pool.end(lid)
                ask(owner)
        done: set[str] = set()
        for req, lease in grants:
            owner = owners.get(req.id)
            if req.id in done or owner is None:
                continue
            done.add(req.id)
            if isinstance(owner, Notebook):
                owner.lease = lease.id
                extra = drain.pop(req.id, 0.0) + (
                    costs.resume(owner.state) if owner.suspended else 0.0
                )
                owner.suspended = False
                extra += start_cell(owner, extra)
                res.waits.append(t - owner.asked + extra)
                res.first_waits.append(t - owner.asked + extra)
            else:
                for lid in req.leases:
                    running[lid] = pool.policy.leases[lid].gpus
                    pool.policy.lease_state(lid, "running", t)
                res.served[owner.user] = res.served.get(owner.user, 0.0) + owner.duration
                push(t + owner.duration, "job_end", (owner, list(req.leases)))
    for req in pool.queue:  # still waiting at the end: counted with the wait so far (not dropped)
        owner = owners.get(req.id)
        if isinstance(owner, Notebook):
            res.waits.append(res.horizon - owner.asked)
            res.first_waits.append(res.horizon - owner.asked)
    return res


def largest_team(
    mode: str,
    n_gpus: int,
    hours: float,
    seed: int,
    sizes: list[int],
    costs: MoveCosts | None = None,
    suspend_after: float | None = 0.0,
) -> int:
    """The most users (of ``sizes``, tried in order) served with a p95 interactive wait under 10
    s."""
    best = 0
    for n in sizes:
        if simulate(mode, n, n_gpus, hours, seed, costs, suspend_after).pct(95) < 10.0:
            best = n
        else:
            break
    return best


def sensitivity(
    n_gpus: int,
    hours: float,
    seed: int,
    users: int,
    costs: MoveCosts,
    suspend: float | None,
    quick: bool,
) -> None:
    """p95 interactive wait of fair share at ``users`` (3x what (a) serves) as the assumptions
    change: the workload's seed, what moving a session costs, and ``suspend-idle-after``."""

    def p95(**kw) -> str:
        c = dataclasses.replace(costs, **kw.get("costs", {}))
        r = simulate(
            "fair", users, n_gpus, hours, kw.get("seed", seed), c, kw.get("suspend", suspend)
        )
        return f"{r.pct(95):.1f} s" + ("" if r.pct(95) < 10 else " (over)")

    seeds = [seed] + [s for s in range(1, 9) if s != seed][: 2 if quick else 7]
    print(f"p95 interactive wait of fair share, {users} users on {n_gpus} GPUs, {hours:g} h:")
    print("  by workload seed: " + ", ".join(f"{s}: {p95(seed=s)}" for s in seeds))
    rates = ((1.0, 2.0), (costs.save_gbps, costs.load_gbps), (4.0, 4.0), (10.0, 10.0))
    for gib in (1.0, 2.0, 4.0, 16.0):
        print(
            f"  idle state median {gib:g} GiB, saved/loaded at "
            + ", ".join(
                f"{sv:g}/{ld:g} GB/s: "
                f"{p95(costs={'state_gib_median': gib, 'save_gbps': sv, 'load_gbps': ld})}"
                for sv, ld in rates
            )
        )
    print(
        "  suspend-idle-after "
        + ", ".join(
            f"{'off' if a is None else f'{a:g} s'}: {p95(suspend=a)}"
            for a in (0.0, 10.0, 60.0, None)
        )
    )
    print(
        "  standby copies "
        + ", ".join(
            f"{'off' if a is None else f'after {a:g} s'}: {p95(costs={'standby_after': a})}"
            for a in (None, 0.0, 2.0, 10.0, 30.0)
        )
    )
    on = costs.standby_after if costs.standby_after is not None else 2.0
    print(
        "  idle state median 16 GiB: standby copies off: "
        f"{p95(costs={'standby_after': None, 'state_gib_median': 16.0})}"
        f", after {on:g} s: {p95(costs={'standby_after': on, 'state_gib_median': 16.0})}"
    )


# ---------------------------------------------------------------------- decision time at scale
def decision_time(n_gpus: int, n_queued: int, decisions: int, seed: int) -> dict:
    """Per-decision time of the incremental fair queue: pick the next request, grant it
    (accounting), end a lease (accounting) — with ``n_queued`` waiting requests from 2,000 users in
    50 teams."""
    rng = random.Random(seed)
    users = {f"u{i}": f"t{i % 50}" for i in range(2000)}
    quotas = PoolQuotas(
        teams={t: Team(name=t, guarantee=n_gpus / 50) for t in set(users.values())},
        users={u: UserQuota(name=u, team=t) for u, t in users.items()},
        configured=True,
    )
    now = [0.0]
    policy = FairSharePolicy(quotas, clock=lambda: now[0])
    policy.reference_bytes = GPU_BYTES
    fq = FairQueue(policy)
    names = list(users)
    for i in range(n_queued):
        u = rng.choice(names)
        f = fraction_draw(rng)
        spec = RequestSpec(gpus=1) if f >= 1 else RequestSpec(fraction=f)
        if rng.random() < 0.1:
            spec.priority = "batch"
        fq.add(
            Request(
                id=f"R{i}",
                user=u,
                kernel="k",
                client=None,
                spec=spec,
                team=users[u],
                submitted=i * 1e-3,
            )
        )
    # a pool nearly full of leases
    live: list[str] = []
    for i in range(int(n_gpus * 1.5)):
        u = rng.choice(names)
        policy.lease_started(
            f"P{i}", u, users[u], 0.6, False, now=0.0, allocs={f"g{i % n_gpus}": GPU_BYTES // 2}
        )
        live.append(f"P{i}")
    times = []
    for d in range(decisions):
        now[0] = 200.0 + d * 0.01
        t0 = time.perf_counter()
        req = fq.pop(now[0])
        policy.lease_started(f"N{d}", req.user, req.team, policy.need(req.spec), False, now=now[0])
        victim = live.pop(rng.randrange(len(live)))
        policy.lease_ended(victim, now=now[0])
        times.append(time.perf_counter() - t0)
        live.append(f"N{d}")
    gpus = make_gpus(n_gpus)
    for g in gpus:
        g.leased_bytes = rng.choice([0, GPU_BYTES // 4, GPU_BYTES // 2, GPU_BYTES])
    place_times = []
    for _ in range(50):
        t0 = time.perf_counter()
        packing.place(RequestSpec(fraction=0.47), gpus)
        place_times.append(time.perf_counter() - t0)
    s = sorted(times)
    return {
        "p50_ms": s[len(s) // 2] * 1e3,
        "p99_ms": s[int(len(s) * 0.99) - 1] * 1e3,
        "max_ms": s[-1] * 1e3,
        "decisions": decisions,
        "place_p50_ms": statistics.median(place_times) * 1e3,
    }


# ---------------------------------------------------------------------- the broker's pass at scale
def scale_pool(n_gpus: int, seed: int) -> tuple[SimPool, dict[str, str], random.Random]:
    """The broker's ledger with ``n_gpus`` GPUs (4 per worker) nearly full of busy sessions of the
    workload's shapes, 2,000 users in 50 teams with guarantees (borrowed leases are preemptible
    once they ran ``min-run-time``)."""
    rng = random.Random(seed)
    users = {f"u{i}": f"t{i % 50}" for i in range(2000)}
    quotas = PoolQuotas(
        teams={t: Team(name=t, guarantee=n_gpus / 50) for t in set(users.values())},
        users={u: UserQuota(name=u, team=t) for u, t in users.items()},
        configured=True,
    )
    pool = SimPool(make_gpus(n_gpus), FairSharePolicy(quotas))
    names = list(users)
    for i in range(int(n_gpus * 1.6)):
        f = fraction_draw(rng)
        spec = RequestSpec(gpus=1) if f >= 1 else RequestSpec(fraction=round(f, 2))
        pool.submit(Request(id=f"F{i}", user=rng.choice(names), kernel="k", client=None, spec=spec))
    pool.schedule()
    for req in list(pool.queue):
        pool.cancel(req)
    for lease_id in pool.leases:  # busy sessions: running cells
        pool.policy.lease_state(lease_id, "running", 0.0)
    return pool, users, rng


def queued_shape(rng: random.Random) -> tuple[RequestSpec, str]:
    """A waiting request: the workload's shapes, some that cannot fit until the pool changes (whole
    machines: 4 GPUs), some that can never fit (more memory than a GPU has, 8 GPUs on one 4-GPU
    worker): the broker refuses those once, at submission."""
    x = rng.random()
    if x < 0.05:
        return RequestSpec(memory=100 * GiB), "never"
    if x < 0.10:
        return RequestSpec(gpus=8), "never"
    if x < 0.15:
        return RequestSpec(gpus=4), "later"
    f = fraction_draw(rng)
    return (RequestSpec(gpus=1) if f >= 1 else RequestSpec(fraction=round(f, 2))), "fits"


def submit_all(pool: SimPool, reqs: list[Request]) -> tuple[int, list[float]]:
    """Submit as the broker does (``Ledger.never_fits`` first: a request that can never fit is
    refused at once and never queued); returns how many were refused and each submission's
    seconds."""
    refused, times = 0, []
    for req in reqs:
        t0 = time.perf_counter()
        if pool.ledger.never_fits(req.spec) is not None:
            refused += 1
            pool.ledger.record(req)
        else:
            pool.submit(req)
        times.append(time.perf_counter() - t0)
    return refused, times


def pass_time(n_gpus: int, n_queued: int, decisions: int, seed: int, views: int = 10) -> dict:
    """Per-decision time of the broker's own scheduling pass with ``n_queued`` requests
    submitted, some of which can never fit. One decision: a lease ends (``Ledger.end``) and the
    one pass that follows decides what starts (``Ledger.schedule``: order, room, placement,
    reclaim, reservations), timed from the end to the pass's return, every grant it makes
    included. Then what a queue view costs when it asks (``QueueView.refresh``: reasons and
    estimated starts of the first 100 waiting), ``views`` times, after a decision each."""
    pool, users, rng = scale_pool(n_gpus, seed)
    names = list(users)
    reqs = []
    for i in range(n_queued):
        spec, _ = queued_shape(rng)
        if rng.random() < 0.1:
            spec.priority = "batch"
        u = rng.choice(names)
        reqs.append(Request(id=f"R{i}", user=u, kernel="k", client=None, spec=spec))
    refused, submit_times = submit_all(pool, reqs)
    pool.now = 1.0
    pool.schedule()  # every request is looked at once (told why it waits)
    tries = [0]
    place = pool.ledger.packer.place

    def counted(spec: RequestSpec, held: Any = ()) -> Any:
        tries[0] += 1
        return place(spec, held)

    pool.ledger.packer.place = counted  # type: ignore[method-assign]
    times, cpu_times, granted, placed = [], [], 0, []
    for d in range(decisions + views):
        pool.now = 2.0 + d * 0.01
        victim = rng.choice(list(pool.leases)) if d % 10 == 0 else next(iter(pool.leases))
        tries[0] = 0
        t0, c0 = time.perf_counter(), time.thread_time()
        pool.end(victim)
        grants, _ = pool.schedule()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - c0)
        placed.append(tries[0])
        granted += len(grants)
    view_times = []
    pool.ledger.view.eta_for = 100
    for _ in range(views):
        pool.now += 0.01
        pool.end(next(iter(pool.leases)))
        pool.schedule()
        t0 = time.perf_counter()
        pool.ledger.view.refresh(pool.now, force=True)
        view_times.append(time.perf_counter() - t0)
    s, sub, v = sorted(times), sorted(submit_times), sorted(view_times)
    c = sorted(cpu_times)
    return {
        "p50_ms": s[len(s) // 2] * 1e3,
        "p99_ms": s[max(0, int(len(s) * 0.99) - 1)] * 1e3,
        "max_ms": s[-1] * 1e3,
        # the scheduler's own CPU time: what other processes on a loaded machine do not add
        "cpu_p50_ms": c[len(c) // 2] * 1e3,
        "cpu_p99_ms": c[max(0, int(len(c) * 0.99) - 1)] * 1e3,
        "cpu_max_ms": c[-1] * 1e3,
        "decisions": len(s),
        "granted": granted,
        "tries_p50": sorted(placed)[len(placed) // 2],
        "tries_max": max(placed),
        "queued": len(pool.queue),
        "refused": refused,
        "submit_p50_ms": sub[len(sub) // 2] * 1e3,
        "submit_p99_ms": sub[int(len(sub) * 0.99) - 1] * 1e3,
        "view_p50_ms": v[len(v) // 2] * 1e3,
        "view_max_ms": v[-1] * 1e3,
    }


def flood(n_gpus: int, n_flood: int, seed: int, eta_for: int = 100) -> dict:
    """Another user's cell against a flood: one user submits ``n_flood`` requests (a third can
    never fit, a third not until the pool changes, a third fit the free gaps), then another user
    submits one that fits once a lease ends. The figure is the CPU time from that user's submission
    to its grant (every pass in between, as the broker runs them, with estimated starts for the
    first ``eta_for`` waiting), against the same without the flood."""

    def once(n: int) -> float:
        pool, users, rng = scale_pool(n_gpus, seed)
        shapes = [RequestSpec(memory=100 * GiB), RequestSpec(gpus=4), RequestSpec(fraction=0.9)]
        reqs = [
            Request(id=f"X{i}", user="u0", kernel="k", client=None, spec=shapes[i % 3])
            for i in range(n)
        ]
        pool.eta_for = eta_for
        t0 = time.perf_counter()
        submit_all(pool, reqs)
        pool.schedule()  # the flood's first pass: each is told why it waits
        flood_s = time.perf_counter() - t0
        other = Request(id="O", user="u1", kernel="k", client=None, spec=RequestSpec(fraction=0.5))
        pool.now = 5.0
        t0 = time.perf_counter()
        pool.submit(other)
        passes = 0
        while other in pool.queue:
            pool.schedule()
            passes += 1
            if other in pool.queue:
                pool.end(next(iter(pool.leases)))  # a lease ends: its memory comes free
        return time.perf_counter() - t0, flood_s, passes

    quiet, _, quiet_passes = once(0)
    loud, flood_s, loud_passes = once(n_flood)
    return {
        "quiet_s": quiet,
        "flood_s": loud,
        "delta_s": loud - quiet,
        "flood_submit_s": flood_s,
        "passes": (quiet_passes, loud_passes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small runs, under 60 s")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--gpus", type=int, default=None)
    parser.add_argument("--hours", type=float, default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--suspend-after",
        type=float,
        default=0.0,
        help="the pool's suspend-idle-after for fair share, seconds (negative: off)",
    )
    parser.add_argument(
        "--state-gib",
        type=float,
        default=MoveCosts.state_gib_median,
        help="median GPU state of an idle session, GiB (lognormal, capped at its lease)",
    )
    parser.add_argument(
        "--save-gbps",
        type=float,
        default=MoveCosts.save_gbps,
        help="GB/s at which an idle session's state is written to host memory",
    )
    parser.add_argument(
        "--load-gbps",
        type=float,
        default=MoveCosts.load_gbps,
        help="GB/s at which a new session reads it back",
    )
    parser.add_argument(
        "--session-start",
        type=float,
        default=MoveCosts.session_start,
        help="seconds to start a new session",
    )
    parser.add_argument(
        "--standby-after",
        type=float,
        default=MoveCosts.standby_after,
        help="session.standby-after: idle seconds before a session copies its state ahead of "
        "need (negative: no copies)",
    )
    parser.add_argument(
        "--scale-only",
        action="store_true",
        help="only the decision time at 10,000 GPUs and 100,000 queued (and the flood)",
    )
    parser.add_argument("--decisions", type=int, default=None, help="decisions timed at scale")
    args = parser.parse_args(argv)
    if args.scale_only:
        t_start = time.perf_counter()
        decisions = args.decisions or (200 if args.quick else 1000)
        scale_tables(10_000, 20_000 if args.quick else 100_000, decisions, args.seed)
        print(f"\nwall time {time.perf_counter() - t_start:.1f} s")
        return 0
    costs = MoveCosts(
        state_gib_median=args.state_gib,
        save_gbps=args.save_gbps,
        load_gbps=args.load_gbps,
        session_start=args.session_start,
        standby_after=None if args.standby_after < 0 else args.standby_after,
    )
    suspend = None if args.suspend_after < 0 else args.suspend_after
    quick = args.quick
    users = args.users or (24 if quick else 48)
    n_gpus = args.gpus or (8 if quick else 16)
    hours = args.hours or (2.0 if quick else 8.0)
    t_start = time.perf_counter()
    print(
        f"pool_sim: {users} users in 4 teams on {n_gpus} x 80 GiB GPUs, {hours:g} simulated hours, "
        "seed "
        f"{args.seed}"
    )
    print(
        f"fair share: suspend-idle-after {'off' if suspend is None else f'{suspend:g} s'}; moving "
        "an idle "
        f"session's state (median {costs.state_gib_median:g} GiB) out at {costs.save_gbps:g} GB/s, "
        "back at "
        f"{costs.load_gbps:g} GB/s, "
        f"{costs.session_start:g} s to start its new session; standby copies "
        f"{'off' if costs.standby_after is None else f'after {costs.standby_after:g} s idle'}\n"
    )
    rows = []
    for mode, label in (
        ("fair", "fair share (this policy)"),
        ("whole", "(a) whole GPU per notebook"),
        ("fifo", "(b) FIFO of fractions"),
    ):
        r = simulate(mode, users, n_gpus, hours, args.seed, costs, suspend)
        rows.append((label, r))
    sizes = (
        [4, 8, 12, 16, 20, 24, 28, 32, 36]
        if quick
        else [4, 8, 12, 16, 24, 32, 36, 40, 44, 48, 56, 64, 96]
    )
    team_hours = 1.0 if quick else 4.0
    largest = {
        mode: largest_team(mode, n_gpus, team_hours, args.seed, sizes, costs, suspend)
        for mode in ("fair", "whole", "fifo")
    }
    header = ["metric"] + [label for label, _ in rows]
    table = [
        ["allocated utilization"]
        + [f"{100 * r.alloc_area / (r.horizon * r.gpus):.1f}%" for _, r in rows],
        ["busy utilization"]
        + [f"{100 * r.busy_area / (r.horizon * r.gpus):.1f}%" for _, r in rows],
        ["interactive wait p50"] + [f"{r.pct(50):.1f} s" for _, r in rows],
        ["interactive wait p95"] + [f"{r.pct(95):.1f} s" for _, r in rows],
        ["interactive cells"] + [str(len(r.waits)) for _, r in rows],
        ["cells that waited at all"]
        + [
            f"{100 * sum(1 for w in r.waits if w > 0) / max(1, len(r.waits)):.0f}%" for _, r in rows
        ],
        ["Jain's fairness index"] + [f"{r.jain():.3f}" for _, r in rows],
        ["preemptions / hour (running work)"]
        + [f"{r.preemptions / (r.horizon / 3600):.1f}" for _, r in rows],
        ["idle sessions moved to host / hour"]
        + [f"{r.moved / (r.horizon / 3600):.1f}" for _, r in rows],
        ["... of them from a complete standby copy"]
        + [f"{100 * r.moved_by_copy / r.moved:.0f}%" if r.moved else "-" for _, r in rows],
        ["standby copies written / hour"]
        + [
            f"{r.copy_bytes / 1e9 / (r.horizon / 3600):.0f} GB" if r.copy_bytes else "-"
            for _, r in rows
        ],
        ["host memory held by standby copies, peak"]
        + [f"{r.copy_peak / GiB:.0f} GiB" if r.copy_peak else "-" for _, r in rows],
        [f"largest team, p95 wait < 10 s ({team_hours:g} h runs)"]
        + [str(largest[m]) + " users" for m in ("fair", "whole", "fifo")],
    ]
    widths = [max(len(str(row[i])) for row in [header] + table) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths]] + table:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
    print(
        f"\nlargest team / (a): {largest['fair'] / max(1, largest['whole']):.1f}x (target 3x); "
        "seeds and "
        "costs below\n"
    )
    sensitivity(n_gpus, team_hours, args.seed, 3 * largest["whole"], costs, suspend, quick)
    n_dec_gpus, n_queued = 10_000, (100_000)
    d = decision_time(n_dec_gpus, n_queued, 2000 if quick else 10000, args.seed)
    print(
        f"\nDecision time, {n_dec_gpus:,} GPUs and {n_queued:,} queued requests (2,000 users, 50 "
        "teams), "
        f"{d['decisions']} decisions: p50 {d['p50_ms']:.3f} ms, p99 {d['p99_ms']:.3f} ms, max "
        f"{d['max_ms']:.3f} ms "
        f"(pick + grant + end accounting; target p99 < 1 ms)"
    )
    print(
        f"Best-fit placement of one request over {n_dec_gpus:,} GPUs (packing.place, not "
        "incremental): "
        f"p50 {d['place_p50_ms']:.2f} ms"
    )
    decisions = args.decisions or (200 if quick else 1000)
    scale_tables(n_dec_gpus, 20_000 if quick else n_queued, decisions, args.seed)
    print(f"\nwall time {time.perf_counter() - t_start:.1f} s")
    return 0


def scale_tables(n_gpus: int, n_queued: int, decisions: int, seed: int) -> None:
    """The broker's own pass at scale, a queue view's refresh, and another user's grant against
    a flood."""
    d = pass_time(n_gpus, n_queued, decisions, seed)
    print(
        f"\nThe broker's decisions (Ledger.end of a lease, then the one pass it sets off, all its "
        f"grants included), {n_gpus:,} GPUs, {n_queued:,} requests submitted ({d['refused']:,} "
        f"refused at once as never fitting, {d['queued']:,} waiting), {d['decisions']} decisions "
        f"({d['granted']} grants): p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms, max "
        f"{d['max_ms']:.2f} ms (target p99 < 1 ms); its CPU time p50 {d['cpu_p50_ms']:.2f} ms, "
        f"p99 {d['cpu_p99_ms']:.2f} ms, max {d['cpu_max_ms']:.2f} ms; placements tried per decision p50 "
        f"{d['tries_p50']}, max {d['tries_max']}; a submission (with the never-fits check): p50 "
        f"{d['submit_p50_ms']:.3f} ms, p99 {d['submit_p99_ms']:.3f} ms"
    )
    print(
        f"A queue view's refresh (reasons and estimated starts of the first waiting, 100 or as "
        f"many as 100,000 GPU readings allow, when a view asks; not part of any decision): p50 "
        f"{d['view_p50_ms']:.0f} ms, max "
        f"{d['view_max_ms']:.0f} ms"
    )
    f = flood(n_gpus, 10_000, seed, eta_for=0)
    print(
        f"Flood: one user submits 10,000 requests ({f['flood_submit_s']:.1f} s to submit them and "
        "run their first pass); another user's request then waits for a lease to end: CPU time "
        f"from its submission to its grant {f['quiet_s'] * 1e3:.2f} ms without the flood, "
        f"{f['flood_s'] * 1e3:.2f} ms with it (+{f['delta_s'] * 1e3:.2f} ms; passes "
        f"{f['passes'][0]} and {f['passes'][1]}; target under 1 s)"
    )


if __name__ == "__main__":
    sys.exit(main())
