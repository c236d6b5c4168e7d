"""The queue of waiting requests, indexed so that a scheduling pass visits only what could act.

Why: a pass used to sort the whole queue and try every request against every GPU, so the queue's
cost grew with what could not run: 10,000 requests that did not fit made every event (and every
second) cost seconds, and another user's cell waited minutes behind them (issue 24). A pass still
serves requests in the policy's order (``FairSharePolicy.key``, computed as at the start of the
pass, as sorting the queue did), and it still grants, reclaims, suspends, reserves and explains
exactly what the full pass did; it just does not look at what cannot act.

The index: team -> user -> group (one user's requests of one shape, priority and number of ranks,
oldest first). A user and a team carry summaries of what their requests need: the smallest share of
a GPU, bytes of one GPU, whole GPUs, host memory and cores, and the oldest submission. ``Walk`` visits teams, then
users, then groups in the policy's order, and passes over a whole team or user whose smallest needs
exceed the largest room the pool has (free, or to be made by moving idle sessions or reclaiming
borrowed ones), unless something else makes it act (a reservation, one to be made, or the first
``eta_for`` waiting requests, whose reasons and estimated starts the pass refreshes). In a group,
requests are interchangeable except for their age: once one finds no room, the others are passed
over for the rest of the pass. When a pass makes room (a preemption), what it passed over is looked
at again.

What a room admits is found without looking at each team, user or group: the waiting room keeps its
teams, a team its users, and a user its groups sorted by their smallest GPU need of each kind
(``by_need``), so that when only room (or, for a team, a reservation) can make a team's requests act
(nothing to preempt for: ``PassState.narrow``, ``PassState.beyond_room``) the walk opens only the teams,
users and groups whose need fits it, and a team or user only when its turn in the fair-share order
comes (``_Turns``; a user's requests' keys share a prefix, ``PassState.user_key``): by then the grants
before it have usually shrunk the room, and those it no longer admits are passed over in one test each,
or all at once when the room admits nothing of them any more, instead of each of their groups being
keyed, pushed and popped; they are looked at again if the pass makes room (``unskip``, ``revive``), as
a walk that opens each in its turn would. A user's groups are opened the same way, each when the walk
reaches its oldest request (``_Turns`` too). At 100,000 waiting that took a decision from keying about
560 groups to 1-10, and from about 100 team and 39 user openings to 1-2 of each (the teams, and the
users of a team opened, are still keyed to be put in order: docs/benchmarks.md).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from sortedcontainers import SortedList

from jupyter_gpu.broker.fair_share import PRIORITY_RANK
from jupyter_gpu.broker.fragmentation import ShapeKey, shape_of
from jupyter_gpu.broker.model import Request
from jupyter_gpu.common.protocol import RequestSpec

INF = math.inf
# (shape of a rank, priority rank in the policy's key, priority, ranks): requests alike but for
# their age (a gang and a single request of the same fraction are not)
GroupKey = tuple[ShapeKey, int, str, int]


def family(spec: RequestSpec) -> tuple[int, float]:
    """(kind, amount) of one rank's GPU need: 0 a share of a GPU, 1 bytes of one GPU, 2 whole
    GPUs on one machine."""
    if spec.gpus is not None:
        return 2, float(spec.gpus)
    if spec.memory is not None:
        return 1, float(spec.memory)
    return 0, float(spec.fraction or 0.0)


@dataclass
class Room:
    """The most a pass could give one request: per kind of GPU need (a share of a GPU, bytes of one
    GPU, whole GPUs on one machine), host memory and cores on one machine. A request whose needs
    all exceed these cannot act."""

    gpu: tuple[float, float, float] = (INF, INF, INF)
    memory: float = INF
    cpu_milli: float = INF

    def admits(self, needs: Needs) -> bool:
        return (
            self.admits_gpu(needs)
            and needs.host_memory.least <= self.memory
            and needs.cpu_milli.least <= self.cpu_milli
        )

    def admits_gpu(self, needs: Needs) -> bool:
        """Whether the GPU need of any of these requests fits (host memory and cores aside)."""
        gpu, room = needs.gpu, self.gpu
        return gpu[0].least <= room[0] or gpu[1].least <= room[1] or gpu[2].least <= room[2]

    def admits_spec(self, spec: RequestSpec) -> bool:
        kind, amount = family(spec)
        return (
            amount <= self.gpu[kind]
            and (spec.host_memory or 0) <= self.memory
            and (spec.cpus or 0.0) * 1000 <= self.cpu_milli
        )

    def widest(self, other: Room) -> Room:
        return Room(
            tuple(max(a, b) for a, b in zip(self.gpu, other.gpu)),  # type: ignore[arg-type]
            max(self.memory, other.memory),
            max(self.cpu_milli, other.cpu_milli),
        )


class Smallest:
    """A multiset of numbers that knows its smallest (additions and removals in log time; the
    smallest is kept at hand: a pass reads it for every team and user it tests).

    Kept as a count per distinct value and a plain sorted list of the distinct values: most
    values repeat (the default host memory and cores, a few shapes), and granting a request takes
    it out of ten of these (its user's and its team's); a ``SortedList`` made each removal cost
    microseconds of Python, a twentieth of a decision at 100,000 waiting."""

    __slots__ = ("_counts", "_values", "least")

    def __init__(self) -> None:
        self._counts: dict[float, int] = {}
        self._values: list[float] = []  # the distinct values, sorted
        self.least = INF

    def add(self, value: float) -> None:
        n = self._counts.get(value)
        if n is not None:
            self._counts[value] = n + 1
            return
        self._counts[value] = 1
        bisect.insort(self._values, value)
        if value < self.least:
            self.least = float(value)

    def remove(self, value: float) -> None:
        """Take one ``value`` out (none there: nothing changes)."""
        n = self._counts.get(value)
        if n is None:
            return
        if n > 1:
            self._counts[value] = n - 1
            return
        del self._counts[value]
        values = self._values
        del values[bisect.bisect_left(values, value)]
        if value == self.least:
            self.least = float(values[0]) if values else INF

    def smallest(self) -> float:
        return self.least


class Needs:
    """The smallest needs of a set of requests, kept as requests come and go."""

    __slots__ = (
        "gpu",
        "host_memory",
        "cpu_milli",
        "equivalents",
        "submitted",
        "reservable",
        "single",
        "interactive_single",
    )

    def __init__(self) -> None:
        self.gpu = (Smallest(), Smallest(), Smallest())
        self.host_memory = Smallest()  # explicit asks (a default counts as 0: it always fits)
        self.cpu_milli = Smallest()
        self.equivalents = Smallest()  # GPUs, for limits (a --memory request counts as 0)
        self.submitted = Smallest()
        self.reservable = 0  # gangs and whole GPUs: reserved for once they waited long enough
        self.single = 0  # one session on at most one GPU: what reclaim makes room for
        self.interactive_single = 0  # ... and interactive: what idle sessions move out for

    def change(self, req: Request, add: bool, family_of: tuple[int, float] | None = None) -> None:
        """Count ``req`` in (``add``) or out; ``family_of``: its ``family``, when known."""
        spec = req.spec
        kind, amount = family_of or family(spec)
        single = spec.workers == 1 and (spec.gpus or 1) <= 1
        values = (
            amount,
            float(spec.host_memory or 0),
            float(spec.cpus or 0.0) * 1000,
            0.0 if kind == 1 else amount * spec.workers,
            req.submitted,
        )
        trackers = (
            self.gpu[kind],
            self.host_memory,
            self.cpu_milli,
            self.equivalents,
            self.submitted,
        )
        step = 1 if add else -1
        self.reservable += step * (spec.workers > 1 or spec.gpus is not None)
        self.single += step * single
        self.interactive_single += step * (single and spec.priority == "interactive")
        for tracker, value in zip(trackers, values):
            (tracker.add if add else tracker.remove)(value)

    def smallest(self, kind: int) -> float:
        return self.gpu[kind].least


class ByAmount:
    """(amount, what) pairs sorted by amount, ``what`` once: the teams, users or groups of one
    kind of GPU need, by their smallest. What a room admits is a prefix (``upto``).

    Why not a ``SortedKeyList``: these hold tens of entries (the teams, a team's users, a user's
    groups) and a pass reads prefixes of them for every team and user it opens; two plain lists
    with ``bisect`` read a prefix as one slice, several times faster at these sizes."""

    __slots__ = ("amounts", "items")

    def __init__(self) -> None:
        self.amounts: list[float] = []
        self.items: list[Any] = []

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __getitem__(self, index: int) -> tuple[float, Any]:
        return self.amounts[index], self.items[index]

    def __iter__(self) -> Iterator[tuple[float, Any]]:
        return zip(self.amounts, self.items)

    def add(self, entry: tuple[float, Any]) -> None:
        amount, what = entry
        i = bisect.bisect_right(self.amounts, amount)
        self.amounts.insert(i, amount)
        self.items.insert(i, what)

    def discard(self, entry: tuple[float, Any]) -> None:
        amount, what = entry
        i = bisect.bisect_left(self.amounts, amount)
        j = bisect.bisect_right(self.amounts, amount, i)
        for k in range(i, j):
            if self.items[k] == what:
                del self.amounts[k], self.items[k]
                return

    def upto(self, limit: float) -> list[Any]:
        """What needs at most ``limit``, smallest first."""
        return self.items[: bisect.bisect_right(self.amounts, limit)]


def _by_amount() -> tuple[ByAmount, ByAmount, ByAmount]:
    """Per kind of GPU need, (amount, what) sorted by amount."""
    return ByAmount(), ByAmount(), ByAmount()


def admitted(index: tuple[ByAmount, ...], room: Room) -> list[Any]:
    """What ``index`` (``_by_amount``) holds whose GPU need fits ``room``, once each, in index
    order: those a room admits (its host memory and cores are left to the caller)."""
    gpu = room.gpu
    found = index[0].upto(gpu[0]) if gpu[0] >= 0 else []
    more = [index[k].upto(gpu[k]) for k in (1, 2) if gpu[k] >= 0]
    if not any(more):
        return found
    return list(dict.fromkeys(itertools.chain(found, *more)))


def _move(index: SortedList | ByAmount, what: Any, before: float, after: float) -> None:
    """Keep ``what``'s entry ``(value, what)`` in ``index`` in step: its value went from
    ``before`` to ``after`` (INF: none, not in the index)."""
    if after != before:
        if before != INF:
            index.discard((before, what))
        if after != INF:
            index.add((after, what))


def _needs_of(room: WaitingRoom, team: str | None, name: str) -> Needs | None:
    """The needs of team ``name`` (``team`` None) or of user ``name`` of ``team``."""
    if team is None:
        tq = room.teams.get(name)
        return tq.needs if tq is not None else None
    tq = room.teams.get(team)
    uq = tq.users.get(name) if tq is not None else None
    return uq.needs if uq is not None else None


def _admits_any(index: tuple[ByAmount, ...], room: Room) -> bool:
    """Whether ``room`` admits the GPU need of anything in ``index`` (``_by_amount``): its
    smallest of some kind fits."""
    return any(index[k] and index[k][0][0] <= room.gpu[k] for k in range(3))


@dataclass(slots=True)
class Group:
    """One user's waiting requests of one shape, priority and number of ranks, oldest first."""

    key: GroupKey
    spec: RequestSpec
    items: SortedList = field(default_factory=SortedList)  # (submitted, id)
    # (priority rank, submitted, id) of its oldest: the part of its keys the walk orders a
    # user's groups by, kept at hand (reading each group's sorted list when a user's turn came
    # was a twentieth of a decision at 100,000 waiting: one cache miss after another)
    first: tuple[int, float, str] = (0, INF, "")

    def add(self, item: tuple[float, str]) -> None:
        self.items.add(item)
        if item < self.first[1:]:
            self.first = (self.key[1],) + item

    def discard(self, item: tuple[float, str]) -> None:
        self.items.discard(item)
        if item == self.first[1:]:
            self.first = (self.key[1],) + self.items[0] if self.items else (0, INF, "")


