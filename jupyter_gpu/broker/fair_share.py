"""The fair queue: who goes first when GPUs are short, and what to take back when a guarantee is
owed.

Order (smallest key first):

1. gangs (``--workers N``) that waited longer than ``reserve-after``: they go first and get GPUs reserved,
   so small requests can no longer backfill the GPUs a gang needs (gangs never starve);
2. requests within their team's guarantee before over-quota ones;
3. fair share: the team's (then the user's) GPUs held now plus an exponentially decayed average of what
   it held (half-life ``half-life``), relative to its guarantee: the team that used least for its share first;
4. priority: configured team/user priority, then interactive above batch;
5. age.

When a request does not fit, ``schedule_pass`` first reclaims borrowed capacity for a request
within its team's guarantee (``reclaim_plan``), then, for an interactive request, moves idle
sessions to host memory (``suspend_plan``, after ``suspend-idle-after``).

``schedule_pass`` is the whole scheduling decision on plain state (``GpuSlot``s, ``Request``s and
the policy's lease book) with the real packing; the broker applies its grants and preemptions
through callbacks, and the simulator (``bench/pool_sim.py``) and the property tests drive the
very same code. ``FairQueue`` is the same order kept incrementally, for queues of 100,000
requests.
"""

from __future__ import annotations

import collections
import heapq
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, cast

from jupyter_gpu.broker import packing
from jupyter_gpu.broker.estimates import CellTimes, Progress, estimate_waiting, track_progress
from jupyter_gpu.broker.model import GpuSlot, Request
from jupyter_gpu.broker.quotas import PoolQuotas
from jupyter_gpu.common.protocol import RequestSpec

log = logging.getLogger(__name__)

EPS = 1e-6
PRIORITY_RANK = {"interactive": 0, "batch": 1}
# FairSharePolicy.key: (aged gang?, fits the team's room?, team share, user share, -priority,
# priority rank, submitted, id)
SortKey = tuple[int, int, float, float, int, int, float, str]
MIN_WEIGHT = 0.1  # a team with no guarantee counts as guaranteed this much when shares are compared


@dataclass
class LeaseRecord:
    """What the policy remembers of a granted lease: who holds how much, since when, and on which
    GPUs."""

    id: str
    user: str
    team: str
    gpus: float
    preemptible: bool
    started: float
    allocs: dict[str, int] = field(default_factory=dict)  # GPU id -> bytes
    request: str | None = None
    gang: bool = False
    idle_since: float | None = None
    priority: str = "interactive"
    # bytes the session held when it last went idle (what suspending it moves)
    resident: int | None = None
    # how far its running cell is, when the cell reports step/total
    progress: Progress | None = None


class DecayedAverage:
    """An exponentially weighted average of a step function (GPUs held), updated only when it steps.

    Why: fair share must remember recent use without a periodic job walking every user; the
    integral of a constant held between two events has a closed form, so each grant or end costs
    O(1).
    """

    __slots__ = ("value", "rate", "t")

    def __init__(self, t: float):
        self.value, self.rate, self.t = 0.0, 0.0, t

    def at(self, now: float, lam: float) -> float:
        if now <= self.t:
            return self.value
        d = math.exp(-lam * (now - self.t))
        return self.value * d + self.rate * (1.0 - d)

    def step(self, now: float, lam: float, delta: float) -> None:
        self.value = self.at(now, lam)
        self.t = max(now, self.t)
        self.rate = max(0.0, self.rate + delta)


