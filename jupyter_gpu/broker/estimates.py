"""When a waiting request could start, and what that estimate rests on.

A request waits for GPU memory held by leases. A lease's memory comes free when its session moves
out: a ``--workers`` rank's when its run's cell ends; a session's (for an interactive request,
which may move idle sessions to host memory) ``suspend-idle-after`` seconds after its cell ends;
never by itself for a batch request, which waits for sessions to be released. So the estimate is
about when the cells ahead end, and it says what it rests on (``EtaBasis``, and a note in words):

- ``progress``: the cell ahead reports ``step`` of ``total`` (``jupyter_gpu.report``, tqdm): its end
  at the rate seen so far;
- ``idle``: the session ahead is idle; it moves to host memory ``suspend-idle-after`` after it
  went idle;
- ``user-cells`` / ``pool-cells``: the cell ahead reports nothing: the median length of that user's
  recent cells (or, with fewer than ``MIN_CELLS`` of theirs, the pool's), among those that ran at
  least as long as this one has so far;
- ``unknown``: none of that applies (no finished cells yet, the cell ahead has run longer than
  recent cells, a session still starting, or a batch request behind sessions that only their
  owners release); no number then, and the note says why.

An estimate holds still while one waits. A cell's expected end is worked out once and kept while
the cell runs within it; only a cell that runs past it gets a new one (from the cells that ran
that long), and the note says so: "ran past the 30 s expected; ...". The old estimate grew
silently: a lease that outlived the median of recent *lease* lengths was expected to last as long
again as its age, so "estimated start" rose from 14 s to 60 s behind one 60 s cell.
``bench/estimates.py`` measures both on a replay.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from jupyter_gpu.broker.model import GpuSlot, Request
from jupyter_gpu.broker.quotas import PoolQuotas
from jupyter_gpu.common.protocol import EtaBasis, RequestSpec

MIN_CELLS = 3  # cells needed before their lengths are a basis
KEEP_USER = 50  # recent cells kept per user
KEEP_POOL = 500  # and for the pool
QUANTILE = 0.5  # the median: the estimate misses by the least, on average, either way


@dataclass(frozen=True)
class Progress:
    """A running cell's reported steps: the first and the latest (time, step) seen, and its
    total."""

    t0: float
    step0: float
    t: float
    step: float
    total: float

    def cell_end(self, now: float) -> float | None:
        """When the cell should end at the rate seen so far (not before now); None until it has
        moved."""
        if self.t <= self.t0 or self.step <= self.step0:
            return None
        rate = (self.step - self.step0) / (self.t - self.t0)
        return max(now, self.t + max(0.0, self.total - self.step) / rate)


def track_progress(
    progress: Progress | None,
    state: str,
    now: float,
    step: float | None = None,
    total: float | None = None,
) -> Progress | None:
    """A lease's progress after a state report: kept while its cell runs and reports ``step`` of
    ``total``; reset by a new cell (or a loop that counts from 0 again) and when it goes idle."""
    if state != "running" or step is None or not total:
        return None  # idle, or a cell started: what an earlier cell reported says nothing now
    if progress is None or step < progress.step:
        return Progress(now, float(step), now, float(step), float(total))
    return Progress(progress.t0, progress.step0, now, float(step), float(total))


class LeaseRecord(Protocol):
    """What an estimate reads of a lease (``fair_share.LeaseRecord``, which imports this module)."""

    @property
    def id(self) -> str: ...
    @property
    def gang(self) -> bool: ...
    @property
    def idle_since(self) -> float | None: ...
    @property
    def progress(self) -> Progress | None: ...
    @property
    def allocs(self) -> dict[str, int]: ...


class Policy(Protocol):
    """What an estimate reads of the policy (``fair_share.FairSharePolicy``)."""

    @property
    def leases(self) -> Mapping[str, LeaseRecord]: ...
    @property
    def cells(self) -> CellTimes: ...
    @property
    def quotas(self) -> PoolQuotas: ...


@dataclass(frozen=True)
class LeaseEnd:
    """When a lease's memory is expected to come free (``at`` None: unknowable), and what that
    rests on, in a word (``basis``) and in words (``note``)."""

    at: float | None
    nbytes: int
    basis: EtaBasis
    note: str
    lease: str | None = None


@dataclass(frozen=True)
class CellExpectation:
    """When a running cell is expected to end, and why."""

    ends: float
    basis: EtaBasis
    note: str


class CellTimes:
    """How long recent cells ran (per user and for the pool), and each running cell's expected end.

    The policy feeds it every lease's state reports: a cell runs from the lease's first
    ``running`` to its next ``idle``. A cell cut short by its lease's end (a kill, a lost worker)
    is not a finished cell and is not counted."""

    def __init__(self) -> None:
        self.pool: collections.deque[float] = collections.deque(maxlen=KEEP_POOL)
        self.by_user: dict[str, collections.deque[float]] = {}
        self.running: dict[str, tuple[str, float]] = {}  # lease -> (user, started)
        self.expected: dict[str, CellExpectation] = {}
        # what each waiting request was told last (``later_because`` compares)
        self.told: dict[str, Told] = {}

    def cell_state(self, lease: str, user: str, state: str, now: float) -> None:
        if state == "running":
            self.running.setdefault(lease, (user, now))
            return
        ran = self.running.pop(lease, None)
        self.expected.pop(lease, None)
        if ran is not None:
            self.add(ran[0], max(0.0, now - ran[1]))

    def lease_ended(self, lease: str) -> None:
        self.running.pop(lease, None)
        self.expected.pop(lease, None)

    def add(self, user: str, seconds: float) -> None:
        self.pool.append(seconds)
        self.by_user.setdefault(user, collections.deque(maxlen=KEEP_USER)).append(seconds)

    def expectation(self, lease: str, now: float) -> CellExpectation | str:
        """When the cell running in ``lease`` should end, or why that is unknown."""
        user, started = self.running[lease]
        held = self.expected.get(lease)
        if held is not None and held.ends >= now:
            return held  # the cell is within what was expected: the estimate holds still
        found = self._expect(user, started, now - started, held)
        if isinstance(found, CellExpectation):
            self.expected[lease] = found
        return found

    def _expect(
        self, user: str, started: float, age: float, overran: CellExpectation | None
    ) -> CellExpectation | str:
        mine = self.by_user.get(user) or ()
        bases: list[tuple[EtaBasis, Iterable[float], str]] = [
            ("user-cells", mine, f"{user}'s"),
            ("pool-cells", self.pool, "the pool's"),
        ]
        for basis, cells, whose in bases:
            sample = list(cells)
            longer = sorted(d for d in sample if d > age)
            if len(sample) < MIN_CELLS or len(longer) < MIN_CELLS:
                continue
            length = quantile(longer, QUANTILE)
            since = f" that ran over {age:.0f} s" if len(longer) < len(sample) else ""
            note = f"median of {whose} last {len(sample)} cells{since}: {length:.0f} s"
            if overran is not None:
                note = f"ran past the {overran.ends - started:.0f} s expected; {note}"
            return CellExpectation(started + length, basis, note)
        if len(self.pool) < MIN_CELLS:
            return "no cells have finished on this pool yet to estimate from"
        return f"the cell ahead has run {age:.0f} s, longer than nearly all recent cells"


def quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values (linear between neighbours)."""
    at = q * (len(ordered) - 1)
    low, high = math.floor(at), math.ceil(at)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def lease_end(
    rec: LeaseRecord, now: float, cells: CellTimes, suspend_after: float | None
) -> LeaseEnd:
    """When ``rec``'s memory comes free for a request that moves idle sessions after
    ``suspend_after`` seconds (None: it does not, it waits for releases)."""
    if not rec.gang and suspend_after is None:
        return LeaseEnd(
            None, 0, "unknown", "the sessions ahead hold their GPU memory until released"
        )
    after = 0.0 if rec.gang else float(suspend_after or 0.0)
    # the wait after the cell, said: "8 s" of cells and an ETA of 608 s must not read as a mistake
    then = f", then {after:.0f} s idle before its session moves out" if after else ""
    cell_end = rec.progress.cell_end(now) if rec.progress is not None else None
    if cell_end is not None:
        return LeaseEnd(cell_end + after, 0, "progress", f"from the reported progress{then}")
    if rec.idle_since is not None:
        idle = f"after {after:.0f} s idle" if after else "now"
        return LeaseEnd(
            max(now, rec.idle_since + after), 0, "idle", f"the idle session ahead moves out {idle}"
        )
    if rec.id not in cells.running:
        return LeaseEnd(None, 0, "unknown", "a session ahead is still starting")
    expected = cells.expectation(rec.id, now)
    if isinstance(expected, str):
        return LeaseEnd(None, 0, "unknown", expected)
    return LeaseEnd(max(now, expected.ends + after), 0, expected.basis, expected.note + then)


