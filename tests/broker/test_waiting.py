"""The indexed queue (broker/waiting.py) and the walk of a scheduling pass over it: what cannot act
is passed over, and nothing that can act is."""

from __future__ import annotations

import gc
import weakref

from hypothesis import example, given, settings
from hypothesis import strategies as st

from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.model import Allocation, Request
from jupyter_gpu.broker.quotas import PoolQuotas
from jupyter_gpu.broker.scheduling import EPS, PassState
from jupyter_gpu.broker.waiting import Room, WaitingRoom, Walk, admitted
from jupyter_gpu.common.protocol import RequestSpec
from tests.broker.fairsim import GiB, gpus, pool_sim, quotas, req

INF = float("inf")


def test_a_whole_gpu_request_that_cannot_fit_now_still_gets_gpus_reserved_once_it_waited():
    """Bug fixed (in the indexed walk): with no whole GPU free, the walk passed over the group of a
    ``--gpus 1`` request as "cannot fit", so it was never reserved for and waited as long as the
    stream of small requests lasted (1,120 s in the property test instead of under 180 s)."""
    sim = pool_sim()
    pool = sim.SimPool(gpus(16, 16), FairSharePolicy(PoolQuotas(reserve_after=20.0)))
    for n in range(2):
        pool.submit(req(f"small{n}", fraction=0.75))
    pool.schedule()
    assert len(pool.leases) == 2 and all(g.leased_bytes for g in pool.gpus.values())
    whole = req("carol", gpus=1)
    pool.submit(whole)
    pool.schedule()
    assert pool.ledger.queue.get(whole.id) is whole and not pool.policy.reservations
    pool.now = 30.0
    pool.schedule()
    assert whole.id in pool.policy.reservations, whole.reason
    assert "reserved for it" in whole.reason


def test_the_simulators_fifo_baseline_is_served_in_arrival_order_by_the_walk(caplog):
    """Bug fixed: the simulator's FIFO baseline kept its old two-part sort key, which the indexed
    walk could not order against its teams: every pass failed (logged) and its figures were
    nonsense. With the fair-share key's shape, passes run and cells are served."""
    sim = pool_sim()
    with caplog.at_level("ERROR"):
        r = sim.simulate("fifo", 24, 8, 2, 3, sim.MoveCosts(), 0.0)
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]
    assert r.waits and r.alloc_area > 0


def _counting_placements(pool) -> dict[str, int]:
    """How many times the pass tries to place each request (the packer's own ``place``, counted)."""
    tries: dict[str, int] = {}
    place = pool.ledger.packer.place

    def counted(spec, held=()):
        tries[spec.describe()] = tries.get(spec.describe(), 0) + 1
        return place(spec, held)

    pool.ledger.packer.place = counted
    return tries


def _book(pool, user: str, gpu_id: str, fraction: float) -> str:
    """A lease of ``user`` on that GPU (the ledger's own grant, placed by hand); returns its id."""
    slot = pool.gpus[gpu_id]
    lease_req = req(user, fraction=fraction)
    pool.submit(lease_req)
    nbytes = int(fraction * slot.total_bytes)
    placement = [(slot.worker, [Allocation(gpu=slot.id, index=slot.index, bytes=nbytes)])]
    (lease,) = pool.ledger.grant(lease_req, placement, False)
    return lease.id


def test_a_request_that_cannot_fit_costs_no_placement_when_room_grows_where_it_cannot_fit():
    """Bug fixed (issue 24: a decision under 1 ms with 100,000 queued): every pass tried each
    request that the pool's largest room seemed to admit, though nothing had changed where it
    could fit: a gang of two 0.6 ranks, with 0.6 free on one GPU of the pool, was tried again at
    every lease end anywhere. A pass now looks only at the room of
    the workers that changed since the last pass (which found no place for anything still
    waiting); it still starts the gang once it fits."""
    sim = pool_sim()
    pool = sim.SimPool(gpus(*[16] * 6, per_worker=2), FairSharePolicy(PoolQuotas()))
    ids = list(pool.gpus)  # w0: 0, 1; w1: 2, 3; w2: 4, 5
    for gpu_id, fraction in zip(ids, (0.4, 1.0, 1.0, 1.0, 0.5, 1.0)):
        _book(pool, "holder", gpu_id, fraction)
    ends_on_w1 = pool.ledger.gpus[ids[2]].leases.copy().pop()
    ends_on_w2 = _book(pool, "holder", ids[4], 0.5)
    pool.schedule()
    tries = _counting_placements(pool)
    gang = req("e", workers=2, fraction=0.6)
    pool.submit(gang)
    pool.schedule()
    assert tries == {gang.spec.describe(): 1} and gang in pool.queue  # told once why it waits
    pool.end(ends_on_w2)
    for _ in range(3):
        pool.schedule()  # 0.5 free on w2 now: nowhere for a rank of 0.6 that was not there
    assert tries == {gang.spec.describe(): 1}, tries
    pool.end(ends_on_w1)  # a whole GPU free on w1: the gang fits there and on w0
    grants, _ = pool.schedule()
    assert sorted((r.id, lease.worker) for r, lease in grants) == [(gang.id, "w0"), (gang.id, "w1")]
    pool.check_invariants()


