"""One scheduling pass: grant, in the policy's order, what fits; reclaim and suspend for what is
owed; explain, reserve for and estimate what still waits.

``schedule_pass`` is the whole scheduling decision on plain state (the ledger's ``Packer`` of GPUs
and machines, its ``WaitingRoom`` of requests, the policy's lease book); the broker applies its
grants and preemptions through callbacks, and the simulator (``bench/pool_sim.py``) and the property
tests drive the very same code. The order is ``FairSharePolicy.key`` as at the start of the pass
(``PassState.key``): a request is served, reclaimed for, suspended for, reserved for and explained
exactly as if the whole queue had been sorted and visited; ``waiting.Walk`` only leaves out what
cannot act, so that what can never run, or cannot until the pool changes, costs nothing.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from jupyter_gpu.broker import preemption
from jupyter_gpu.broker.estimates import estimate_waiting
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.model import Allocation, GpuSlot, Request
from jupyter_gpu.broker.waiting import Needs, Room, WaitingRoom, Walk
from jupyter_gpu.common.protocol import RequestSpec

if TYPE_CHECKING:
    from jupyter_gpu.broker.fair_share import LeaseRecord
    from jupyter_gpu.broker.packing import Packer, Placement

EPS = 1e-6
GrantFn = Callable[[Request, "Placement", bool], None]
PreemptFn = Callable[[str, str, Request], None]


class PassState:
    """What one pass knows: the order frozen at its start, the GPUs held for reservations, the
    room it could give, and what can act (``worth``, for ``waiting.Walk``)."""

    def __init__(
        self,
        policy: FairSharePolicy,
        packer: Packer,
        queue: WaitingRoom,
        now: float,
        preempt: PreemptFn | None,
        reserve_share: float,
    ):
        self.policy, self.packer, self.queue, self.now = policy, packer, queue, now
        self.preempt = preempt
        self.configured = policy.quotas.configured
        if policy.limits_loosened:
            packer.mark_all()
            policy.limits_loosened = False
        if packer.gpus:
            policy.reference_bytes = packer.largest_gpu()
        # reservations are sticky (a request keeps the GPUs it was given until it starts), so that
        # the GPUs held for it drain instead of moving to whichever GPU happens to be emptiest at
        # the next pass
        for rid in [rid for rid in policy.reservations if queue.get(rid) is None]:
            _let_go(packer, policy.reservations.pop(rid))
        self.reserved_by: dict[str, str] = {
            g: rid for rid, gs in policy.reservations.items() for g in gs if g in packer.gpus
        }
        self.budget = max(1, int(len(packer.gpus) * reserve_share))
        self._held_team: dict[str, float] = {}  # as at the start, for the frozen order
        self._held_user: dict[str, float] = {}
        self._contexts: dict[str, tuple[float, float]] = {}
        self._rooms: dict[str, float] = {}  # guarantee_room's
        self._plain_context = type(policy).team_context is FairSharePolicy.team_context
        reserving = [r for r in map(queue.get, policy.reservations) if r is not None]
        # (a policy with a key of its own, the simulator's baselines: users opened at once)
        plain_key = type(policy).key is FairSharePolicy.key
        self.look()
        self.walk = Walk(
            queue,
            lambda team: self.context(team)[1],
            self.key,
            self.aged_gang,
            self.worth,
            self.group_worth,
            reserving,
            phase_of=lambda team, spec: 0 if policy.need(spec) <= self.guarantee_room(team) else 1,
            phase_room=self.guarantee_room,
            phase_rooms=self.guarantee_rooms,
            narrow=self.narrow,
            user_ranks=self.user_ranks if plain_key else None,
            beyond_room=self.beyond_room,
            team_shares=self.team_shares,
        )

    # ------------------------------------------------------------------ the frozen order
    def context(self, team: str) -> tuple[float, float]:
        found = self._contexts.get(team)
        if found is None:
            held = self._held_team.get(team)
            found = self._contexts[team] = self.policy.team_context(team, self.now, held)
        return found

    def team_shares(self, teams: list[str]) -> list[float]:
        """``context(team)[1]`` of each of ``teams`` (the teams a phase opens, keyed at once)."""
        contexts = self._contexts
        missing = [t for t in teams if t not in contexts]
        if missing and self._plain_context:
            found = self.policy.team_contexts(missing, self.now, self._held_team)
            contexts.update(zip(missing, found))
        return [self.context(t)[1] for t in teams]

    def guarantee_room(self, team: str) -> float:
        """The most a request of ``team`` may need and still be within its guarantee (the first
        part of ``context``), as at the start of the pass; without the team's decayed use, which
        only its place in the order needs: a team that nothing fits in its guarantee is passed over
        in that phase without being keyed."""
        room = self._rooms.get(team)
        return room if room is not None else self.guarantee_rooms([team])[0]

    def guarantee_rooms(self, teams: list[str]) -> list[float]:
        """``guarantee_room`` of each of ``teams`` (those a phase may open, tested at once)."""
        rooms = self._rooms
        missing = [t for t in teams if t not in rooms]
        if missing:
            if not self._plain_context:  # (a policy with a context of its own: the simulator's)
                found = [self.context(t)[0] for t in missing]
            elif not self.configured:
                found = [math.inf] * len(missing)
            else:  # (held as at the start: ``freeze`` keeps it before a grant changes it)
                found = self.policy.guarantee_rooms(missing, self._held_team)
            rooms.update(zip(missing, found))
        return [rooms[t] for t in teams]

    def key(self, req: Request) -> tuple[Any, ...]:
        return self.policy.key(
            req, self.now, self.context(self.policy.team_of(req)), self._held_user.get(req.user)
        )

    def user_ranks(self, users: list[str]) -> list[tuple[Any, ...]]:
        """The user part of ``key`` of each of ``users`` (as at the start of the pass): the keys of
        a user's requests of a phase (not an aged gang) are (1, phase, its team's share) + this +
        (priority rank, submitted, id)."""
        return self.policy.user_ranks(users, self.now, self._held_user)

    def aged_gang(self, req: Request) -> bool:
        return self.policy.aged_gang(req, self.now)

    def close(self) -> None:
        """The pass is over: let go of the walk. It holds this state's methods and the state
        holds it: without this, the pair and every entry of the walk's heap (thousands at
        100,000 waiting) lived until the cyclic garbage collector found them, and a collection
        that did cost 1-3 ms in the middle of a later decision (docs/benchmarks.md)."""
        del self.walk

    def freeze(self, team: str, user: str) -> None:
        """Remember a team's and a user's holdings before the pass changes them."""
        self._held_team.setdefault(team, self.policy.held_team.get(team, 0.0))
        self._held_user.setdefault(user, self.policy.held_user.get(user, 0.0))

    # ------------------------------------------------------------------ what can act
    def look(self) -> None:
        """The room this pass could give, and whether preemption could add to it.

        The room is that of the workers whose room grew since the last complete pass
        (``Packer.changed_room``): that pass found no place for anything still waiting, so a
        request can only fit where something changed. Whether an idle session could be suspended
        or a borrowed lease reclaimed is read from the lease book's index of when each could be
        (``takeback.TakeBackIndex``: the oldest entries only, not a scan of every lease)."""
        self.room: Room = self.packer.changed_room()
        policy, quotas = self.policy, self.policy.quotas
        after = quotas.suspend_idle_after
        self.suspending = (
            self.preempt is not None
            and after is not None
            and policy.takeback.may_suspend(self.now, after)
        )
        self.reclaiming = (
            self.preempt is not None
            and self.configured
            and policy.takeback.may_reclaim(self.now, quotas.min_run_time, policy.over_guarantee)
        )

    def worth(self, needs: Needs, team: str, user: str | None) -> bool:
        """Could any request of ``team`` (of ``user``) act now? False only when none can: all over
        a limit, none fitting the room, none to reserve for, none to preempt for."""
        policy = self.policy
        smallest = needs.equivalents.smallest()
        limit = policy.quotas.team(team).limit
        if limit is not None and policy.held_team.get(team, 0.0) + smallest > limit + EPS:
            return False
        ulimit = policy.quotas.user_limit(user) if user is not None else None
        if ulimit is not None and policy.held_user.get(user or "", 0.0) + smallest > ulimit + EPS:
            return False
        if len(self.reserved_by) < self.budget and (self.configured or needs.reservable):
            if self.now - needs.submitted.smallest() >= policy.quotas.reserve_after:
                return True
        if (self.suspending and needs.interactive_single) or (self.reclaiming and needs.single):
            return True
        return self.room.admits(needs)

    def narrow(self, needs: Needs, team: str) -> Room | None:
        """The room, when nothing but room can make any of these requests act (none to reserve
        for, none to preempt for): then ``worth`` and ``group_worth`` are False for every user
        and group whose GPU need exceeds it, and the walk looks only at the others (``waiting.
        admitted``). Else None."""
        if len(self.reserved_by) < self.budget and (self.configured or needs.reservable):
            if self.now - needs.submitted.smallest() >= self.policy.quotas.reserve_after:
                return None
        if (self.suspending and needs.interactive_single) or (self.reclaiming and needs.single):
            return None
        return self.room

    def beyond_room(self) -> tuple[Room, set[str]] | None:
        """(The room, the teams that may be owed a reservation), when nothing but room or a
        reservation can make a team's requests act (nothing to preempt for): then ``worth`` is
        False for every other team whose smallest need the room does not admit, and the walk
        opens only the teams the room admits (``waiting.Walk._open_teams``). Else None."""
        if self.suspending or self.reclaiming:
            return None
        if len(self.reserved_by) >= self.budget:
            return self.room, set()
        return self.room, set(self.queue.waited(self.now, self.policy.quotas.reserve_after))

    def group_worth(self, spec: RequestSpec, oldest: float) -> bool:
        """Could a group's requests (of ``spec``, the oldest submitted at ``oldest``) act now?
        The group-level ``worth``: its team and user passed their limits already."""
        policy, single = self.policy, spec.workers == 1 and (spec.gpus or 1) <= 1
        reservable = spec.workers > 1 or spec.gpus is not None
        if len(self.reserved_by) < self.budget and (self.configured or reservable):
            if self.now - oldest >= policy.quotas.reserve_after:
                return True
        if single and (self.reclaiming or (self.suspending and spec.priority == "interactive")):
            return True
        return self.room.admits_spec(spec)

    def held_for_others(self, req: Request) -> set[str]:
        return (
            {g for g, rid in self.reserved_by.items() if rid != req.id}
            if self.reserved_by
            else set()
        )

    def host_fits(self, req: Request) -> preemption.HostFits | None:
        """Whether a GPU's machine has host room for ``req`` once ``victims`` left (None: no
        machine reports host resources, so any does)."""
        if not self.packer.scored:
            return None

        def fits(gpu: GpuSlot, victims: list[LeaseRecord]) -> bool:
            host = self.packer.hosts.get(gpu.worker)
            if host is None:
                return True
            mem, milli = self.packer.host_need(
                req.spec, gpu.worker, [_alloc(gpu, req.spec.need_on(gpu))]
            )
            back_mem = sum(v.host[0] for v in victims)
            back_cpu = sum(v.host[1] for v in victims)
            return mem <= host.free_memory + back_mem and milli <= host.free_cpu_milli + back_cpu

        return fits


def _let_go(packer: Packer, gpus: Iterable[str]) -> None:
    """GPUs held for a request are free for others again: their workers' room grew."""
    for g in gpus:
        slot = packer.gpus.get(g)
        if slot is not None:
            packer.mark(slot.worker)