def lease_ends(
    policy: Policy, now: float, suspend_after: float | None
) -> dict[str, list[LeaseEnd]]:
    """Every lease's expected end, per GPU it holds memory on."""
    by_gpu: dict[str, list[LeaseEnd]] = collections.defaultdict(list)
    for rec in policy.leases.values():
        end = lease_end(rec, now, policy.cells, suspend_after)
        for gpu_id, nbytes in rec.allocs.items():
            by_gpu[gpu_id].append(LeaseEnd(end.at, nbytes, end.basis, end.note, rec.id))
    return by_gpu


Start = tuple[float | None, LeaseEnd, list[tuple[str, int]]]  # eta, the end it waits for, placement


@dataclass
class FreeCurve:
    """A GPU's free memory from now on, as the known lease ends give it back and the requests
    ahead take it: ``lowest[k]`` is the least free from the k-th change on (index 0: now), so it
    never falls as k grows, and the first k where it reaches a need is when that need can start
    and stay."""

    times: list[float]
    lowest: list[int]
    made_by: list[LeaseEnd | None]  # the last lease end at or before each change
    blocked: str | None  # why part of it never comes free at a known time (an unknowable end)

    @classmethod
    def of(cls, free: int, ends: list[LeaseEnd], claims: list[tuple[float, int]]) -> FreeCurve:
        changes: list[tuple[float, int, LeaseEnd | None]] = [
            (e.at, e.nbytes, e) for e in ends if e.at is not None
        ]
        changes += [(t, -n, None) for t, n in claims]
        changes.sort(key=lambda c: c[0])
        levels = [free]
        made_by: list[LeaseEnd | None] = [None]
        last: LeaseEnd | None = None
        for _t, delta, end in changes:
            levels.append(levels[-1] + delta)
            last = end or last
            made_by.append(last)
        for i in range(len(levels) - 2, -1, -1):
            levels[i] = min(levels[i], levels[i + 1])
        blocked = next((e.note for e in ends if e.at is None), None)
        return cls([c[0] for c in changes], levels, made_by, blocked)

    def earliest(self, need: int, now: float) -> tuple[float, LeaseEnd | None] | None:
        """When ``need`` bytes come free and stay free, with the lease end that frees them (None:
        they are free now); None if never (as far as is known)."""
        k = bisect.bisect_left(self.lowest, need)
        if k == len(self.lowest):
            return None
        if k == 0:
            return now, None
        return max(now, self.times[k - 1]), self.made_by[k]