def test_a_request_held_back_by_its_teams_limit_starts_where_nothing_changed():
    """The pass that looks only where room grew must still see a limit loosen: carol's team is at
    its limit and her request would fit the free GPU w1; her 0.25 lease on w0 ends, which frees
    too little there for it, and she is served on w1, where nothing changed."""
    sim = pool_sim()
    limited = quotas(
        teams={
            "ml": {"guarantee": 1.0, "members": ["alice"]},
            "viz": {"guarantee": 0.5, "limit": 0.5, "members": ["carol"]},
        }
    )
    pool = sim.SimPool(gpus(16, 16, per_worker=1), FairSharePolicy(limited))
    pool.submit(req("alice", fraction=0.75))
    pool.schedule()
    small = req("carol", fraction=0.25)
    pool.submit(small)
    pool.schedule()
    assert {lease.worker for lease in pool.leases.values()} == {"w0"}  # best fit: w0 is full
    waiting = req("carol", fraction=0.5)
    pool.submit(waiting)
    pool.schedule()
    assert waiting in pool.queue and "quota" in (waiting.reason or ""), waiting.reason
    pool.end(next(lid for lid, ls in pool.leases.items() if ls.user == "carol"))
    grants, _ = pool.schedule()
    assert [(r.id, lease.worker) for r, lease in grants] == [(waiting.id, "w1")]