@dataclass
class UserQueue:
    user: str
    team: str
    groups: dict[GroupKey, Group] = field(default_factory=dict)
    needs: Needs = field(default_factory=Needs)
    count: int = 0
    # per kind of GPU need, (amount, group key) of each group: the groups a room admits
    by_need: tuple[ByAmount, ByAmount, ByAmount] = field(default_factory=_by_amount)


@dataclass
class TeamQueue:
    team: str
    users: dict[str, UserQueue] = field(default_factory=dict)
    needs: Needs = field(default_factory=Needs)
    # per kind of GPU need, (the user's smallest, user): the users a room admits
    by_need: tuple[ByAmount, ByAmount, ByAmount] = field(default_factory=_by_amount)

    def restate(self, uq: UserQueue, kind: int, before: float) -> None:
        """Keep ``by_need`` in step after ``uq``'s smallest need of ``kind`` was ``before``."""
        _move(self.by_need[kind], uq.user, before, uq.needs.smallest(kind))


class WaitingRoom:
    """The ledger's queue: the requests in state ``queued``, in submission order for iteration
    (``for req in queue``, ``req in queue``, ``len``, ``queue[0]``, ``remove``), and indexed for
    ``Walk``."""

    def __init__(self, team_of: Callable[[Request], str]):
        self._team_of = team_of
        self._reqs: dict[str, Request] = {}
        self._where: dict[str, tuple[str, str, GroupKey]] = {}  # id -> (team, user, group)
        self.teams: dict[str, TeamQueue] = {}
        # per kind of GPU need, (the team's smallest, team): the teams a room admits; and (the
        # team's oldest submission, team): those that may have waited long enough for a
        # reservation
        self.by_need: tuple[ByAmount, ByAmount, ByAmount] = _by_amount()
        self.by_age: SortedList = SortedList()
        self.gangs: SortedList = SortedList()  # (submitted, id) of multi-rank requests
        self.estimated: set[str] = set()  # ids of those with an estimated start
        self.fresh: set[str] = set()  # ids of those no pass has looked at yet
        self._per_user: dict[str, int] = {}  # how many each user has waiting (admission's cap)
        self.version = 0  # bumped by every request queued or gone (``queue_view.py``)
        # whether a pass may find the users and groups a room admits by what they need (``Walk``);
        # off only to check that it changes nothing
        self.indexed = True

    # ------------------------------------------------------------------ a list's manners
    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._reqs.values()))

    def __len__(self) -> int:
        return len(self._reqs)

    def __bool__(self) -> bool:
        return bool(self._reqs)

    def __contains__(self, req: object) -> bool:
        return isinstance(req, Request) and self._reqs.get(req.id) is req

    def __getitem__(self, index: int) -> Request:
        return list(self._reqs.values())[index]

    def get(self, req_id: str) -> Request | None:
        return self._reqs.get(req_id)

    def waiting_of(self, user: str) -> int:
        """How many requests ``user`` has waiting (in constant time: checked on every request)."""
        return self._per_user.get(user, 0)

    def append(self, req: Request) -> None:
        if req.id in self._reqs:
            self.remove(self._reqs[req.id])
        team = self._team_of(req)
        key: GroupKey = (
            shape_of(req.spec),
            PRIORITY_RANK.get(req.spec.priority, 1),
            req.spec.priority,
            req.spec.workers,
        )
        tq = self.teams.setdefault(team, TeamQueue(team))
        uq = tq.users.setdefault(req.user, UserQueue(req.user, team))
        group = uq.groups.get(key)
        kind, amount = family(req.spec)
        if group is None:
            group = uq.groups[key] = Group(key, req.spec)
            uq.by_need[kind].add((amount, key))
        group.add((req.submitted, req.id))
        before = uq.needs.smallest(kind)
        uq.needs.change(req, True, (kind, amount))
        tq.restate(uq, kind, before)
        self._change_team(tq, req, (kind, amount), True)
        uq.count += 1
        if req.spec.workers > 1:
            self.gangs.add((req.submitted, req.id))
        self._reqs[req.id] = req
        self._where[req.id] = (team, req.user, key)
        self._per_user[req.user] = self._per_user.get(req.user, 0) + 1
        self.version += 1
        self.fresh.add(req.id)

    def remove(self, req: Request) -> None:
        if self._reqs.get(req.id) is not req:
            raise ValueError(f"{req.id} is not queued")
        del self._reqs[req.id]
        self.fresh.discard(req.id)
        self.version += 1
        left = self._per_user.pop(req.user) - 1
        if left:
            self._per_user[req.user] = left
        self.estimated.discard(req.id)
        team, user, key = self._where.pop(req.id)
        tq = self.teams[team]
        uq = tq.users[user]
        group = uq.groups[key]
        group.discard((req.submitted, req.id))
        kind, amount = family(group.spec)
        if not group.items:
            del uq.groups[key]
            uq.by_need[kind].discard((amount, key))
        before = uq.needs.smallest(kind)
        uq.needs.change(req, False, (kind, amount))
        tq.restate(uq, kind, before)
        self._change_team(tq, req, (kind, amount), False)
        uq.count -= 1
        if not uq.count:
            del tq.users[user]
        if not tq.users:
            del self.teams[team]
        if req.spec.workers > 1:
            self.gangs.discard((req.submitted, req.id))

    def _change_team(
        self, tq: TeamQueue, req: Request, family_of: tuple[int, float], add: bool
    ) -> None:
        """Count ``req`` (of ``family_of``) in (out of) its team's needs, and keep the teams'
        indexes in step."""
        kind = family_of[0]
        before, oldest = tq.needs.smallest(kind), tq.needs.submitted.smallest()
        tq.needs.change(req, add, family_of)
        _move(self.by_need[kind], tq.team, before, tq.needs.smallest(kind))
        _move(self.by_age, tq.team, oldest, tq.needs.submitted.smallest())

    def waited(self, now: float, after: float) -> list[str]:
        """The teams whose oldest request has waited ``after`` seconds at ``now`` (those that may
        be owed a reservation), oldest first."""
        found = []
        for oldest, team in self.by_age:
            if not now - oldest >= after:
                break  # (nor any team whose oldest is younger)
            found.append(team)
        return found


