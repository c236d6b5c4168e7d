"""The lease book indexed by when a lease could be taken back: idle sessions by when they went idle,
borrowed (preemptible) leases by team and start.

Why: every scheduling pass asks whether any idle session may move to host memory and whether any
borrowed lease may be reclaimed (``scheduling.PassState.look``); both questions only decide whether
the pass may preempt at all. Answered by scanning the lease book, they cost every idle and every
preemptible lease whenever the book changed, which at 10,000 GPUs is every decision (a third of
it, issue 24). Kept sorted as leases start, end and go idle or busy, each question reads the
oldest entries only: ``now - idle_since >= after`` and ``now - started >= min_run_time`` hold for
a prefix of each sorted list, so the first entry that fails ends the search.

Entries are checked against the lease's record when read (a gang's rank is never taken back,
whatever it was when it was indexed), so the answers are exactly those of a scan
(``tests/broker/test_takeback.py`` compares them after random changes of the book).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from sortedcontainers import SortedList

EPS = 1e-6


class LeaseRecord(Protocol):
    """What the index reads of a lease (``fair_share.LeaseRecord``, which imports this module)."""

    id: str
    team: str
    started: float
    idle_since: float | None
    gang: bool
    preemptible: bool


class TakeBackIndex:
    """Idle leases by ``idle_since`` and preemptible leases, per team, by ``started``."""

    def __init__(self, leases: Mapping[str, LeaseRecord]):
        self._leases = leases  # the policy's lease book (read, never changed here)
        self._idle = SortedList()  # (idle_since, lease id)
        self._idle_key: dict[str, tuple[float, str]] = {}
        self._borrowed: dict[str, SortedList] = {}  # team -> (started, lease id)
        # (when its oldest borrowed lease started, team): the teams that may have one to reclaim
        # first, so that a pass reads only teams whose oldest ran ``min_run``, not every team
        self._oldest = SortedList()

    # ------------------------------------------------------------------ kept in step with the book
    def started(self, rec: LeaseRecord) -> None:
        """A lease was booked (``FairSharePolicy.lease_started``)."""
        if rec.preemptible:
            of_team = self._borrowed.setdefault(rec.team, SortedList())
            before = of_team[0] if of_team else None
            of_team.add((rec.started, rec.id))
            self._restate(rec.team, before, of_team)
        self.idle_changed(rec)

    def ended(self, rec: LeaseRecord) -> None:
        """A lease left the book."""
        key = self._idle_key.pop(rec.id, None)
        if key is not None:
            self._idle.discard(key)
        of_team = self._borrowed.get(rec.team)
        if of_team is not None:
            before = of_team[0] if of_team else None
            of_team.discard((rec.started, rec.id))
            self._restate(rec.team, before, of_team)
            if not of_team:
                del self._borrowed[rec.team]

    def _restate(self, team: str, before: tuple[float, str] | None, of_team: SortedList) -> None:
        """Keep ``_oldest`` in step after ``team``'s oldest borrowed lease was ``before``."""
        after = of_team[0] if of_team else None
        if after != before:
            if before is not None:
                self._oldest.discard((before[0], team))
            if after is not None:
                self._oldest.add((after[0], team))

    def idle_changed(self, rec: LeaseRecord) -> None:
        """A lease went idle or started a cell (its ``idle_since`` may have changed)."""
        key = self._idle_key.get(rec.id)
        want = None if rec.idle_since is None else (rec.idle_since, rec.id)
        if key == want:
            return
        if key is not None:
            self._idle.discard(key)
            del self._idle_key[rec.id]
        if want is not None:
            self._idle.add(want)
            self._idle_key[rec.id] = want

    # ------------------------------------------------------------------ the questions
    def may_suspend(self, now: float, after: float) -> bool:
        """Whether an idle session may move to host memory now: idle for ``after`` seconds, no
        gang's rank, not granted this very instant (``preemption.suspend_candidates``)."""
        for idle_since, lid in self._idle:
            if not now - idle_since >= after:
                return False  # (nor any idle since later)
            r = self._leases.get(lid)
            if r is not None and not r.gang and r.idle_since is not None and r.started < now:
                return True
        return False

    def may_reclaim(self, now: float, min_run: float, over: Callable[[str], float]) -> bool:
        """Whether a borrowed lease may be reclaimed now: preemptible, no gang's rank, of a team
        over its guarantee (``over(team) > EPS``), run for ``min_run`` seconds and not granted this
        very instant (``preemption.reclaim_candidates``, for some other team)."""
        for oldest, team in self._oldest:
            if not (now - oldest >= min_run and oldest < now):
                break  # (nor any team whose oldest started later)
            if over(team) <= EPS:
                continue
            for started, lid in self._borrowed[team]:
                if not (now - started >= min_run and started < now):
                    break  # (nor any started later)
                r = self._leases.get(lid)
                if r is not None and not r.gang and r.preemptible:
                    return True
        return False