def _alloc(gpu: GpuSlot, nbytes: int) -> Allocation:
    return Allocation(gpu=gpu.id, index=gpu.index, bytes=nbytes)


def schedule_pass(
    policy: FairSharePolicy,
    queue: WaitingRoom,
    packer: Packer,
    grant: GrantFn,
    preempt: PreemptFn | None = None,
    now: float | None = None,
    eta_for: int = 100,
    reserve_share: float = 0.25,
) -> list[Request]:
    """Grant, in policy order, every queued request that fits; reclaim for guarantees; give the rest
    a reason and an estimated start. Returns the requests it looked at that still wait, in order.

        ``grant(req, placement, preemptible)`` must book the placement (taking ``req`` out of
        ``queue`` and calling ``policy.lease_started``); ``preempt(lease_id, reason, req)`` must
        free the lease (and call ``policy.lease_ended``). Reservations (aged gangs first: they sort
        first) hold at most ``reserve_share`` of the GPUs (at least one), so they cannot idle the
        pool. The first ``eta_for`` waiting requests get their reasons and estimated starts
        refreshed; the others keep what they were told when last looked at.
    """
    now = policy.clock() if now is None else now
    state = PassState(policy, packer, queue, now, preempt, reserve_share)
    try:
        return _walk(state, grant, preempt, eta_for)
    finally:
        state.close()