# ---------------------------------------------------------------------- the walk of one pass
@dataclass
class _Turns:
    """Teams of a phase (``team`` None), users of a team (``user`` None) or a user's groups, in
    the order of the pass, each looked at in its turn (``Walk._take_turn``,
    ``_GroupSteps._take_group_turn``); ``at``: the next. A user's groups are those the room
    admitted when the user's turn came, in the order of their oldest requests: a user's first
    grant usually leaves no room for the rest, which are then passed over at once instead of each
    being tested, pushed and popped."""

    team: str | None
    phase: int
    # (the rest of each one's key, name or group key), sorted: their keys share ``head`` (a
    # user's groups: the user's key prefix, ``Walk._prefix``), and sorting the rest alone
    # compares short tuples
    order: list[tuple[tuple[Any, ...], Any]]
    head: tuple[Any, ...]
    at: int = 0
    user: str | None = None

    def key(self, at: int) -> tuple[Any, ...]:
        return self.head + self.order[at][0]

    def item(self, name: Any) -> tuple[Any, ...]:
        """What opens ``name`` (a team, a user, a group key) when its turn comes."""
        if self.team is None:
            return ("team", name, self.phase)
        if self.user is None:
            return ("user", self.team, name, self.phase)
        return ("ogroup", self.team, self.user, name, self.phase)