class FairSharePolicy:
    """The broker's queue policy (see the module docstring); also keeps the lease book. There is one
    policy: quotas, priorities and ``suspend-idle-after`` tune it, and the simulator's baselines
    subclass ``key``."""

    name = "fair-share"

    def __init__(self, quotas: PoolQuotas | None = None, clock: Callable[[], float] = time.time):
        self.quotas = quotas or PoolQuotas()
        self.clock = clock
        self.lam = math.log(2) / max(1.0, self.quotas.half_life)
        self.held_team: dict[str, float] = collections.defaultdict(float)
        self.held_user: dict[str, float] = collections.defaultdict(float)
        self.avg_team: dict[str, DecayedAverage] = {}
        self.avg_user: dict[str, DecayedAverage] = {}
        self.leases: dict[str, LeaseRecord] = {}
        # how long recent cells ran, and when the running ones should end (the queue's estimates)
        self.cells = CellTimes()
        # the pool's largest GPU: what a --memory request is worth
        self.reference_bytes: int | None = None
        self.listeners: list[Callable[[str, str], None]] = []  # (team, user) whose standing changed
        # request id -> GPU ids held for it (see schedule_pass)
        self.reservations: dict[str, set[str]] = {}
        self._priority: dict[str, int] = {}

    # ------------------------------------------------------------------ accounting
    def lease_started(
        self,
        lease_id: str,
        user: str,
        team: str,
        gpus: float,
        preemptible: bool,
        now: float | None = None,
        allocs: dict[str, int] | None = None,
        request: str | None = None,
        gang: bool = False,
        priority: str = "interactive",
        idle: bool = True,
    ) -> LeaseRecord:
        """Count a new lease against its user and team (the broker calls this on every grant, with
        ``idle=False``: a session that is still starting is busy until it says it is idle)."""
        now = self.clock() if now is None else now
        rec = LeaseRecord(
            id=lease_id,
            user=user,
            team=team,
            gpus=gpus,
            preemptible=preemptible,
            started=now,
            allocs=dict(allocs or {}),
            request=request,
            gang=gang,
            idle_since=now if idle else None,
            priority=priority,
        )
        self.leases[lease_id] = rec
        self._step(user, team, now, gpus)
        return rec

    def lease_ended(self, lease_id: str, now: float | None = None) -> LeaseRecord | None:
        rec = self.leases.pop(lease_id, None)
        if rec is None:
            return None
        now = self.clock() if now is None else now
        self._step(rec.user, rec.team, now, -rec.gpus)
        self.cells.lease_ended(lease_id)
        return rec

    def lease_state(
        self,
        lease_id: str,
        state: str,
        now: float | None = None,
        resident: int | None = None,
        step: float | None = None,
        total: float | None = None,
    ) -> None:
        """A lease went idle (with what it holds, when measured), started running a cell (idle
        sessions are reclaimed first, and suspended smallest first), or its running cell reported
        how far it is (``step`` of ``total``: the queue's estimates use it)."""
        rec = self.leases.get(lease_id)
        if rec is not None:
            now = self.clock() if now is None else now
            rec.idle_since = None if state == "running" else (rec.idle_since or now)
            if resident is not None:
                rec.resident = int(resident)
            rec.progress = track_progress(rec.progress, state, now, step, total)
            self.cells.cell_state(lease_id, rec.user, state, now)

    def _step(self, user: str, team: str, now: float, delta: float) -> None:
        self.held_team[team] += delta
        self.held_user[user] += delta
        if abs(self.held_team[team]) < EPS:
            self.held_team[team] = 0.0
        if abs(self.held_user[user]) < EPS:
            self.held_user[user] = 0.0
        self.avg_team.setdefault(team, DecayedAverage(now)).step(now, self.lam, delta)
        self.avg_user.setdefault(user, DecayedAverage(now)).step(now, self.lam, delta)
        for listener in self.listeners:
            listener(team, user)

    # ------------------------------------------------------------------ quotas
    def team_of(self, req: Request) -> str:
        return req.team or self.quotas.team_of(req.user)

    def need(self, spec: RequestSpec) -> float:
        """The request in GPUs (a --memory request is measured against the pool's largest GPU)."""
        return spec.gpu_equivalents(self.reference_bytes)

    def within_guarantee(self, team: str, need: float) -> bool:
        if not self.quotas.configured:
            return True
        return self.held_team.get(team, 0.0) + need <= self.quotas.team(team).guarantee + EPS

    def over_guarantee(self, team: str) -> float:
        """How far ``team`` is over its guarantee now (0 when within)."""
        if not self.quotas.configured:
            return 0.0
        return max(0.0, self.held_team.get(team, 0.0) - self.quotas.team(team).guarantee)

    def limit_reason(self, req: Request) -> str | None:
        """Why a limit holds ``req`` back now (team or user quota full), or None."""
        team, need = self.team_of(req), self.need(req.spec)
        limit = self.quotas.team(team).limit
        held = self.held_team.get(team, 0.0)
        if limit is not None and held + need > limit + EPS:
            return f"waiting: team quota full ({held:.1f}/{limit:.1f} GPU)"
        ulimit = self.quotas.user_limit(req.user)
        uheld = self.held_user.get(req.user, 0.0)
        if ulimit is not None and uheld + need > ulimit + EPS:
            return f"waiting: your quota full ({uheld:.1f}/{ulimit:.1f} GPU)"
        return None

    def never_within_limits(self, user: str, spec: RequestSpec) -> str | None:
        """Why ``spec`` can never be granted under the limits (refused at once), or None."""
        team = self.quotas.team_of(user)
        need = self.need(spec)
        limit = self.quotas.team(team).limit
        if limit is not None and need > limit + EPS:
            return (
                f"it asks for {need:g} GPU but team {team}'s limit is {limit:g} GPU. Ask for less, "
                "or ask "
                "the pool's admin to raise the limit."
            )
        ulimit = self.quotas.user_limit(user)
        if ulimit is not None and need > ulimit + EPS:
            return (
                f"it asks for {need:g} GPU but your limit is {ulimit:g} GPU. Ask for less, or ask "
                "the "
                "pool's admin to raise it."
            )
        return None

    def share(self, team: str, user: str, now: float) -> tuple[float, float]:
        """(team share, user share): GPUs held now plus decayed past use, relative to the
        guarantee."""
        weight = (
            max(self.quotas.team(team).guarantee, MIN_WEIGHT) if self.quotas.configured else 1.0
        )
        avg_t = self.avg_team.get(team)
        avg_u = self.avg_user.get(user)
        t = (self.held_team.get(team, 0.0) + (avg_t.at(now, self.lam) if avg_t else 0.0)) / weight
        u = self.held_user.get(user, 0.0) + (avg_u.at(now, self.lam) if avg_u else 0.0)
        return t, u

    # ------------------------------------------------------------------ order
    def aged_gang(self, req: Request, now: float) -> bool:
        return req.spec.workers > 1 and now - req.submitted >= self.quotas.reserve_after

    def team_context(self, team: str, now: float) -> tuple[float, float]:
        """(room: the most a request of ``team`` may need and still be within its guarantee, team
        share); computed once per team when many of its requests are keyed."""
        held = self.held_team.get(team, 0.0)
        if self.quotas.configured:
            g = self.quotas.team(team).guarantee
            room, weight = g - held + EPS, max(g, MIN_WEIGHT)
        else:
            room, weight = math.inf, 1.0
        avg_t = self.avg_team.get(team)
        return room, round((held + (avg_t.at(now, self.lam) if avg_t else 0.0)) / weight, 9)

    def key(self, req: Request, now: float, context: tuple[float, float] | None = None) -> SortKey:
        """The sort key of the module docstring (smaller is served first)."""
        room, share_t = context or self.team_context(self.team_of(req), now)
        avg_u = self.avg_user.get(req.user)
        share_u = self.held_user.get(req.user, 0.0) + (avg_u.at(now, self.lam) if avg_u else 0.0)
        prio = self._priority.get(req.user)
        if prio is None:
            prio = self._priority[req.user] = self.quotas.priority(req.user)
        spec = req.spec
        return (
            0 if spec.workers > 1 and now - req.submitted >= self.quotas.reserve_after else 1,
            0 if self.need(spec) <= room else 1,
            share_t,
            round(share_u, 9),
            -prio,
            PRIORITY_RANK.get(spec.priority, 1),
            req.submitted,
            req.id,
        )

    def order(self, queue: list[Request]) -> list[Request]:
        """The queue sorted by ``key``: the first request is the one to serve first."""
        now = self.clock()
        return sorted(queue, key=lambda r: self.key(r, now))

    def should_reserve(self, req: Request, now: float) -> bool:
        """Aged gangs, aged whole-GPU requests and aged within-guarantee requests get GPUs held for
        them."""
        if now - req.submitted < self.quotas.reserve_after:
            return False
        if req.spec.workers > 1 or req.spec.gpus is not None:
            return True
        return self.quotas.configured and self.within_guarantee(
            self.team_of(req), self.need(req.spec)
        )

    # ------------------------------------------------------------------ reclaim
    def reclaim_plan(
        self, req: Request, gpus: list[GpuSlot], now: float
    ) -> list[tuple[str, str]] | None:
        """Over-quota leases to end so that the within-guarantee ``req`` fits: idle ones first,
        then running preemptible ones, never one younger than ``min-run-time`` (nor one granted
        this very instant: no grant-then-reclaim churn within a pass), never a gang's rank. None
        if no plan."""
        spec = req.spec
        if spec.workers > 1 or (spec.gpus or 1) > 1:
            return None  # gangs and multi-GPU sessions wait for reservations instead
        team = self.team_of(req)
        over = {t: self.over_guarantee(t) for t in {r.team for r in self.leases.values()}}
        candidates = {
            r.id: r
            for r in self.leases.values()
            if r.preemptible
            and not r.gang
            and r.team != team
            and over.get(r.team, 0) > EPS
            and now - r.started >= self.quotas.min_run_time
            and r.started < now
        }
        if not candidates:
            return None

        def cost(gpu: GpuSlot, victims: list[LeaseRecord]) -> tuple[int, int, str]:
            # fewest running
            return sum(1 for v in victims if v.idle_since is None), len(victims), gpu.id

        # idle first, then the team furthest over, then the youngest; a team stops losing leases
        # once it is no longer over (its remaining leases are its guarantee)
        best = min(
            (
                (cost(gpu, victims), victims)
                for gpu, victims in _victims_by_gpu(
                    spec,
                    gpus,
                    candidates,
                    order=lambda r: (r.idle_since is None, -over[r.team], -r.started),
                    budget=over,
                )
            ),
            key=lambda p: p[0],
            default=None,
        )
        if best is None:
            return None
        plan = []
        for rec in best[1]:
            state = "idle" if rec.idle_since is not None else "running preemptible work"
            plan.append(
                (
                    rec.id,
                    f"reclaimed for a request within team {team}'s guarantee: team {rec.team} was "
                    f"over its guarantee ({self.held_team[rec.team]:.2f}/"
                    f"{self.quotas.team(rec.team).guarantee:.2f} GPU) and this session was {state} "
                    "on borrowed, preemptible capacity",
                )
            )
        return plan

    def suspend_plan(
        self, req: Request, gpus: list[GpuSlot], now: float, after: float | None = None
    ) -> list[tuple[str, str]] | None:
        """Idle sessions to move to host memory so that the interactive ``req`` fits now.

        Why: an idle session holds GPU memory while its owner reads and types; a person
        waiting on a cell should not wait for that. Any team's session qualifies once idle
        for ``suspend-idle-after`` (its owner's next cell reads the variables back, and a
        within-guarantee owner reclaims room for that), never a gang's rank, a session still
        starting, or one granted this very instant. The waiting cell waits for the sessions
        it displaces to write their state out, so of the GPUs where enough could move, the
        one where the largest of them holds least is chosen (what each held when it last
        went idle, as its session measured it; its lease's size when unknown), then the one
        whose sessions are least likely to be back soon (idle longest). Batch work never
        suspends anybody: it waits for free memory. None if no plan (or suspension is off).
        ``after`` overrides the idle time required (0: the plan that today's idle sessions
        will allow once idle long enough, for the reason a request waits).
        """
        if self.quotas.suspend_idle_after is None:
            return None
        after = self.quotas.suspend_idle_after if after is None else after
        spec = req.spec
        if spec.workers > 1 or (spec.gpus or 1) > 1 or spec.priority != "interactive":
            return None
        candidates = {
            r.id: r
            for r in self.leases.values()
            if not r.gang
            and r.idle_since is not None
            and now - r.idle_since >= after
            and r.started < now
        }
        if not candidates:
            return None

        def cost(gpu: GpuSlot, victims: list[LeaseRecord]) -> tuple[int, float, str]:
            # the largest state to write out, then the chance that a session runs its next cell soon
            # (it falls the longer the session has been idle)
            largest = max(
                v.resident if v.resident is not None else v.allocs.get(gpu.id, 0) for v in victims
            )
            # every candidate is idle: idle_since is set
            soon = sum(1.0 / (1.0 + now - cast(float, v.idle_since)) for v in victims)
            return largest, round(soon, 6), gpu.id

        best = min(
            (
                (cost(gpu, victims), victims)
                for gpu, victims in _victims_by_gpu(
                    spec, gpus, candidates, order=lambda r: (r.idle_since, r.id)
                )
            ),
            key=lambda p: p[0],
            default=None,
        )
        if best is None:
            return None
        return [
            (
                rec.id,
                f"suspended after {now - cast(float, rec.idle_since):.0f} s idle: {req.user}'s cell "
                "was waiting "
                "for the GPU",
            )
            for rec in best[1]
        ]

    def idle_expired(self, now: float) -> list[str]:
        """Leases idle for longer than the admin ``idle-timeout`` (none when it is unset), never a
        gang's rank: the ranks of a ``--workers`` run sit idle while the others' sessions start
        (seconds, on a busy machine), and their kernel releases them all when the run ends."""
        limit = self.quotas.idle_timeout
        if not limit:
            return []
        return [
            r.id
            for r in self.leases.values()
            if not r.gang and r.idle_since is not None and now - r.idle_since > limit
        ]