def _walk(
    state: PassState, grant: GrantFn, preempt: PreemptFn | None, eta_for: int
) -> list[Request]:
    """The pass proper: serve, explain and reserve along the walk."""
    policy, packer, queue, now = state.policy, state.packer, state.queue, state.now
    waiting: list[Request] = []
    state.walk.full = eta_for > 0
    for req in state.walk:
        served = _serve(state, req, grant, preempt)
        if served is None:
            continue
        if served:  # no room for it: say why, and hold GPUs for it once it waited long enough
            _explain(state, req, len(waiting) < eta_for)
        waiting.append(req)
        state.walk.full = len(waiting) < eta_for
        if not state.walk.full and not (served and _may_reserve(state, req)):
            state.walk.skip_group(req)  # the same shape of the same user cannot act either
    _estimate(policy, packer, queue, waiting[:eta_for], now)
    packer.changed = set()  # nothing still waiting fits anywhere: only what changes next counts
    return waiting


def _serve(
    state: PassState, req: Request, grant: GrantFn, preempt: PreemptFn | None
) -> bool | None:
    """Grant ``req`` if it fits (after reclaim or suspension if need be): None. Else True when it
    lacks room, False when a limit holds it back (its reason is set then)."""
    policy = state.policy
    team, need = policy.team_of(req), policy.need(req.spec)
    blocked = policy.limit_reason(req)
    if blocked:
        req.reason = blocked
        return False
    held = state.held_for_others(req)
    within = policy.within_guarantee(team, need)
    placement = state.packer.place(req.spec, held)
    # (``look`` found whether anything could be reclaimed or suspended at all)
    if placement is None and state.reclaiming and within and preempt is not None:
        placement = _make_room(state, req, held, preempt, reclaim=True)
    if placement is None and state.suspending and preempt is not None:
        placement = _make_room(state, req, held, preempt, reclaim=False)
    if placement is None:
        return True
    state.freeze(team, req.user)
    grant(req, placement, state.configured and not within)
    released = policy.reservations.pop(req.id, ())
    _let_go(state.packer, released)
    state.room = state.packer.changed_room()  # what is left for those after it
    for g in released:
        state.reserved_by.pop(g, None)
    if released:  # GPUs held for it are free for the others again
        state.walk.unskip()
    if state.configured and not within and not state.reclaiming:
        state.look()  # a team over its guarantee: its borrowed leases may be reclaimed now
        if state.reclaiming:
            state.walk.revive()
    return None


