"""Property tests: the fair-share policy driving the real packing (through the simulator's pool).

Whatever the workload: no lease exceeds a GPU's memory and fractions never overcommit a GPU; a
gang's ranks sit on distinct GPUs; a request owed by its team's guarantee starts within a bounded
time; and nothing starves (every request that could ever fit is eventually served).
"""

import heapq

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.model import GpuSlot, Request
from jupyter_gpu.broker.packing import never_fits
from jupyter_gpu.broker.quotas import PoolQuotas, Team, UserQuota
from jupyter_gpu.common.protocol import RequestSpec
from tests.broker.fairsim import GiB, gpus, pool_sim

D = 50.0  # longest lease
TICK = 5.0  # the broker re-runs the pass every second; the simulation every TICK
RESERVE_AFTER = 20.0
# how long a request owed by its team's guarantee may wait (docs/fair-share.md)
BOUND = RESERVE_AFTER + 3 * D + 2 * TICK

specs = st.one_of(
    st.builds(lambda f: {"fraction": f}, st.sampled_from([0.1, 0.23, 0.25, 0.47, 0.5, 0.81, 1.0])),
    st.just({"gpus": 1}),
    st.builds(lambda f: {"fraction": f, "workers": 2}, st.sampled_from([0.25, 0.5, 1.0])),
)
jobs = st.lists(
    st.tuples(
        st.floats(0, 200),
        st.integers(0, 5),
        specs,
        st.floats(1, D),
        st.sampled_from(["interactive", "batch"]),
    ),
    min_size=1,
    max_size=25,
)


@st.composite
def streams(draw):
    """A steady stream of small requests for 600 s (what would starve a gang or a big request
    without reservations), plus a few random requests in the middle of it."""
    period = draw(st.floats(2.0, 8.0))
    seed = draw(st.integers(0, 2**16))
    import random

    rng = random.Random(seed)
    stream = [
        (
            k * period,
            rng.randrange(6),
            {"fraction": rng.choice([0.25, 0.5])},
            rng.uniform(10, D),
            "interactive",
        )
        for k in range(int(600 / period))
    ]
    probes = draw(
        st.lists(
            st.tuples(
                st.floats(50, 300),
                st.integers(0, 5),
                specs,
                st.floats(1, D),
                st.sampled_from(["interactive", "batch"]),
            ),
            min_size=1,
            max_size=4,
        )
    )
    return sorted(stream + probes, key=lambda j: j[0])


@st.composite
def pools(draw):
    sizes = draw(st.lists(st.sampled_from([8, 16, 24, 80]), min_size=2, max_size=4))
    shares = draw(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3))
    scale = len(sizes) * draw(st.floats(0.3, 1.0)) / max(sum(shares), 1e-9)
    return sizes, [round(s * scale, 2) for s in shares]


def initial_events(workload, n_gpus: int, horizon: float) -> tuple[list, int]:
    """The event heap: each request's arrival (a gang wider than the pool is left out), and a tick
    every TICK up to ``horizon``; returns it and the last sequence number used."""
    events, seq = [], 0
    for n, (t, u, spec, dur, prio) in enumerate(workload):
        r = Request(
            id=f"R{n}",
            user=f"u{u}",
            kernel="k",
            client=None,
            spec=RequestSpec(priority=prio, **spec),
        )
        if r.spec.workers <= n_gpus:
            heapq.heappush(events, (t, seq := seq + 1, "arrive", (r, dur)))
    for k in range(int(horizon / TICK)):
        heapq.heappush(events, (k * TICK, seq := seq + 1, "tick", None))
    return events, seq