class _GroupSteps:
    """The walk's steps within one user's groups: each group's first request after the walk's
    position is pushed when the user's turn comes, the next when one is walked; a group that cannot
    act is passed over (``Walk`` holds the state read here)."""

    room: WaitingRoom
    full: bool
    key: Callable[[Request], tuple[Any, ...]]
    _heap: list[tuple[tuple[Any, ...], int, tuple[Any, ...]]]
    _seq: Iterator[int]
    _phase_of: Callable[[str, RequestSpec], int] | None
    _admits: Callable[[RequestSpec, float], bool]
    _aged_gang: Callable[[Request], bool]
    _passed: list[tuple[Any, ...]]
    _skipped: dict[tuple[str, GroupKey], tuple[str, int]]
    _seen: set[str]
    _cursor: tuple[Any, ...]
    _prefix: dict[tuple[str, int], tuple[Any, ...]]
    _narrow: Callable[[Needs, str], Room | None] | None
    _unopened: list[tuple[tuple[Any, ...] | None, tuple[Any, ...]]]

    def _push(self, key: tuple[Any, ...], item: tuple[Any, ...]) -> None:
        heapq.heappush(self._heap, (key, next(self._seq), item))

    def _open_groups_but(
        self, team: str, user: str, opened: frozenset[GroupKey], phase: int
    ) -> None:
        """Look again at the groups of ``user`` that the index passed over."""
        tq = self.room.teams.get(team)
        uq = tq.users.get(user) if tq is not None else None
        for gkey in list(uq.groups) if uq is not None else ():
            if gkey not in opened:
                self._open_group(team, user, gkey, phase)

    def _open_groups_in_turn(
        self, team: str, user: str, gkeys: list[GroupKey], phase: int, prefix: tuple[Any, ...]
    ) -> None:
        """Give the first of ``gkeys`` (groups of ``user``, whose keys begin with ``prefix``) its
        turn: each is opened when the walk reaches its first request's key."""
        groups = self.room.teams[team].users[user].groups
        order = sorted((groups[gkey].first, gkey) for gkey in gkeys)
        turns = _Turns(team, phase, order, prefix, user=user)
        self._push(turns.key(0), ("gturn", turns))

    def _take_group_turn(self, turns: _Turns) -> None:
        """Open the next group of ``turns`` (a user's) that still waits, and give the one after it
        its turn; when the room admits no group of the user any more, leave them all for when it
        grows."""
        order, team, user = turns.order, cast(str, turns.team), cast(str, turns.user)
        tq = self.room.teams.get(team)
        uq = tq.users.get(user) if tq is not None else None
        if uq is None:
            return
        if not self.full and self._narrow is not None:
            room = self._narrow(uq.needs, team)
            if room is not None and not _admits_any(uq.by_need, room):
                self._unopened.append((None, ("turns", turns, turns.at)))
                turns.at = len(order)
                return
        while turns.at < len(order):
            gkey = order[turns.at][1]
            turns.at += 1
            if gkey in uq.groups:
                if turns.at < len(order):
                    self._push(turns.key(turns.at), ("gturn", turns))
                self._open_group(team, user, gkey, turns.phase)
                return

    def _open_group(self, team: str, user: str, gkey: GroupKey, phase: int) -> None:
        tq = self.room.teams.get(team)
        uq = tq.users.get(user) if tq is not None else None
        group = uq.groups.get(gkey) if uq is not None else None
        if group is None:
            return  # (none of it waits any more)
        if self._phase_of is not None and self._phase_of(team, group.spec) != phase:
            return  # (its aged gangs were pushed on their own)
        if not self.full and not self._admits(group.spec, group.first[1]):
            self._passed.append(("group", team, user, gkey, phase, None))
            return
        self._next_in_group(team, user, gkey, phase, None)

    def _next_in_group(
        self, team: str, user: str, gkey: GroupKey, phase: int, after: tuple[float, str] | None
    ) -> None:
        """Push the next request of the group after ``after`` (its first when None) that comes
        after the walk's position, unless the group is passed over."""
        tq = self.room.teams.get(team)
        uq = tq.users.get(user) if tq is not None else None
        group = uq.groups.get(gkey) if uq is not None else None
        if group is None:
            return
        if (user, gkey) in self._skipped:
            return
        items = (
            group.items.irange(minimum=after, inclusive=(False, False)) if after else group.items
        )
        prefix = self._prefix.get((user, phase))
        for item in items:
            rid = item[1]
            req = self.room.get(rid)
            if req is None or rid in self._seen or self._aged_gang(req):
                continue
            if prefix is not None:
                k = prefix + (gkey[1],) + item  # = self.key(req), without the policy
            else:
                k = self.key(req)
                if k[1] != phase:
                    return  # a group's requests share their within-guarantee flag
            if k <= self._cursor:
                continue
            self._push(k, ("req", req, (team, user, gkey, phase)))
            return

    def _still_worth(self, req: Request, where: tuple[str, str, GroupKey, int]) -> bool:
        """Whether ``req``'s group may still act, now that the pass granted what came before it
        (its room shrank since the group was opened); if not, the group is passed over until room
        is made."""
        team, user, gkey, phase = where
        group = self.room.teams[team].users[user].groups[gkey]
        if self._admits(group.spec, group.first[1]):
            return True
        self._passed.append(("group", team, user, gkey, phase, None))
        return False

    def skip_group(self, req: Request) -> None:
        """The rest of ``req``'s group cannot act in this pass (as ``req`` could not)."""
        where = self.room._where.get(req.id)
        if where is not None:
            team, user, gkey = where
            self._skipped[(user, gkey)] = (team, self.key(req)[1])