def _make_room(
    state: PassState, req: Request, held: set[str], preempt: PreemptFn, reclaim: bool
) -> Placement | None:
    """Reclaim borrowed leases (``reclaim``) or suspend idle sessions for ``req``, then place it."""
    policy = state.policy
    gpus = _Avail(state.packer.gpus, held)
    if reclaim:
        plan = preemption.reclaim_plan(policy, req, gpus, state.now, state.host_fits(req))
    else:
        plan = preemption.suspend_plan(policy, req, gpus, state.now, host_fits=state.host_fits(req))
    if not plan:
        return None
    for lease_id, reason in plan:
        rec = policy.leases.get(lease_id)
        if rec is not None:
            state.freeze(rec.team, rec.user)
        preempt(lease_id, reason, req)
    state.look()
    state.walk.revive()
    return state.packer.place(req.spec, held)


class _Avail:
    """The GPUs a request may use (all but those held for others), looked up by id."""

    def __init__(self, gpus: dict[str, GpuSlot], held: set[str]):
        self._gpus, self._held = gpus, held

    def get(self, gpu_id: str) -> GpuSlot | None:
        return None if gpu_id in self._held else self._gpus.get(gpu_id)

    def all(self) -> list[GpuSlot]:
        return [g for g in self._gpus.values() if g.id not in self._held]