class QueueEstimate:
    """One scheduling pass's estimates: each GPU's free-memory curve, and what the requests ahead
    (estimated first, in queue order) take of it."""

    def __init__(self, ends: dict[str, list[LeaseEnd]], now: float) -> None:
        self.ends, self.now = ends, now
        self.claims: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
        self._curves: dict[str, FreeCurve] = {}
        self.by_lease = {e.lease: e for per_gpu in ends.values() for e in per_gpu if e.lease}

    def curve(self, gpu: GpuSlot) -> FreeCurve:
        found = self._curves.get(gpu.id)
        if found is None:
            found = FreeCurve.of(gpu.free_bytes, self.ends.get(gpu.id, []), self.claims[gpu.id])
            self._curves[gpu.id] = found
        return found

    def start(self, spec: RequestSpec, gpus: list[GpuSlot]) -> Start:
        """When ``spec`` could start if the leases end when ``lease_end`` expects and the requests
        ahead take the memory that comes free first: the time, the lease end it waits for (its
        basis and note say what the estimate rests on) and the (GPU, bytes) it would take; no time
        and an end that says why when no GPU comes free for it at a known time.

            A lease whose end is unknowable never frees its memory here; a request ahead keeps what
            it takes (its session's end is not known yet)."""
        fits: list[tuple[float, LeaseEnd, str, int]] = []
        unknown = "no GPU in the pool can hold it"
        for gpu in gpus:
            need = spec.need_on(gpu)
            if need > gpu.total_bytes:
                continue
            if spec.gpus is not None:  # a whole GPU: free when every lease on it has ended
                need = gpu.total_bytes
            curve = self.curve(gpu)
            found = curve.earliest(need, self.now)
            if found is None:
                unknown = curve.blocked or "the requests ahead take what comes free"
            elif found[1] is None:  # the memory is there: what holds it back is its reason
                unknown = "its GPU memory is free: it waits for the reason shown"
            else:
                fits.append((found[0], found[1], gpu.id, need))
        if len(fits) < spec.workers:
            return None, LeaseEnd(None, 0, "unknown", unknown), []
        chosen = sorted(fits, key=lambda f: f[0])[: spec.workers]
        return chosen[-1][0], chosen[-1][1], [(gpu_id, need) for *_, gpu_id, need in chosen]

    def claim(self, placement: list[tuple[str, int]], at: float) -> None:
        """A request ahead takes these bytes from ``at`` on."""
        for gpu_id, nbytes in placement:
            self.claims[gpu_id].append((at, nbytes))
            self._curves.pop(gpu_id, None)