def run(sizes, guarantees, workload, reclaim=True):
    pool = _pool(sizes, guarantees)
    if not reclaim:
        pool._preempt = None
    events, seq = initial_events(
        workload, len(sizes), 200 + (len(workload) + 3) * (D + RESERVE_AFTER + TICK)
    )
    durations, within_since, served, submitted, worst, waits = {}, {}, set(), {}, 0.0, {}
    while events:
        t, _, kind, obj = heapq.heappop(events)
        pool.now = t
        if kind == "arrive":
            r, dur = obj
            pool.submit(r)
            durations[r.id] = dur
            submitted[r.id] = r
        elif kind == "end":
            for lid in obj:
                pool.end(lid)
        grants, _ = pool.schedule()
        pool.check_invariants()
        for g in pool.gpus.values():  # fractions never overcommit
            assert (
                sum(
                    ls.allocations[0].bytes
                    for ls in pool.leases.values()
                    if ls.allocations[0].gpu == g.id
                )
                <= g.total_bytes
            )
        for req, lease in grants:
            if req.id not in served:
                served.add(req.id)
                ranks = [pool.leases[lid].allocations[0].gpu for lid in req.leases]
                assert len(set(ranks)) == len(ranks) == req.spec.workers  # a gang: distinct GPUs
                heapq.heappush(
                    events, (t + durations[req.id], seq := seq + 1, "end", list(req.leases))
                )
                within_since.pop(req.id, None)
                waits[req.id] = t - req.submitted
        p = pool.policy
        for req in pool.queue:  # how long has a guarantee been owed?
            if p.within_guarantee(req.team, p.need(req.spec)):
                within_since.setdefault(req.id, t)
                worst = max(worst, t - within_since[req.id])
            else:
                within_since.pop(req.id, None)
    return pool, served, submitted, worst, waits


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools(), jobs, st.booleans())
def test_no_overcommit_distinct_gang_gpus_and_no_starvation(pool_def, workload, reclaim):
    sizes, guarantees = pool_def
    pool, served, submitted, _, _ = run(sizes, guarantees, workload, reclaim)
    assert not pool.queue, [(r.id, r.spec.describe(), r.reason) for r in pool.queue]
    assert not pool.leases
    assert served == set(submitted)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools(), jobs)
# found by Hypothesis (2026-12-07): R2, u0's second 0.1 GPU request, was never looked at in the pass
# that granted R9, the first of its group, on R9's own entry (it held a reservation); the group's
# entry for R9 was then dropped as seen and R2 with it, and since nothing else changed it waited
# 134 s beside a free GPU until a gang's reservation took the pool
@example(
    ([8, 8], [2.0, 0.0, 0.0]),
    [
        (0.0, 0, {"fraction": 0.1}, 1.0, "interactive"),
        (0.0, 1, {"fraction": 1.0, "workers": 2}, 28.0, "interactive"),
        (21.0, 0, {"fraction": 0.1}, 1.0, "interactive"),
        (0.0, 0, {"gpus": 1}, 8.0, "interactive"),
        (0.0, 0, {"fraction": 0.1}, 1.0, "interactive"),
        (0.0, 0, {"gpus": 1}, 1.0, "interactive"),
        (0.0, 0, {"fraction": 0.25, "workers": 2}, 37.0, "interactive"),
        (0.0, 1, {"fraction": 1.0, "workers": 2}, 10.0, "interactive"),
        (0.0, 2, {"fraction": 1.0, "workers": 2}, 50.0, "interactive"),
        (20.0, 0, {"fraction": 0.1}, 22.0, "interactive"),
    ],
)
# found by Hypothesis (2026-12-07), on stop 27's code too: R19, a guaranteed 0.1 GPU request,
# waited 133 s. When it aged, GPUs were held for another request (R6: it drained in 30 s); then two
# gangs that had aged went first, as the order says (docs/fair-share.md: aged gangs first): R4, its
# own user's, drained in 14 s; R20, of a team with no guarantee, drained in 46 s and ran 43 s on
# borrowed capacity, which is not reclaimed from a gang (its ranks are never taken back). This
# test's old bound (reserve-after + 2 leases) left no room for a gang ahead; the documented one
# (reserve-after + 3 leases, as under a steady stream) holds
@example(
    ([8, 8], [1.94, 0.0, 0.0]),
    [(0.0, 0, {"gpus": 1}, 1.0, "interactive")] * 2
    + [(0.0, 0, {"fraction": 0.1}, 1.0, "interactive")] * 2
    + [(15.0, 0, {"fraction": 0.25, "workers": 2}, 46.0, "interactive")]
    + [(0.0, 0, {"gpus": 1}, 1.0, "interactive"), (0.0, 1, {"gpus": 1}, 14.0, "interactive")]
    + [(0.0, 0, {"fraction": 0.1}, 1.0, "interactive")] * 8
    + [
        (0.0, 0, {"fraction": 1.0}, 12.0, "interactive"),
        (0.0, 0, {"fraction": 1.0}, 21.0, "interactive"),
        (0.0, 1, {"fraction": 0.1}, 18.0, "interactive"),
        (58.0, 0, {"fraction": 0.1}, 44.0, "interactive"),
        (72.0, 0, {"fraction": 0.1}, 1.0, "interactive"),
        (20.0, 1, {"fraction": 1.0, "workers": 2}, 43.0, "interactive"),
        (1.0, 0, {"gpus": 1}, 36.0, "interactive"),
        (0.0, 0, {"fraction": 0.1}, 1.0, "interactive"),
        (0.0, 0, {"fraction": 0.25, "workers": 2}, 31.0, "interactive"),
    ],
)
def test_every_guarantee_is_met_within_a_bounded_time(pool_def, workload):
    sizes, guarantees = pool_def
    _, _, _, worst, _ = run(sizes, guarantees, workload, reclaim=True)
    # owed since t: reserved after RESERVE_AFTER, then GPUs held for it drain within one lease,
    # after the reservation ahead of it when it aged (at most 1/4 of the GPUs, at least one, are
    # held at once) and a gang that aged first (its drain and its run: a gang is not reclaimed)
    assert worst <= BOUND, worst