def _may_reserve(state: PassState, req: Request) -> bool:
    return len(state.reserved_by) < state.budget and state.policy.should_reserve(req, state.now)


def _explain(state: PassState, req: Request, estimate: bool, reserve_now: bool = True) -> None:
    """The reason ``req`` waits (what is short, when idle sessions will make room, its quota
    standing, GPUs reserved for it), and a reservation when it has waited long enough (unless
    ``reserve_now`` is False: a view's refresh decides nothing)."""
    policy, now = state.policy, state.now
    team, need = policy.team_of(req), policy.need(req.spec)
    held = state.held_for_others(req)
    reason = state.packer.why_waiting(req.spec, held)
    later = (
        preemption.suspend_plan(policy, req, _Avail(state.packer.gpus, held), now, after=0.0)
        if state.preempt is not None and estimate
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
    if state.configured and not policy.within_guarantee(team, need):
        guarantee = policy.quotas.team(team).guarantee
        reason += (
            f" (team {team} holds {policy.held_team.get(team, 0.0):.1f} of its {guarantee:.1f} GPU "
            "guarantee: this runs on idle capacity, preemptible)"
        )
    mine = policy.reservations.get(req.id)
    if not mine and reserve_now and _may_reserve(state, req):
        mine = reserve(req.spec, _Avail(state.packer.gpus, held).all())
        if mine:
            policy.reservations[req.id] = mine
            state.reserved_by.update({g: req.id for g in mine})
    if mine:
        reason += (
            f"; {len(mine)} GPU(s) reserved for it after {now - req.submitted:.0f} s of waiting"
        )
    req.reason = reason


def explain_waiting(
    policy: FairSharePolicy,
    queue: WaitingRoom,
    packer: Packer,
    now: float,
    eta_for: int = 100,
    preempting: bool = True,
    reserve_share: float = 0.25,
) -> list[Request]:
    """The first ``eta_for`` waiting requests in the policy's order, each given its full reason
    (when idle sessions would move out for it) and its estimated start; decides nothing (no
    grant, preemption or reservation). Returns them in order.

    Why apart from ``schedule_pass``: both cost every lease or every GPU per request (2 s at
    10,000 GPUs for 100 requests), and nobody needs them at each event, only when a queue view
    is read (``QueueView.refresh``); in the pass they made every decision wait for them.
    ``preempting``: whether the pool moves idle sessions out (the broker's passes do)."""
    fresh = queue.fresh  # the next pass still owes these their first look
    state = PassState(
        policy, packer, queue, now, _no_preempt if preempting else None, reserve_share
    )
    queue.fresh = fresh
    state.walk.full = True
    waiting: list[Request] = []
    try:
        for req in state.walk if eta_for > 0 else ():
            blocked = policy.limit_reason(req)
            if blocked:
                req.reason = blocked
            else:
                _explain(state, req, estimate=True, reserve_now=False)
            waiting.append(req)
            if len(waiting) >= eta_for:
                break
    finally:
        state.close()
    _estimate(policy, packer, queue, waiting, now)
    return waiting


def _no_preempt(lease_id: str, reason: str, req: Request) -> None:
    raise AssertionError("a view's refresh preempts nothing")  # pragma: no cover


def _estimate(
    policy: FairSharePolicy, packer: Packer, queue: WaitingRoom, waiting: list[Request], now: float
) -> None:
    """Estimated starts of the first waiting requests (``estimates.estimate_waiting``); the others
    have none (those estimated before and no longer first lose theirs)."""
    for rid in queue.estimated - {r.id for r in waiting}:
        req = queue.get(rid)
        if req is not None:
            req.eta, req.eta_basis, req.eta_note = None, None, None
    queue.estimated = {r.id for r in waiting}
    if waiting:
        estimate_waiting(policy, waiting, list(packer.gpus.values()), now, len(waiting))


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
