"""What to take back when a request does not fit: reclaim for guarantees, suspension for waiting
cells.

When a request does not fit, the scheduling pass (``scheduling.py``) first reclaims borrowed
capacity for a request within its team's guarantee (``reclaim_plan``), then, for an interactive
request, moves idle sessions to host memory (``suspend_plan``, after ``suspend-idle-after``). Both
choose the GPU where making room costs least and return the leases to end with the reason their
owners read.

Candidates come from the policy's indexes of idle and of preemptible leases (not a scan of every
lease), and only GPUs holding candidates are looked at, so a plan costs what could be taken back,
not the pool's size. Room on a GPU is only room if the machine's host memory and cores fit too
(``host_fits``): the leases that leave give theirs back, and no more are taken to make host room.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, cast

from jupyter_gpu.broker.model import GpuSlot, Request
from jupyter_gpu.common.protocol import RequestSpec

if TYPE_CHECKING:
    from jupyter_gpu.broker.fair_share import FairSharePolicy, LeaseRecord

EPS = 1e-6
Plan = list[tuple[str, str]]  # (lease id, why it is taken back)
HostFits = Callable[[GpuSlot, list["LeaseRecord"]], bool]


class Gpus(Protocol):
    """The GPUs a request may use, by id (a dict of them, or all but those held for others)."""

    def get(self, gpu_id: str) -> GpuSlot | None: ...


def reclaim_candidates(
    policy: FairSharePolicy, team: str, now: float, over: dict[str, float]
) -> dict[str, LeaseRecord]:
    """Over-quota leases that may be taken back for a request of ``team``: preemptible, no gang's
    rank, another team's, that team over its guarantee, older than ``min-run-time`` and not
    granted this very instant (no grant-then-reclaim churn within a pass)."""
    out = {}
    for lid in list(policy.preemptible):
        r = policy.leases.get(lid)
        if r is None:
            continue
        if (
            r.preemptible
            and not r.gang
            and r.team != team
            and over.get(r.team, 0) > EPS
            and now - r.started >= policy.quotas.min_run_time
            and r.started < now
        ):
            out[r.id] = r
    return out


def reclaim_plan(
    policy: FairSharePolicy,
    req: Request,
    gpus: Gpus,
    now: float,
    host_fits: HostFits | None = None,
) -> Plan | None:
    """Over-quota leases to end so that the within-guarantee ``req`` fits: idle ones first,
    then running preemptible ones (see ``reclaim_candidates``). None if no plan."""
    spec = req.spec
    if spec.workers > 1 or (spec.gpus or 1) > 1:
        return None  # gangs and multi-GPU sessions wait for reservations instead
    team = policy.team_of(req)
    teams = {policy.leases[lid].team for lid in policy.preemptible if lid in policy.leases}
    over = {t: policy.over_guarantee(t) for t in teams}
    candidates = reclaim_candidates(policy, team, now, over)
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
            for gpu, victims in victims_by_gpu(
                spec,
                gpus,
                candidates,
                order=lambda r: (r.idle_since is None, -over[r.team], -r.started),
                budget=over,
                host_fits=host_fits,
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
                f"over its guarantee ({policy.held_team[rec.team]:.2f}/"
                f"{policy.quotas.team(rec.team).guarantee:.2f} GPU) and this session was {state} "
                "on borrowed, preemptible capacity",
            )
        )
    return plan


def suspend_candidates(policy: FairSharePolicy, now: float, after: float) -> dict[str, LeaseRecord]:
    """Idle sessions that may move to host memory: idle for ``after`` seconds, no gang's rank, not
    granted this very instant."""
    out = {}
    for lid in list(policy.idle):
        r = policy.leases.get(lid)
        if r is None:
            continue
        if (
            not r.gang
            and r.idle_since is not None
            and now - r.idle_since >= after
            and r.started < now
        ):
            out[r.id] = r
    return out


def suspend_plan(
    policy: FairSharePolicy,
    req: Request,
    gpus: Gpus,
    now: float,
    after: float | None = None,
    host_fits: HostFits | None = None,
) -> Plan | None:
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
    if policy.quotas.suspend_idle_after is None:
        return None
    after = policy.quotas.suspend_idle_after if after is None else after
    spec = req.spec
    if spec.workers > 1 or (spec.gpus or 1) > 1 or spec.priority != "interactive":
        return None
    candidates = suspend_candidates(policy, now, after)
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
            for gpu, victims in victims_by_gpu(
                spec, gpus, candidates, order=lambda r: (r.idle_since, r.id), host_fits=host_fits
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


def victims_by_gpu(
    spec: RequestSpec,
    gpus: Gpus,
    candidates: dict[str, LeaseRecord],
    order: Callable[[LeaseRecord], tuple[Any, ...]],
    budget: dict[str, float] | None = None,
    host_fits: HostFits | None = None,
) -> Iterable[tuple[GpuSlot, list[LeaseRecord]]]:
    """Each GPU of ``gpus`` where ``spec`` fits once some of ``candidates`` leave, with the leases
    that must leave: all of the GPU's leases for whole GPUs (so all must be candidates), else
    candidates in ``order`` until the request fits. With ``budget`` (team -> GPUs it may still
    lose), a lease whose team has none left stays. Only GPUs that hold a candidate can qualify.
    Shared by reclaim (for guarantees) and suspension (for waiting cells), which differ only in
    who may leave, in what order, and what a GPU's plan costs."""
    holding = sorted({gpu_id for r in candidates.values() for gpu_id in r.allocs})
    for gpu_id in holding:
        gpu = gpus.get(gpu_id)
        if gpu is None:
            continue
        need = spec.need_on(gpu)
        if need > gpu.total_bytes:
            continue
        # in id order, not the set's: ties in ``order`` must not depend on the process's string
        # hash seed
        on_gpu = [candidates[lid] for lid in sorted(gpu.leases) if lid in candidates]
        if spec.gpus is not None:
            if on_gpu and len(on_gpu) == len(gpu.leases):
                if host_fits is None or host_fits(gpu, on_gpu):
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
        if victims and free >= need and (host_fits is None or host_fits(gpu, victims)):
            yield gpu, victims