def _victims_by_gpu(
    spec: RequestSpec,
    gpus: list[GpuSlot],
    candidates: dict[str, LeaseRecord],
    order: Callable[[LeaseRecord], tuple[Any, ...]],
    budget: dict[str, float] | None = None,
) -> Iterable[tuple[GpuSlot, list[LeaseRecord]]]:
    """Each GPU where ``spec`` fits once some of ``candidates`` leave, with the leases that must
    leave: all of the GPU's leases for whole GPUs (so all must be candidates), else candidates in
    ``order`` until the request fits. With ``budget`` (team -> GPUs it may still lose), a lease
    whose team has none left stays. Shared by reclaim (for guarantees) and suspension (for waiting
    cells), which differ only in who may leave, in what order, and what a GPU's plan costs."""
    for gpu in gpus:
        need = spec.need_on(gpu)
        if need > gpu.total_bytes:
            continue
        # in id order, not the set's: ties in ``order`` must not depend on the process's string hash
        # seed
        on_gpu = [candidates[lid] for lid in sorted(gpu.leases) if lid in candidates]
        if spec.gpus is not None:
            if on_gpu and len(on_gpu) == len(gpu.leases):
                yield gpu, on_gpu
            continue
        on_gpu.sort(key=order)
        free, victims, left = gpu.free_bytes, [], dict(budget or {})
        for rec in on_gpu:
            if free >= need:
                break
            if budget is not None:
                if left[rec.team] <= EPS:
                    continue
                left[rec.team] -= rec.gpus
            victims.append(rec)
            free += rec.allocs.get(gpu.id, 0)
        if victims and free >= need:
            yield gpu, victims