# one change of the waiting room: (submit or take out, which request, its user, its shape, when)
room_changes = st.lists(
    st.tuples(
        st.booleans(),
        st.integers(0, 15),
        st.integers(0, 8),
        st.sampled_from(
            [{"fraction": 0.1}, {"fraction": 0.5}, {"gpus": 1}, {"gpus": 2}, {"memory": 4 * GiB}]
        ),
        st.sampled_from([0.0, 10.0, 30.0]),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(room_changes, st.sampled_from([0.05, 0.3, 1.0]), st.sampled_from([0.0, 1.0, 2.0]))
def test_the_teams_a_room_admits_and_those_that_waited_are_what_a_look_at_each_team_finds(
    changes, fraction, whole
):
    """The waiting room's index of teams by their smallest need (``WaitingRoom.by_need``) and by
    their oldest request (``by_age``): after any requests came and went, the teams it gives for a
    room, and those that waited long enough, are those a look at each team's requests finds."""
    room = WaitingRoom(lambda r: f"t{int(r.user[1:]) % 3}")
    queued: dict[str, Request] = {}
    for add, n, user, spec, at in changes:
        rid = f"r{n}"
        if add and rid not in queued:
            queued[rid] = Request(
                id=rid, user=f"u{user}", kernel="k", client=None, spec=RequestSpec(**spec)
            )
            queued[rid].submitted = at
            room.append(queued[rid])
        elif not add and rid in queued:
            room.remove(queued.pop(rid))
        for gib in (2, 8):
            limit = Room((fraction, gib * GiB, whole))
            teams: dict[str, list[Request]] = {}
            for r in queued.values():
                teams.setdefault(room._team_of(r), []).append(r)
            fits = {t for t, rs in teams.items() if any(limit.admits_spec(r.spec) for r in rs)}
            assert set(admitted(room.by_need, limit)) == fits
            for now, after in ((30.0, 20.0), (40.0, 10.0), (10.0, 0.0)):
                waited = {
                    t for t, rs in teams.items() if min(r.submitted for r in rs) <= now - after
                }
                assert set(room.waited(now, after)) == waited


def test_a_pass_leaves_nothing_for_the_garbage_collector():
    """Bug fixed (issue 24: the decisions' p99 was 3 times their p50 at 10,000 GPUs and 100,000
    waiting): a pass's state and its walk held each other (the walk calls the state's methods),
    so every pass's few thousand heap entries and keys lived on until the cyclic garbage
    collector ran, and that collection, 1-30 ms, fell in a later decision. A pass now lets go of
    its walk: what it made is freed as it ends."""
    sim = pool_sim()
    pool = sim.SimPool(gpus(16, 16), FairSharePolicy(PoolQuotas()))
    for n in range(6):
        pool.submit(req(f"u{n}", fraction=0.5))
    walks: list[weakref.ref] = []
    made = Walk.__init__

    def remembered(self, *args, **kwargs):
        made(self, *args, **kwargs)
        walks.append(weakref.ref(self))

    gc.collect()
    gc.disable()
    try:
        Walk.__init__ = remembered
        grants, _ = pool.schedule()
        pool.ledger.view.refresh(pool.now, force=True)  # (a view's look at the queue: a walk too)
    finally:
        Walk.__init__ = made
        gc.enable()
    assert len(grants) == 4 and len(walks) == 2
    assert [w() for w in walks] == [None, None]


def _walked(
    indexed: bool,
    grow: str,
    teams: list[tuple[float, ...]],
    rooms: list[float],
    fresh=(),
    outside=(),
):
    """The requests a walk gives, in order: team ``t<n>`` (share n: t0 first) has one user with a
    request of each fraction of ``teams[n]``; the pass's room is ``rooms[k]`` once ``k`` were
    given (a grant fills it, or room is made), and when the last of ``rooms`` is reached the
    room grew: ``grow`` is "revive" (room made by a preemption) or "unskip" (GPUs held for a
    reservation were let go). ``fresh``: the requests no pass looked at yet (the walk gives
    them, in their turn, whatever the room); ``outside``: the teams with no room left in their
    guarantee (their requests come in the second phase)."""
    room = WaitingRoom(lambda r: r.team or "")
    for n, fractions in enumerate(teams):
        for fraction in fractions:
            r = req(f"u{n}", fraction=fraction)
            r.id, r.team = f"{n}-{fraction}", f"t{n}"
            room.append(r)
    room.indexed, room.fresh = indexed, set(fresh)
    box = [Room((rooms[0], INF, INF))]

    def share(team: str) -> float:
        return float(team[1:])

    def phase(team: str) -> int:
        return 1 if team in outside else 0

    def key(r):
        # a user's requests: (1, phase, team share) + user rank + (priority rank, age, id)
        return (1, phase(r.team), share(r.team), 0.0, 0, 0, r.submitted, r.id)

    walk = Walk(
        room,
        share,
        key,
        lambda r: False,
        lambda needs, team, user: box[0].admits(needs),
        lambda spec, oldest: box[0].admits_spec(spec),
        phase_of=lambda team, spec: phase(team),
        phase_room=lambda team: 0.0 if team in outside else INF,
        narrow=lambda needs, team: box[0],
        user_ranks=lambda users: [(0.0, 0) for _ in users],
        beyond_room=lambda: (box[0], []),
    )
    walk.full = False
    given = []
    for r in walk:
        given.append(r.id)
        room.remove(r)
        box[0] = Room((rooms[min(len(given), len(rooms) - 1)], INF, INF))
        if len(given) == len(rooms) - 1:
            walk.revive() if grow == "revive" else walk.unskip()
    return given


def test_teams_left_out_while_the_room_was_small_are_looked_at_when_it_grows():
    """The walk opens only the teams (users) whose smallest need the room admits, each in its
    turn (``Walk._take_turn``), and leaves the others for when room grows: after a preemption
    (``revive``) it looks again at every one it left, after a reservation is let go (``unskip``)
    at those whose turn is still to come, as a walk that opens each team in its turn does."""
    # t1 is left at its turn (0.6 > 0.1), then room grows when t2's 0.05 is given
    passed = [(0.2, 0.6), (0.6,), (0.05,), (0.2, 0.6)], [1.0, 0.1, 1.0]
    # t1 and t2 are left when the walk begins (room 0.1), then room grows when t0's is given
    ahead = [(0.05,), (0.6,), (0.6,)], [0.1, 1.0]
    # t1 and t2 are left at t1's turn, together (0.6 > 0.1: ``_take_turn``'s one go), then
    # room grows when t1's request, never looked at yet, is given anyway
    together = [(0.2,), (0.6,), (0.6,)], [1.0, 0.1, 1.0], ["1-0.6"]
    # t0's user has three groups the room admits when its turn comes; once its 0.2 is given, the
    # room admits none of the others and both are left at once (``_take_group_turn``), then
    # room grows when t1's is given: they come before the walk's position (passed over for good)
    groups = [(0.2, 0.6, 0.3), (0.05,)], [1.0, 0.1, 1.0]
    # bug fixed: t1 and t2 have no room left in their guarantee. The first phase finds them
    # (the room admits their needs) and passes them over; in the second, once t0's is given, the
    # room admits t1's need only, and t2 was not left for when it grows, so it was never looked
    # at again in this pass
    second_phase = [(0.05,), (0.05,), (0.6,)], [1.0, 0.1, 1.0], [], ["t1", "t2"]
    seen = {}
    cases = {
        "passed": passed,
        "ahead": ahead,
        "together": together,
        "groups": groups,
        "second phase": second_phase,
    }
    for name, (teams, rooms, *more) in cases.items():
        for grow in ("revive", "unskip"):
            seen[name, grow] = _walked(True, grow, teams, rooms, *more)
            assert seen[name, grow] == _walked(False, grow, teams, rooms, *more), (name, grow)
    # (t1's request comes before the walk's position: passed over for good, in both walks)
    assert (
        seen["passed", "revive"]
        == seen["passed", "unskip"]
        == ["0-0.2", "2-0.05", "3-0.2", "3-0.6"]
    )
    assert seen["ahead", "revive"] == seen["ahead", "unskip"] == ["0-0.05", "1-0.6", "2-0.6"]
    assert seen["together", "revive"] == seen["together", "unskip"] == ["0-0.2", "1-0.6", "2-0.6"]
    assert seen["groups", "revive"] == seen["groups", "unskip"] == ["0-0.2", "1-0.05"]
    assert seen["second phase", "revive"] == ["0-0.05", "1-0.05", "2-0.6"]
    assert seen["second phase", "unskip"] == ["0-0.05", "1-0.05", "2-0.6"]


def _holding(teams: dict, leases: tuple[tuple[str, float], ...], now: float):
    """A simulated pool of three 16 GiB GPUs with ``teams``' quotas whose users hold ``leases``
    (user, fraction), at ``now``."""
    pool = pool_sim().SimPool(gpus(16, 16, 16), FairSharePolicy(quotas(teams=teams)))
    for user, fraction in leases:
        pool.submit(req(user, fraction=fraction))
    pool.schedule()
    pool.now = now
    return pool


def test_the_room_in_a_teams_guarantee_is_read_without_its_decayed_use_as_its_context_gives_it():
    """A pass tells whether anything of a team fits in its guarantee before keying the team
    (``PassState.guarantee_room``, without the decayed use that only the team's place in the
    order needs): it is the room of the team's context (``FairSharePolicy.team_context``), for
    teams under, at and over their guarantee, and as held at the start of the pass."""
    teams = {
        "a": {"guarantee": 1.0, "members": ["alice"]},
        "b": {"guarantee": 0.5, "members": ["bob"]},
        "c": {"guarantee": 2.0, "members": ["carol"]},
    }
    pool = _holding(teams, (("alice", 1.0), ("bob", 0.75), ("carol", 0.5)), now=30.0)
    state = PassState(pool.policy, pool.ledger.packer, pool.ledger.queue, 30.0, None, 0.25)
    try:
        for team in ("a", "b", "c", "nobody"):
            expected = pool.policy.team_context(team, 30.0)[0]
            assert state.guarantee_room(team) == expected, team
        state.freeze("a", "alice")  # (as a grant to it in the pass does) ...
        pool.end(next(lid for lid, ls in pool.leases.items() if ls.user == "alice"))  # ... then
        assert pool.policy.team_context("a", 30.0)[0] == 1.0 + EPS
        assert state.guarantee_room("a") == 0.0 + EPS == state.context("a")[0]  # as at the start
    finally:
        state.close()


@settings(max_examples=60, deadline=None)
@example(1, [(True, 1, 0.0), (False, 1, 0.0), (True, 2, 1.0)])  # emptied, then a newer one
@given(
    st.sampled_from([0, 1]),
    st.lists(st.tuples(st.booleans(), st.integers(0, 6), st.sampled_from([0.0, 1.0, 2.0]))),
)
def test_a_groups_first_is_its_oldest_request_after_any_arrivals_and_departures(rank, ops):
    """A group keeps the part of its keys the walk orders a user's groups by, (priority rank,
    submitted, id) of its oldest request, at hand (``Group.first``) instead of reading its sorted
    list: after random additions and removals (of what is there or not, older or newer than the
    rest) it is what the sorted list's first entry gives."""
    from jupyter_gpu.broker.waiting import Group

    group = Group(((0.5, None, None, None, None), rank, "interactive", 1), RequestSpec())
    for add, n, submitted in ops:
        item = (submitted, f"R{n}")
        if add and item not in group.items and all(i[1] != item[1] for i in group.items):
            group.add(item)
        elif not add:
            group.discard(item)
        if group.items:
            assert group.first == (rank,) + group.items[0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 3.0])), max_size=40
    )
)
def test_the_small_indexes_answer_as_a_sorted_list_does(ops):
    """``Smallest`` (a multiset: counts per value and a sorted list of the values) and ``ByAmount``
    (two parallel sorted lists) replaced ``SortedList``s for speed: the same least value, the same
    entries and the same prefixes after random additions and removals (removing what is not there
    changes nothing)."""
    from jupyter_gpu.broker.waiting import ByAmount, Smallest

    smallest, expected = Smallest(), []
    by_amount, entries = ByAmount(), []
    for n, (add, value) in enumerate(ops):
        what = f"t{n % 5}"
        if add:
            smallest.add(value)
            expected.append(value)
            if (value, what) not in entries and all(w != what for _, w in entries):
                by_amount.add((value, what))
                entries.append((value, what))
        else:
            smallest.remove(value)
            if value in expected:
                expected.remove(value)
            by_amount.discard((value, what))
            if (value, what) in entries:
                entries.remove((value, what))
        assert smallest.least == (min(expected) if expected else INF)
        assert sorted(entries, key=lambda e: e[0]) == sorted(by_amount, key=lambda e: e[0])
        assert list(by_amount.amounts) == sorted(by_amount.amounts)
        for limit in (-1.0, 0.0, 0.3, 1.0, INF):
            assert sorted(by_amount.upto(limit)) == sorted(w for v, w in entries if v <= limit)