def test_memory_requests_count_against_the_largest_gpu():
    p = FairSharePolicy(PoolQuotas())
    p.reference_bytes = 80 * GiB
    assert p.need(RequestSpec(memory=40 * GiB)) == 0.5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools(), streams())
def test_under_a_steady_stream_guarantees_are_met_and_gangs_do_not_starve(pool_def, workload):
    sizes, guarantees = pool_def
    pool, served, submitted, worst, waits = run(sizes, guarantees, workload, reclaim=True)
    assert served == set(submitted)
    assert worst <= BOUND, worst
    gangs = [waits[r.id] for r in submitted.values() if r.spec.workers > 1 or r.spec.gpus]
    assert all(w <= BOUND for w in gangs), gangs


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from([16, 24, 80]), min_size=1, max_size=3),
    jobs,
    st.sampled_from([0.0, 5.0, 30.0]),
)
def test_suspension_moves_only_idle_sessions_and_never_overcommits(sizes, workload, after):
    """With suspension of idle sessions on: only sessions idle for ``after`` are ever moved, only
    for an interactive request, never a running one; memory is never overcommitted; everything is
    served."""
    sim = pool_sim()
    pool = sim.SimPool(
        gpus(*sizes), FairSharePolicy(PoolQuotas(suspend_idle_after=after, min_run_time=0.0))
    )
    events, seq = initial_events(workload, len(sizes), 300 + len(workload) * 2 * D)
    durations, moved = {}, 0
    while events:
        t, _, kind, obj = heapq.heappop(events)
        pool.now = t
        if kind == "arrive":
            r, dur = obj
            pool.submit(r)
            durations[r.id] = dur
        elif kind == "idle":  # the cell ended: the session stays, idle, until its owner leaves
            for lid in obj:
                pool.policy.lease_state(lid, "idle", t)
            heapq.heappush(events, (t + D, seq := seq + 1, "end", obj))
        elif kind == "end":
            for lid in obj:
                pool.end(lid)
        idle_before = {lid: rec.idle_since for lid, rec in pool.policy.leases.items()}
        grants, taken = pool.schedule()
        for lease, why in taken:
            assert why.startswith("suspended"), why
            # idle long enough
            assert idle_before[lease.id] is not None and t - idle_before[lease.id] >= after
            assert not pool.req_of(lease).spec.workers > 1
            moved += 1
        pool.check_invariants()
        for req, lease in grants:
            if lease.id == req.leases[0]:
                for lid in req.leases:
                    pool.policy.lease_state(lid, "running", t)
                heapq.heappush(
                    events, (t + durations[req.id], seq := seq + 1, "idle", list(req.leases))
                )
    event(f"idle sessions moved: {'some' if moved else 'none'}")
    assert not pool.queue, [(r.id, r.spec.describe(), r.reason) for r in pool.queue]
    assert not pool.leases


def test_the_simulator_gives_the_same_result_whatever_the_string_hash_seed():
    """Bug fixed: victims were taken from a GPU's set of lease ids in the set's order, so ties in
    the victim order depended on Python's per-process string hashing and the benchmark's figures
    moved from run to run (48 users, seed 5: p95 5.7 or 5.8 s)."""
    import os
    import subprocess
    import sys

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pool_sim', {pool_sim().__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pool_sim'] = m; "
        "spec.loader.exec_module(m)\n"
        "r = m.simulate('fair', 48, 16, 4, 5)\n"
        "print(repr((r.pct(95), r.moved, r.preemptions, len(r.waits))))\n"
    )
    outs = set()
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        assert out.returncode == 0, out.stderr
        outs.add(out.stdout)
    assert len(outs) == 1, outs