# ---------------------------------------------------------------------- one scheduling pass

Placement = packing.Placement
GrantFn = Callable[[Request, Placement, bool], None]
PreemptFn = Callable[[str, str, Request], None]


def schedule_pass(
    policy: FairSharePolicy,
    queue: list[Request],
    gpus: Iterable[GpuSlot],
    grant: GrantFn,
    preempt: PreemptFn | None = None,
    now: float | None = None,
    eta_for: int = 100,
    reserve_share: float = 0.25,
) -> list[Request]:
    """Grant, in policy order, every queued request that fits; reclaim for guarantees; give the rest
    a reason and an estimated start. Returns the requests still waiting, in order.

        ``grant(req, placement, preemptible)`` must book the placement on the GpuSlots (and call
        ``policy.lease_started``); ``preempt(lease_id, reason, req)`` must free the lease (and call
        ``policy.lease_ended``). Requests granted here are the caller's to take out of its queue.
        Reservations (aged gangs first: they sort first) hold at most ``reserve_share`` of the GPUs
        (at least one), so they cannot idle the pool.
    """
    now = policy.clock() if now is None else now
    gpus = list(gpus)
    if gpus:
        policy.reference_bytes = max(g.total_bytes for g in gpus)
    configured = policy.quotas.configured
    # reservations are sticky (a request keeps the GPUs it was given until it starts), so that the
    # GPUs held for it drain instead of moving to whichever GPU happens to be emptiest at the next
    # pass
    live = {r.id for r in queue}
    ids = {g.id for g in gpus}
    for rid in [rid for rid in policy.reservations if rid not in live]:
        del policy.reservations[rid]
    reserved_by: dict[str, str] = {
        g: rid for rid, gs in policy.reservations.items() for g in gs if g in ids
    }
    waiting: list[Request] = []
    for req in policy.order(queue):
        team, need = policy.team_of(req), policy.need(req.spec)
        blocked = policy.limit_reason(req)
        if blocked:
            req.reason = blocked
            waiting.append(req)
            continue
        avail = (
            [g for g in gpus if reserved_by.get(g.id, req.id) == req.id] if reserved_by else gpus
        )
        within = policy.within_guarantee(team, need)
        placement = packing.place(req.spec, avail)
        if placement is None and configured and within and preempt is not None:
            plan = policy.reclaim_plan(req, avail, now)
            if plan:
                for lease_id, reason in plan:
                    preempt(lease_id, reason, req)
                placement = packing.place(req.spec, avail)
        if placement is None and preempt is not None:
            plan = policy.suspend_plan(req, avail, now)
            if plan:
                for lease_id, reason in plan:
                    preempt(lease_id, reason, req)
                placement = packing.place(req.spec, avail)
        if placement is not None:
            grant(req, placement, configured and not within)
            for g in policy.reservations.pop(req.id, ()):
                reserved_by.pop(g, None)
            continue
        reason = packing.why_waiting(req.spec, avail or gpus)
        later = (
            policy.suspend_plan(req, avail, now, after=0.0)
            if preempt is not None and len(waiting) < eta_for
            else None
        )
        if later:
            assert policy.quotas.suspend_idle_after is not None  # there is no plan without it
            idle = [policy.leases[lid].idle_since for lid, _ in later]
            at = max(now if t is None else t for t in idle) + policy.quotas.suspend_idle_after
            reason += (
                f"; {len(later)} idle session(s) there move to host memory for it in "
                f"{max(0.0, at - now):.0f} s if they stay idle"
            )
        if configured and not within:
            guarantee = policy.quotas.team(team).guarantee
            reason += (
                f" (team {team} holds {policy.held_team.get(team, 0.0):.1f} of its {guarantee:.1f} GPU "
                "guarantee: "
                "this runs on idle capacity, preemptible)"
            )
        mine = policy.reservations.get(req.id)
        if (
            not mine
            and policy.should_reserve(req, now)
            and len(reserved_by) < max(1, int(len(gpus) * reserve_share))
        ):
            mine = reserve(req.spec, avail)
            if mine:
                policy.reservations[req.id] = mine
                reserved_by.update({g: req.id for g in mine})
        if mine:
            reason += (
                f"; {len(mine)} GPU(s) reserved for it after {now - req.submitted:.0f} s of waiting"
            )
        req.reason = reason
        waiting.append(req)
    estimate_waiting(policy, waiting, gpus, now, eta_for)
    return waiting