class Walk(_GroupSteps):
    """The waiting requests in the policy's order (as at the start of the pass), without those
    that cannot act (see the module docstring).

    ``key(req)`` is the frozen sort key and ``team_share(team)`` its team part; ``worth(needs,
    team, user)`` says whether a team's or a user's requests could act (the pass's test);
    ``admits(spec, oldest)`` whether a group of one shape could; ``sticky`` requests are shown whatever their groups
    do (those holding reservations). ``full`` shows everything (the first waiting
    requests, whose reasons and estimates the pass refreshes). ``skip_group(req)`` passes over the
    rest of ``req``'s group; ``unskip()`` and ``revive()`` look again at what was passed over, from
    the current position on (after a reservation was released, after room was made)."""

    def __init__(
        self,
        room: WaitingRoom,
        team_share: Callable[[str], float],
        key: Callable[[Request], tuple[Any, ...]],
        aged_gang: Callable[[Request], bool],
        worth: Callable[[Needs, str, str | None], bool],
        admits: Callable[[RequestSpec, float], bool],
        sticky: Iterable[Request] = (),
        phase_of: Callable[[str, RequestSpec], int] | None = None,
        phase_room: Callable[[str], float] | None = None,
        narrow: Callable[[Needs, str], Room | None] | None = None,
        user_ranks: Callable[[list[str]], list[tuple[Any, ...]]] | None = None,
        beyond_room: Callable[[], tuple[Room, Collection[str]] | None] | None = None,
        team_shares: Callable[[list[str]], list[float]] | None = None,
        phase_rooms: Callable[[list[str]], list[float]] | None = None,
    ):
        self.room = room
        # the room, when only it can make a team's (a user's) requests act: then the index of
        # what they need finds those that can, and the others are not looked at one by one
        self._narrow = narrow if room.indexed else None
        # the user part of each user's keys (``PassState.user_ranks``): with it a team's users
        # are put in order, and the prefix of the keys of a user's requests of one phase (not an
        # aged gang) is kept per (user, phase) when its turn comes; a request's key is that
        # prefix + (its group's priority rank, submitted, id), computed without the policy
        self._user_ranks = user_ranks
        self._prefix: dict[tuple[str, int], tuple[Any, ...]] = {}
        # (the room, the teams that may act for something else than room: a reservation), or None
        # when any team may (something to preempt for): which teams a phase opens
        self._beyond_room = beyond_room if self._narrow is not None else None
        self._team_share = team_share
        self._team_shares = team_shares or (lambda teams: [team_share(t) for t in teams])
        # (key, item) of the teams and users whose turn came, or was to come, while the room
        # admitted none of their needs: looked at again if room grows (``unskip``, ``revive``);
        # (None, a team) is keyed then, (None, ("turns", turns, at)) stands for turns from at (of
        # teams, users or a user's groups), and (None, ("rest", phase, chosen)) for the teams of a
        # phase not chosen when it began
        self._unopened: list[tuple[tuple[Any, ...] | None, tuple[Any, ...]]] = []
        # a group's phase (0: within its team's guarantee) from its shape, and a team's room in
        # its guarantee: a team or group of the other phase is not opened
        self._phase_of = phase_of
        self._phase_room = phase_room
        self._phase_rooms = phase_rooms or (
            None if phase_room is None else lambda teams: [phase_room(t) for t in teams]
        )
        self.key = key
        self._aged_gang = aged_gang
        self._worth = worth
        self._admits = admits
        self._heap: list[tuple[tuple[Any, ...], int, tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._skipped: dict[tuple[str, GroupKey], tuple[str, int]] = {}  # -> (team, phase)
        self._passed: list[tuple[Any, ...]] = []  # teams, users and groups passed over
        self._cursor: tuple[Any, ...] = ()
        self._seen: set[str] = set()
        self.full = True
        for _, rid in room.gangs:
            req = room.get(rid)
            if req is not None and aged_gang(req):
                self._push(key(req), ("req", req, None))
        for req in sticky:
            self._push(key(req), ("req", req, None))
        for rid in room.fresh:  # each request is looked at at least once, to be told why it waits
            req = room.get(rid)
            if req is not None:
                self._push(key(req), ("req", req, None))
        room.fresh = set()
        for phase in (0, 1):
            if self._beyond_room is not None:  # the teams of a phase found when it begins
                self._push((1, phase, -INF, -INF), ("teams", phase))
            else:
                for team in room.teams:
                    self._push(self._team_key(team, phase), ("team", team, phase))

    def __iter__(self) -> Walk:
        return self

    def __next__(self) -> Request:
        while self._heap:
            key, _, item = heapq.heappop(self._heap)
            kind = item[0]
            if kind == "req":
                req, where = cast(Request, item[1]), item[2]
                if req.id in self._seen or req not in self.room:
                    if where is not None:  # walked on its own entry (a reservation's, an aged
                        # gang's, a fresh request's) or gone: the rest of its group still follows
                        team, user, gkey, phase = where
                        self._next_in_group(team, user, gkey, phase, (req.submitted, req.id))
                    continue
                if where is not None and not self.full and not self._still_worth(req, where):
                    continue
                self._seen.add(req.id)
                self._cursor = key  # (a request is pushed at its key)
                if where is not None:  # the next of its group follows it
                    self._push(self._cursor + (0,), ("group",) + where + ((req.submitted, req.id),))
                return req
            if kind == "team":
                self._open_team(item[1], item[2])
            elif kind == "user":
                self._open_user(item[1], item[2], item[3])
            elif kind == "group":
                self._next_in_group(*item[1:])
            elif kind == "gturn":
                self._take_group_turn(item[1])
            elif kind == "ogroup":
                self._open_group(*item[1:])
            elif kind == "users":
                self._open_users_but(item[1], item[2], item[3])
            elif kind == "groups":
                self._open_groups_but(item[1], item[2], item[3], item[4])
            elif kind == "turn":
                self._take_turn(item[1])
            elif kind == "teams":
                self._open_teams(item[1])
        raise StopIteration

    def _team_key(self, team: str, phase: int) -> tuple[Any, ...]:
        return (1, phase, self._team_share(team), -INF)

    def _open_teams(self, phase: int) -> None:
        """A phase begins: the teams whose turn may come, in the order. When only room or a
        reservation can make a team act (``beyond_room``), those are the teams whose smallest
        need the room admits (``WaitingRoom.by_need``) and those that waited long enough for a
        reservation, and each is looked at in its turn (``_Turns``); the others are left for
        when room grows."""
        found = None if self.full or self._beyond_room is None else self._beyond_room()
        if found is None:
            for team in self.room.teams:
                self._push(self._team_key(team, phase), ("team", team, phase))
            return
        room, beyond = found
        teams_of = self.room.teams
        chosen = dict.fromkeys(itertools.chain(admitted(self.room.by_need, room), beyond))
        teams = [team for team in chosen if team in teams_of]
        if phase == 0 and self._phase_rooms is not None:  # (tested at once: a call each cost a
            # tenth of a decision at 10,000 GPUs)
            inside = []
            for team, limit in zip(teams, self._phase_rooms(teams)):
                if teams_of[team].needs.equivalents.least <= limit:
                    inside.append(team)  # (else nothing of it fits in its guarantee: it has no
                    # turn in this phase, as in ``_open_team``)
            teams = inside
        # the teams the room did not admit: listed (and keyed) only if room grows (``_left``);
        # a team passed over in the first phase is not left out of the second (bug fixed)
        self._unopened.append((None, ("rest", phase, chosen.keys())))
        shares = self._team_shares(teams)
        order = sorted(((share, -INF), t) for share, t in zip(shares, teams))
        self._turns(_Turns(None, phase, order, (1, phase)))

    def _turns(self, turns: _Turns) -> None:
        """Give the first of ``turns`` its turn (nothing is looked at before it)."""
        if turns.order:
            self._push(turns.key(0), ("turn", turns))

    def _take_turn(self, turns: _Turns) -> None:
        """The next team (user of ``turns.team``) in ``turns`` whose needs the room still admits
        is opened now, in its turn; those before it that it no longer admits are left for when
        room grows, as a pass that looked at each in its turn would pass them over. The one after
        it gets its turn."""
        order, team, phase = turns.order, turns.team, turns.phase
        tq = self.room.teams.get(team) if team is not None else None
        if team is None:
            found = self._beyond_room() if self._beyond_room is not None else None
            room, beyond = found if found is not None else (None, ())
            index = self.room.by_need
        else:
            room = self._narrow(tq.needs, team) if tq is not None and self._narrow else None
            beyond, index = (), tq.by_need if tq is not None else self.room.by_need
        if room is not None and not self.full and not beyond and not _admits_any(index, room):
            # the room admits none of them any more: all left for when room grows, in one go
            self._unopened.append((None, ("turns", turns, turns.at)))
            turns.at = len(order)
            return
        while turns.at < len(order):
            name = order[turns.at][1]
            key = turns.key(turns.at)
            turns.at += 1
            needs = _needs_of(self.room, team, name)
            if needs is None:
                continue  # (none of it waits any more)
            if room is None or self.full or name in beyond or room.admits_gpu(needs):
                if turns.at < len(order):
                    self._push(turns.key(turns.at), ("turn", turns))
                if team is None:
                    self._open_team(name, phase)
                else:
                    self._prefix[(name, phase)] = key  # its requests' keys begin with it
                    self._open_user(team, name, phase)
                return
            self._unopened.append((key, turns.item(name)))

    def _left(self) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...]]]:
        """(key, item) of each team and user left for when room grows."""
        for key, item in self._unopened:
            if item[0] == "turns":
                turns, at = item[1], item[2]
                for rest, name in turns.order[at:]:
                    yield turns.head + rest, turns.item(name)
            elif item[0] == "rest":
                phase, chosen = item[1], item[2]
                for team in self.room.teams:
                    if team not in chosen:
                        yield self._team_key(team, phase), ("team", team, phase)
            elif key is None:
                yield self._team_key(item[1], item[2]), item
            else:
                yield key, item

    def _reopen(self, revive: bool) -> None:
        """Room grew: the teams and users left for it are pushed at their turn, or, when
        ``revive`` and their turn is passed, at the walk's position (as those passed over are);
        after a reservation was released (not ``revive``) only those whose turn is to come."""
        kept: list[tuple[tuple[Any, ...] | None, tuple[Any, ...]]] = []
        for key, item in self._left():
            if key > self._cursor:
                self._push(key, item)
            elif revive:
                self._push(self._cursor, item)
            else:
                kept.append((key, item))
        self._unopened = kept

    def _open_team(self, team: str, phase: int) -> None:
        tq = self.room.teams.get(team)
        if tq is None:
            return
        if phase == 0 and self._phase_room is not None:
            if tq.needs.equivalents.smallest() > self._phase_room(team):
                return  # nothing of it fits in its guarantee (its --memory asks count as 0)
        if not self.full and not self._worth(tq.needs, team, None):
            self._passed.append(("team", team, phase))
            return
        room = self._narrowed(tq.needs, team)
        if room is None:
            for user in list(tq.users):
                self._open_user(team, user, phase)
            return
        users = admitted(tq.by_need, room)
        if self._user_ranks is None:
            for user in users:
                self._open_user(team, user, phase)
        else:  # each when its turn comes: the room may have shrunk by then
            order = sorted(zip(self._user_ranks(users), users))
            self._turns(_Turns(team, phase, order, (1, phase, self._team_share(team))))
        if len(users) < len(tq.users):  # the others need more than the room: passed over
            self._passed.append(("users", team, frozenset(users), phase))

    def _narrowed(self, needs: Needs, team: str) -> Room | None:
        """The room, when only it can make these requests act (so that the index of what they
        need finds those that can), else None (look at each)."""
        if self.full or self._narrow is None:
            return None
        return self._narrow(needs, team)

    def _open_users_but(self, team: str, opened: frozenset[str], phase: int) -> None:
        """Look again at the users of ``team`` that the index passed over."""
        tq = self.room.teams.get(team)
        for user in list(tq.users) if tq is not None else ():
            if user not in opened:
                self._open_user(team, user, phase)

    def _open_user(self, team: str, user: str, phase: int) -> None:
        uq = self.room.teams[team].users.get(user) if team in self.room.teams else None
        if uq is None:
            return
        if not self.full and not self._worth(uq.needs, team, user):
            self._passed.append(("user", team, user, phase))
            return
        room = self._narrowed(uq.needs, team)
        if room is None:
            for gkey in list(uq.groups):
                self._open_group(team, user, gkey, phase)
            return
        gkeys = admitted(uq.by_need, room)
        prefix = self._prefix.get((user, phase))
        if prefix is not None and len(gkeys) > 1:  # (its requests' keys are known)
            self._open_groups_in_turn(team, user, gkeys, phase, prefix)
        else:
            for gkey in gkeys:
                self._open_group(team, user, gkey, phase)
        if len(gkeys) < len(uq.groups):  # the others need more than the room: passed over
            self._passed.append(("groups", team, user, frozenset(gkeys), phase))

    def unskip(self) -> None:
        """Groups passed over after a failure may act again (GPUs held for another came free)."""
        skipped, self._skipped = self._skipped, {}
        for (user, gkey), (team, phase) in skipped.items():
            self._push(self._cursor, ("group", team, user, gkey, phase, None))
        self._reopen(revive=False)

    def revive(self) -> None:
        """Room grew during the pass: look again at everything passed over."""
        self.unskip()
        self._reopen(revive=True)
        passed, self._passed = self._passed, []
        for item in passed:
            self._push(self._cursor, item)