def test_a_users_key_prefix_and_its_groups_make_each_requests_full_key():
    """The walk keys a group's requests as (1, phase, the team's share) + the user's rank
    (``PassState.user_ranks``) + (the group's priority rank, submitted, id), without the policy:
    that must be exactly ``PassState.key`` for every waiting request that is not an aged gang,
    users holding GPUs and not, priorities and teams mixed, within and beyond their guarantees,
    and after a grant in the pass (the order is frozen at its start)."""
    teams = {
        "a": {"guarantee": 1.0, "members": ["alice", "bob"]},
        "b": {"guarantee": 0.5, "members": ["carol"]},
    }
    pool = _holding(teams, (("alice", 1.0), ("carol", 0.75), ("bob", 0.25)), now=40.0)
    waiting = [
        req(user, submitted=float(n), priority=prio, fraction=fraction)
        for n, (user, prio, fraction) in enumerate(
            [
                ("alice", "interactive", 1.0),
                ("alice", "batch", 0.5),
                ("bob", "interactive", 0.25),
                ("bob", "batch", 1.0),
                ("carol", "interactive", 0.75),
                ("carol", "batch", 0.1),
            ]
        )
    ]
    for r in waiting:
        pool.submit(r)
    state = PassState(pool.policy, pool.ledger.packer, pool.ledger.queue, 40.0, None, 0.25)
    try:
        state.freeze("a", "alice")  # a grant in the pass changes what they hold: keys do not move
        pool.policy.held_user["alice"] += 1.0
        pool.policy.held_team["a"] += 1.0
        for r in waiting:
            team = pool.policy.team_of(r)
            phase = state.key(r)[1]
            prefix = (1, phase, state.context(team)[1]) + state.user_ranks([r.user])[0]
            rank = 0 if r.spec.priority == "interactive" else 1
            assert prefix + (rank, r.submitted, r.id) == state.key(r), r.id
    finally:
        state.close()