def test_standby_copies_in_the_simulator_move_sessions_for_free_only_when_complete():
    """The simulator's model of standby copies: none are written when they are off; with them, only
    moves that found a complete copy are free, the copies' bytes are counted, and moving state costs
    the waiting cells less (the team's p95 falls) on the same workload."""
    sim = pool_sim()
    off = sim.simulate("fair", 24, 8, 1, 3, sim.MoveCosts(standby_after=None))
    on = sim.simulate("fair", 24, 8, 1, 3, sim.MoveCosts(standby_after=2.0))
    assert off.moved > 0 and off.moved_by_copy == 0 and off.copy_bytes == 0 and off.copy_peak == 0
    assert 0 < on.moved_by_copy <= on.moved and on.copy_bytes > 0 and on.copy_peak > 0
    assert on.pct(95) < off.pct(95)
    # a copy that is never needed still cost its writes: copies written exceed what the moves used
    assert on.copy_bytes > on.moved_by_copy * sim.GiB


host_specs = st.tuples(
    st.one_of(
        st.builds(lambda f: {"fraction": f}, st.sampled_from([0.1, 0.25, 0.5, 1.0])),
        st.builds(lambda n: {"gpus": n}, st.integers(1, 2)),
        st.builds(lambda f: {"fraction": f, "workers": 2}, st.sampled_from([0.25, 0.5])),
    ),
    st.one_of(st.none(), st.sampled_from([1, 3, 8, 20]).map(lambda g: g * GiB)),
    st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.5, 6.0])),
)
machines = st.lists(
    st.tuples(
        st.integers(1, 3),  # GPUs (16 GiB each)
        st.one_of(st.none(), st.sampled_from([4, 16, 32]).map(lambda g: g * GiB)),
        st.one_of(st.none(), st.sampled_from([2.0, 4.5, 8.0])),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    machines,
    st.lists(
        st.tuples(st.floats(0, 100), st.integers(0, 3), host_specs, st.floats(1, D)), max_size=30
    ),
    st.sampled_from([None, 0.0]),
)
def test_the_host_memory_and_cores_booked_on_a_machine_never_exceed_what_it_leaves_to_sessions(
    machines, workload, suspend_after
):
    """Whatever the machines report (memory and cores left to sessions, or nothing: unbounded) and
    whatever the requests ask for (explicit host memory and cores, or the pool's defaults in
    proportion to their GPU share), at every step the leases on a machine book no more host memory
    and cores than it leaves to sessions, and no more GPU memory than its GPUs have; every request
    that fits some empty machine is served in the end (none is lost in the queue's index), and each
    lease's machine had room for what it books."""
    sim = pool_sim()
    slots = [
        GpuSlot(worker=f"w{m}", index=i, uuid=f"G{m}.{i}", name="g", total_bytes=16 * GiB)
        for m, (n, _, _) in enumerate(machines)
        for i in range(n)
    ]
    policy = FairSharePolicy(PoolQuotas(suspend_idle_after=suspend_after, min_run_time=0.0))
    pool = sim.SimPool(slots, policy)
    for m, (_, memory, cpus) in enumerate(machines):
        pool.ledger.set_host(f"w{m}", memory=memory, cpus=cpus)
    events, seq = [], 0
    fits: set[str] = set()
    served: set[str] = set()
    durations: dict[str, float] = {}
    for n, (t, u, (spec, host_memory, cpus), dur) in enumerate(workload):
        r = Request(
            id=f"R{n}",
            user=f"u{u}",
            kernel="k",
            client=None,
            spec=RequestSpec(host_memory=host_memory, cpus=cpus, **spec),
        )
        if never_fits(r.spec, slots, pool.ledger.hosts) is not None:
            continue  # the broker refuses it at once
        heapq.heappush(events, (t, seq := seq + 1, "arrive", (r, dur)))
    horizon = 100 + (len(workload) + 2) * (D + TICK)
    for k in range(int(horizon / TICK)):
        heapq.heappush(events, (k * TICK, seq := seq + 1, "tick", None))
    while events:
        t, _, kind, obj = heapq.heappop(events)
        pool.now = t
        if kind == "arrive":
            r, dur = obj
            pool.submit(r)
            fits.add(r.id)
            durations[r.id] = dur
        elif kind == "end":
            for lid in obj:
                pool.end(lid)
        grants, _ = pool.schedule()
        pool.check_invariants()
        for host in pool.ledger.hosts.values():
            mine = [ls for ls in pool.leases.values() if ls.worker == host.worker]
            if host.memory is not None:
                assert sum(ls.host_memory for ls in mine) <= host.memory, host
            if host.cpu_milli is not None:
                assert sum(ls.cpu_milli for ls in mine) <= host.cpu_milli, host
        for req, lease in grants:
            if lease.id == req.leases[0]:
                served.add(req.id)
                for lid in req.leases:
                    ls = pool.leases[lid]
                    if req.spec.host_memory is not None:
                        assert ls.host_memory == req.spec.host_memory
                heapq.heappush(
                    events, (t + durations[req.id], seq := seq + 1, "end", list(req.leases))
                )
    assert not pool.queue, [(r.id, r.spec.describe(), r.reason) for r in pool.queue]
    assert not pool.leases
    assert served == fits


def _pool(sizes, guarantees):
    sim = pool_sim()
    users = {f"u{i}": f"t{i % 3}" for i in range(6)}
    q = PoolQuotas(
        teams={f"t{i}": Team(name=f"t{i}", guarantee=g) for i, g in enumerate(guarantees)},
        users={u: UserQuota(name=u, team=t) for u, t in users.items()},
        reserve_after=RESERVE_AFTER,
        min_run_time=0.0,
        configured=True,
    )
    return sim.SimPool(gpus(*sizes), FairSharePolicy(q))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools(), jobs)
