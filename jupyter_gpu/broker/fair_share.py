"""The fair queue: who goes first when GPUs are short; the lease book it is counted from.

Order (smallest key first):

1. gangs (``--workers N``) that waited longer than ``reserve-after``: they go first and get GPUs reserved,
   so small requests can no longer backfill the GPUs a gang needs (gangs never starve);
2. requests within their team's guarantee before over-quota ones;
3. fair share: the team's (then the user's) GPUs held now plus an exponentially decayed average of what
   it held (half-life ``half-life``), relative to its guarantee: the team that used least for its share first;
4. priority: configured team/user priority, then interactive above batch;
5. age.

A scheduling pass (``scheduling.py``) serves requests in this order; when one does not fit, it
reclaims borrowed capacity or suspends idle sessions (``preemption.py``), which reads the policy's
indexes of idle and of preemptible leases. ``FairQueue`` is the same order kept incrementally.
"""

from __future__ import annotations

import collections
import heapq
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from jupyter_gpu.broker.estimates import CellTimes, Progress, track_progress
from jupyter_gpu.broker.model import Request
from jupyter_gpu.broker.quotas import PoolQuotas
from jupyter_gpu.broker.takeback import TakeBackIndex
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
    host: tuple[int, int] = (0, 0)  # host memory and thousandths of a core it holds


def _quantized(share: float) -> float:
    """``share`` to the nearest billionth: float noise in decayed averages does not split ties
    between teams or users that used the same (``round(share, 9)`` did this at twice the cost,
    and a pass computes one for each team and user it keys). Shares are never negative."""
    return int(share * 1e9 + 0.5) / 1e9


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
        # request id -> GPU ids held for it (see scheduling.py)
        self.reservations: dict[str, set[str]] = {}
        self._priority: dict[str, int] = {}
        # leases that may be idle, and the preemptible ones: what preemption.py chooses from
        self.idle: set[str] = set()
        self.preemptible: set[str] = set()
        # bumped by every change to the lease book (a lease started, ended, went idle or busy):
        # what a queue view caches against (``queue_view.py``)
        self.version = 0
        # the idle and the borrowed leases, sorted by when they could be taken back: whether a
        # pass may suspend or reclaim at all (``scheduling.PassState.look``)
        self.takeback = TakeBackIndex(self.leases)
        # a lease of a team or user with a limit ended: a request the limit held back may fit
        # anywhere now, not only where room grew (the next pass looks everywhere)
        self.limits_loosened = False

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
        host: tuple[int, int] = (0, 0),
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
            host=host,
        )
        self.leases[lease_id] = rec
        self.version += 1
        if idle:
            self.idle.add(lease_id)
        if preemptible:
            self.preemptible.add(lease_id)
        self.takeback.started(rec)
        self._step(user, team, now, gpus)
        return rec

    def lease_ended(self, lease_id: str, now: float | None = None) -> LeaseRecord | None:
        rec = self.leases.pop(lease_id, None)
        if rec is None:
            return None
        self.version += 1
        self.idle.discard(lease_id)
        self.takeback.ended(rec)
        limit = self.quotas.team(rec.team).limit
        if limit is not None or self.quotas.user_limit(rec.user) is not None:
            self.limits_loosened = True
        self.preemptible.discard(lease_id)
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
            self.version += 1
            now = self.clock() if now is None else now
            rec.idle_since = None if state == "running" else (rec.idle_since or now)
            (self.idle.discard if state == "running" else self.idle.add)(lease_id)
            self.takeback.idle_changed(rec)
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

    def team_context(self, team: str, now: float, held: float | None = None) -> tuple[float, float]:
        """(room: the most a request of ``team`` may need and still be within its guarantee, team
        share); computed once per team when many of its requests are keyed. ``held`` overrides
        what the team holds now (a pass orders by what it held when the pass began)."""
        return self.team_contexts([team], now, {} if held is None else {team: held})[0]

    def team_contexts(
        self, teams: Iterable[str], now: float, held: Mapping[str, float]
    ) -> list[tuple[float, float]]:
        """``team_context`` of each of ``teams`` in one loop (a pass keys the few dozen teams a
        phase opens at once: a call each cost a tenth of a decision at 10,000 GPUs); ``held``
        overrides what a team holds now."""
        held_now, averages, lam = self.held_team, self.avg_team, self.lam
        configured, team_quota = self.quotas.configured, self.quotas.team
        found = []
        for team in teams:
            h = held.get(team)
            if h is None:
                h = held_now.get(team, 0.0)
            if configured:
                g = team_quota(team).guarantee
                room, weight = g - h + EPS, max(g, MIN_WEIGHT)
            else:
                room, weight = math.inf, 1.0
            avg = averages.get(team)
            if avg is not None:
                h += avg.at(now, lam)
            found.append((room, _quantized(h / weight)))
        return found

    def guarantee_rooms(self, teams: Iterable[str], held: Mapping[str, float]) -> list[float]:
        """The first part of ``team_context`` of each of ``teams`` (quotas configured), without
        the decayed use: a phase of a pass reads it for every team the room admits, and keys only
        those with something that fits; ``held`` overrides what a team holds now."""
        held_now, team_quota = self.held_team, self.quotas.team
        found = []
        for team in teams:
            h = held.get(team)
            if h is None:
                h = held_now.get(team, 0.0)
            found.append(team_quota(team).guarantee - h + EPS)
        return found

    def key(
        self,
        req: Request,
        now: float,
        context: tuple[float, float] | None = None,
        user_held: float | None = None,
    ) -> SortKey:
        """The sort key of the module docstring (smaller is served first); ``user_held`` overrides
        what the user holds now."""
        room, share_t = context or self.team_context(self.team_of(req), now)
        share_u, prio = self.user_rank(req.user, now, user_held)
        spec = req.spec
        return (
            0 if spec.workers > 1 and now - req.submitted >= self.quotas.reserve_after else 1,
            0 if self.need(spec) <= room else 1,
            share_t,
            share_u,
            prio,
            PRIORITY_RANK.get(spec.priority, 1),
            req.submitted,
            req.id,
        )

    def user_rank(self, user: str, now: float, user_held: float | None = None) -> tuple[float, int]:
        """The user's part of ``key``: (user share, -priority)."""
        return self.user_ranks([user], now, {} if user_held is None else {user: user_held})[0]

    def user_ranks(
        self, users: Iterable[str], now: float, held: Mapping[str, float]
    ) -> list[tuple[float, int]]:
        """``user_rank`` of each of ``users`` in one loop (a pass keys the users of each team it
        opens at once); ``held`` overrides what a user holds now."""
        held_now, averages, lam, priorities = (
            self.held_user,
            self.avg_user,
            self.lam,
            self._priority,
        )
        found = []
        for user in users:
            h = held.get(user)
            if h is None:
                h = held_now.get(user, 0.0)
            avg = averages.get(user)
            if avg is not None:
                h += avg.at(now, lam)
            prio = priorities.get(user)
            if prio is None:
                prio = priorities[user] = self.quotas.priority(user)
            found.append((_quantized(h), -prio))
        return found

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

    # ------------------------------------------------------------------ idle leases
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