def estimate_start(
    spec: RequestSpec, gpus: list[GpuSlot], ends: dict[str, list[LeaseEnd]], now: float
) -> Start:
    """``QueueEstimate.start`` for a request with nobody ahead."""
    return QueueEstimate(ends, now).start(spec, gpus)


def moves_idle_sessions(spec: RequestSpec) -> bool:
    """Whether idle sessions are moved to host memory for ``spec`` (``suspend_plan``'s rule):
    single-GPU interactive requests only."""
    return spec.priority == "interactive" and spec.workers == 1 and (spec.gpus or 1) <= 1


def estimate_waiting(
    policy: Policy,
    waiting: list[Request],
    gpus: list[GpuSlot],
    now: float,
    eta_for: int,
) -> None:
    """Give the first ``eta_for`` waiting requests, in queue order, their estimated start
    (``eta``, ``eta_basis``, ``eta_note``): each takes the memory that comes free before those
    behind it do. An estimate later than the one the request was told says why
    (``later_because``)."""
    passes: dict[bool, QueueEstimate] = {}  # for requests that move idle sessions, and the rest
    told = policy.cells.told
    for i, req in enumerate(waiting):
        req.eta, req.eta_basis, req.eta_note = None, None, None
        if i >= eta_for:
            continue
        moves = moves_idle_sessions(req.spec)
        if moves not in passes:
            after = policy.quotas.suspend_idle_after if moves else None
            passes[moves] = QueueEstimate(lease_ends(policy, now, after), now)
        estimate = passes[moves]
        eta, end, placement = estimate.start(req.spec, gpus)
        if eta is not None:
            estimate.claim(placement, eta)
        before = told.get(req.id)
        now_told = Told(eta, end.basis, i, end.lease, end.at)
        why = later_because(before, now_told, estimate.by_lease, now) if before else None
        if why is None and before is not None and before.why and not _earlier(before, now_told):
            why = before.why  # said until the estimate moves again
        req.eta, req.eta_basis = eta, end.basis
        req.eta_note = f"later than before: {why}; {end.note}" if why else end.note
        told[req.id] = dataclasses.replace(now_told, why=why)
    live = {r.id for r in waiting[:eta_for]}
    for rid in [rid for rid in told if rid not in live]:
        del told[rid]


RAISE_SLACK = 5.0  # seconds: a later estimate by less than this (or a tenth of the wait) is noise


@dataclass(frozen=True)
class Told:
    """An estimate as a request was told it: when, on what, its place in the queue, and the lease
    end it waited for."""

    eta: float | None
    basis: EtaBasis | None
    place: int
    lease: str | None
    lease_end: float | None
    why: str | None = None  # why it is later than the estimate before it, if it is


def _earlier(before: Told, told: Told) -> bool:
    """Whether ``told`` moved the estimate earlier (or to unknown) than ``before``."""
    if before.eta is None or told.eta is None:
        return True
    return told.eta < before.eta - RAISE_SLACK


def later_because(
    before: Told, told: Told, by_lease: dict[str, LeaseEnd], now: float
) -> str | None:
    """Why ``told`` is later than ``before`` (None: it is not, or it says so itself): an estimate
    never grows silently."""
    if before.eta is None or told.eta is None:
        return None
    if told.eta <= before.eta + max(RAISE_SLACK, 0.1 * (before.eta - now)):
        return None
    if told.place > before.place:
        return "a request that goes first (fair share, priority) joined the queue ahead"
    current = by_lease.get(before.lease) if before.lease else None
    if current is None:
        return "the session it waited for ended, and a request ahead takes its memory"
    if current.at is None:
        return f"the session it waited for: {current.note}"
    if before.lease_end is not None and current.at > before.lease_end + RAISE_SLACK:
        if current.note.startswith("ran past"):  # its own note says so, or that cell's does
            same = told.lease == before.lease
            return None if same else "the cell it waited for " + current.note.split(";")[0]
        if before.basis == "idle":
            return "the idle session ahead started a cell"
        if before.basis == "progress" and current.basis == "progress":
            return "the cell ahead reported slower progress"
        return "the session ahead started another cell"
    return "a request ahead takes the memory it waited for"