def test_a_pass_that_looks_only_where_room_grew_grants_what_looking_everywhere_grants(pool, work):
    """The scheduling pass looks only at the room of the workers that changed since the last pass
    (``Packer.changed_room``, issue 24): on any workload it grants, reclaims and places exactly
    what a pass that looks at the whole pool's room does."""
    sizes, guarantees = pool
    narrow, everywhere = _pool(sizes, guarantees), _pool(sizes, guarantees)
    events, seq = initial_events(
        [(t, u, spec, dur, prio) for t, u, spec, dur, prio in work], len(sizes), 400.0
    )
    twin: dict[str, Request] = {}
    while events:
        t, _, kind, obj = heapq.heappop(events)
        narrow.now = everywhere.now = t
        if kind == "arrive":
            r, dur = obj
            twin[r.id] = Request(id=r.id, user=r.user, kernel="k", client=None, spec=r.spec)
            narrow.submit(r)
            everywhere.submit(twin[r.id])
        elif kind == "end":
            for lid in obj:
                narrow.end(lid)
                everywhere.end(lid)
        everywhere.ledger.packer.mark_all()
        done = [narrow.schedule(), everywhere.schedule()]
        seen = [
            (
                [(r.id, ls.id, [(a.gpu, a.bytes) for a in ls.allocations]) for r, ls in grants],
                sorted(ls.id for ls, _ in taken),
            )
            for grants, taken in done
        ]
        assert seen[0] == seen[1], (t, kind)
        ends = [ls.id for _, ls in done[0][0]]
        if ends:
            dur = 10.0 + len(ends)
            heapq.heappush(events, (t + dur, seq := seq + 1, "end", ends))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools(), jobs, st.sampled_from([None, 0.0, 5.0]), st.booleans())
def test_a_pass_that_finds_what_the_room_admits_by_its_index_grants_what_looking_at_each_does(
    pool, work, after, configured
):
    """A pass finds the users and groups the room admits through the waiting room's index of what
    they need, and opens a user only when its turn comes (``waiting.Walk``): on any workload, with
    reclaim (quotas) or suspension of idle sessions on or off, it grants, reclaims, suspends and
    places exactly what a pass that looks at every user and group of a team does."""
    sizes, guarantees = pool
    twins = []
    for indexed in (True, False):
        p = _pool(sizes, guarantees)
        p.policy.quotas.configured = configured
        p.policy.quotas.suspend_idle_after = after
        p.queue.indexed = indexed
        twins.append(p)
    events, seq = initial_events(work, len(sizes), 400.0)
    while events:
        t, _, kind, obj = heapq.heappop(events)
        for p in twins:
            p.now = t
            if kind == "arrive":
                r, _dur = obj
                p.submit(Request(id=r.id, user=r.user, kernel="k", client=None, spec=r.spec))
            elif kind == "idle":
                for lid in obj:
                    p.policy.lease_state(lid, "idle", t)
            elif kind == "end":
                for lid in obj:
                    if lid in p.leases:
                        p.end(lid)
        done = [p.schedule() for p in twins]
        seen = [
            (
                [(r.id, ls.id, [(a.gpu, a.bytes) for a in ls.allocations]) for r, ls in grants],
                sorted((ls.id, why) for ls, why in taken),
            )
            for grants, taken in done
        ]
        assert seen[0] == seen[1], (t, kind)
        event(f"preempted: {'some' if seen[0][1] else 'none'}")
        ends = [ls.id for _, ls in done[0][0]]
        if ends:
            for p in twins:
                for lid in ends:
                    p.policy.lease_state(lid, "running", t)
            heapq.heappush(events, (t + 5.0 + len(ends), seq := seq + 1, "idle", ends))
            heapq.heappush(events, (t + 40.0 + len(ends), seq := seq + 1, "end", ends))