def test_a_gang_and_single_requests_of_the_same_fraction_are_not_one_group():
    """Bug fixed: a user's requests were grouped by their shape per rank and priority, not by how
    many ranks they have, so a gang of two 0.5 ranks and a single 0.5 request were one group, "the
    same but for their age": when the gang (older) found no room in a pass, the rest of its group,
    the single request, was passed over with it, and since the passes after look only where room
    changed, it waited beside 0.5 GPU free."""
    sim = pool_sim()
    pool = sim.SimPool(gpus(16, 16, per_worker=2), FairSharePolicy(PoolQuotas()))
    first, second = pool.gpus
    _book(pool, "holder", first, 1.0)
    half = _book(pool, "holder", second, 0.5)
    _book(pool, "holder", second, 0.5)
    pool.schedule()
    gang = req("e", workers=2, fraction=0.5)
    pool.submit(gang)
    pool.now = 1.0
    single = req("e", fraction=0.5)
    pool.submit(single)
    pool.schedule()  # (each is looked at once, to be told why it waits: nothing is free)
    assert gang in pool.queue and single in pool.queue
    pool.end(half)  # 0.5 free on one GPU: room for the single, not for the gang's two ranks
    pool.now = 2.0
    grants, _ = pool.schedule()
    assert [r.id for r, _ in grants] == [single.id], (single.reason, gang.reason)
    assert gang in pool.queue