def reserve(spec: RequestSpec, gpus: list[GpuSlot]) -> set[str]:
    """The GPUs to hold for ``spec``: those closest to fitting it (most free memory), one per
    rank."""
    ranks = spec.workers * (int(spec.gpus) if spec.gpus and spec.workers == 1 else 1)
    able = [g for g in gpus if spec.need_on(g) <= g.total_bytes]
    able.sort(key=lambda g: (-g.free_bytes, len(g.leases), g.id))
    if spec.gpus is not None and spec.workers == 1:
        by_worker: dict[str, list[GpuSlot]] = collections.defaultdict(list)
        for g in able:
            by_worker[g.worker].append(g)
        fits = [gs for gs in by_worker.values() if len(gs) >= ranks]
        return {g.id for g in fits[0][:ranks]} if fits else set()
    return {g.id for g in able[:ranks]}


# ---------------------------------------------------------------------- the incremental queue


class FairQueue:
    """The policy's order kept incrementally: ``best()`` costs about (teams + users of one team),
    not a sort of the whole queue, which is what makes 100,000 queued requests affordable.

        Requests are grouped per user (a heap by priority and age) and users per team; each team
        caches its best user and recomputes it only when something of that team changed (a grant, an
        end, a request added or removed) or after ``refresh`` seconds (decay slowly reorders users).
        Aged gangs are kept in a heap of their own so they go first without a scan.
    """

    def __init__(self, policy: FairSharePolicy, refresh: float = 5.0):
        self.policy = policy
        self.refresh = refresh
        # user -> heap of (rank, submitted, id, req)
        self._users: dict[str, list[tuple[int, float, str, Request]]] = {}
        self._team_users: dict[str, set[str]] = collections.defaultdict(set)
        # team -> (at, key, user)
        self._team_best: dict[str, tuple[float, SortKey | None, str | None]] = {}
        self._gangs: list[tuple[float, str, Request]] = []
        self._live: dict[str, Request] = {}
        policy.listeners.append(self._changed)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, req: Request) -> bool:
        return req.id in self._live

    def _changed(self, team: str, user: str) -> None:
        self._team_best.pop(team, None)

    def add(self, req: Request) -> None:
        team = self.policy.team_of(req)
        self._live[req.id] = req
        heapq.heappush(
            self._users.setdefault(req.user, []),
            (PRIORITY_RANK.get(req.spec.priority, 1), req.submitted, req.id, req),
        )
        self._team_users[team].add(req.user)
        if req.spec.workers > 1:
            heapq.heappush(self._gangs, (req.submitted, req.id, req))
        self._team_best.pop(team, None)

    def remove(self, req: Request) -> None:
        if self._live.pop(req.id, None) is not None:
            self._team_best.pop(self.policy.team_of(req), None)

    def _head(self, user: str) -> Request | None:
        heap = self._users.get(user)
        while heap and heap[0][2] not in self._live:
            heapq.heappop(heap)
        return heap[0][3] if heap else None

    def _best_of_team(
        self, team: str, now: float, may_refresh: bool
    ) -> tuple[SortKey | None, str | None]:
        cached = self._team_best.get(team)
        if cached is not None and (not may_refresh or now - cached[0] < self.refresh):
            return cached[1], cached[2]
        best_key, best_user = None, None
        users = self._team_users.get(team, set())
        context = self.policy.team_context(team, now)
        for user in list(users):
            head = self._head(user)
            if head is None:
                users.discard(user)
                continue
            k = self.policy.key(head, now, context)
            if best_key is None or k < best_key:
                best_key, best_user = k, user
        self._team_best[team] = (now, best_key, best_user)
        return best_key, best_user

    def best(self, now: float | None = None) -> Request | None:
        """The request to serve next, as ``policy.order`` would put it first."""
        now = self.policy.clock() if now is None else now
        while self._gangs and self._gangs[0][1] not in self._live:
            heapq.heappop(self._gangs)
        if self._gangs and self.policy.aged_gang(self._gangs[0][2], now):
            return self._gangs[0][2]
        best_key, best_user = None, None
        # stale (not changed) teams are refreshed one per decision, so no decision pays for all
        refresh = 1
        for team in list(self._team_users):
            cached = self._team_best.get(team)
            stale = cached is not None and now - cached[0] >= self.refresh
            k, user = self._best_of_team(team, now, may_refresh=stale and refresh > 0)
            refresh -= stale
            if k is not None and (best_key is None or k < best_key):
                best_key, best_user = k, user
        return self._head(best_user) if best_user is not None else None

    def pop(self, now: float | None = None) -> Request | None:
        req = self.best(now)
        if req is not None:
            self.remove(req)
        return req

    def ordered(self, now: float | None = None) -> list[Request]:
        """Every queued request in order (a full sort: for small queues and for checking
        ``best``)."""
        return self.policy.order(list(self._live.values()))
