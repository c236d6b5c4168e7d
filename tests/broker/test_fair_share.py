"""The fair-share policy on the real packing: order, quotas, reasons, ETA, reservations, reclaim."""

import pytest

from jupyter_gpu.broker.fair_share import FairQueue, FairSharePolicy
from jupyter_gpu.broker.preemption import suspend_plan
from jupyter_gpu.broker.quotas import PoolQuotas
from jupyter_gpu.common.protocol import RequestSpec
from tests.broker.fairsim import GiB, gpus, pool_sim, quotas, req


def make_pool(q=None, sizes=(16, 16)):
    sim = pool_sim()
    policy = FairSharePolicy(q if q is not None else quotas())
    return sim.SimPool(gpus(*sizes), policy)


def test_within_guarantee_goes_before_over_quota_then_share_priority_age():
    pool = make_pool()
    p = pool.policy
    p.lease_started("X", "alice", "ml", 1.0, False, now=0.0)  # ml is at its guarantee
    over = req("bob", submitted=1)  # ml: over quota
    within = req("carol", submitted=2)  # viz: within
    assert [r.id for r in p.order([over, within])] == [within.id, over.id]
    # among over-quota teams: the one with less use for its guarantee first
    p.lease_started("Y", "carol", "viz", 2.0, False, now=0.0)
    a, c = req("alice", submitted=5), req("carol", submitted=1)
    assert [r.id for r in p.order([c, a])] == [a.id, c.id]
    # same standing: interactive before batch, then age
    b1, i1, i2 = req("bob", 1, "batch"), req("bob", 3), req("bob", 2)
    assert [r.id for r in p.order([b1, i1, i2])] == [i2.id, i1.id, b1.id]


def test_fair_share_remembers_recent_use_with_decay():
    p = FairSharePolicy(quotas())
    p.lease_started("X", "alice", "ml", 1.0, False, now=0.0)
    p.lease_ended("X", now=3600.0)  # ml used 1 GPU for an hour, viz nothing
    a, c = req("alice", submitted=0), req("carol", submitted=10)
    p.clock = lambda: 3601.0
    assert p.order([a, c])[0] is c
    share_soon = p.share("ml", "alice", 3601.0)[0]
    share_later = p.share("ml", "alice", 3601.0 + 4 * 3600)[0]
    assert share_later < share_soon / 10  # four half-lives later it is mostly forgotten


def test_configured_priority_orders_equal_shares():
    q = quotas(
        teams={
            "ml": {"guarantee": 1, "members": ["alice"], "priority": 5},
            "viz": {"guarantee": 1, "members": ["carol"]},
        }
    )
    p = FairSharePolicy(q)
    assert p.order([req("carol", 0), req("alice", 9)])[0].user == "alice"


def test_limit_holds_requests_back_with_the_reason_and_refuses_the_impossible():
    q = quotas(teams={"ml": {"guarantee": 1, "limit": 2, "members": ["alice"]}})
    pool = make_pool(q, sizes=(16, 16, 16))
    for _ in range(2):
        pool.submit(req("alice", gpus=1))
        pool.schedule()
    waiting = req("alice", gpus=1)
    pool.submit(waiting)
    pool.schedule()
    assert waiting.reason == "waiting: team quota full (2.0/2.0 GPU)"
    assert pool.policy.never_within_limits("alice", RequestSpec(gpus=3)) is not None
    assert pool.policy.never_within_limits("alice", RequestSpec(gpus=1)) is None


def test_over_quota_borrowing_is_preemptible_and_reasons_carry_packing():
    pool = make_pool()
    # ml guarantee 1.0: the second borrows
    first, second = req("alice", 0, gpus=1), req("alice", 1, gpus=1)
    for r in (first, second):
        pool.submit(r)
    pool.schedule()
    recs = [pool.policy.leases[l] for r in (first, second) for l in r.leases]
    assert [rec.preemptible for rec in recs] == [False, True]
    late = req("bob", 2, fraction=0.5)
    pool.submit(late)
    pool.schedule()
    assert late.reason.startswith("waiting: no GPU has 8.0 GiB free; largest gap 0 B")
    assert "team ml holds 2.0 of its 1.0 GPU guarantee" in late.reason


def test_reclaim_takes_idle_over_quota_sessions_first_for_a_guarantee():
    pool = make_pool()
    p = pool.policy
    a1, a2 = req("alice", 0, fraction=0.5), req("alice", 0.1, fraction=0.5)
    a3, a4 = req("alice", 0.2, fraction=0.5), req("alice", 0.3, fraction=0.5)
    for r in (a1, a2, a3, a4):
        pool.submit(r)
    pool.now = 1.0
    pool.schedule()
    assert not pool.queue
    over = [l for r in (a3, a4) for l in r.leases]
    assert all(p.leases[l].preemptible for l in over)
    running = next(l for l in over if p.leases[l].allocs)
    p.lease_state(over[0], "running", 2.0)  # one borrowed session runs, the other is idle
    pool.now = 10.0
    c = req("carol", 10, fraction=0.5)  # viz is owed its guarantee
    pool.submit(c)
    grants, preempted = pool.schedule()
    assert [r.id for r, _ in grants] == [c.id]
    assert [lease.id for lease, _ in preempted] == [over[1]]  # the idle one
    reason = preempted[0][1]
    assert "reclaimed for a request within team viz's guarantee" in reason and "idle" in reason
    assert running


def test_min_run_time_protects_young_leases():
    pool = make_pool(quotas(**{"min-run-time": "120s"}))
    for i in range(4):
        pool.submit(req("alice", i * 0.1, fraction=0.5))
    pool.now = 1.0
    pool.schedule()
    c = req("carol", 5, fraction=0.5)
    pool.submit(c)
    pool.now = 60.0
    assert pool.schedule() == ([], [])
    pool.now = 122.0
    grants, preempted = pool.schedule()
    assert grants and len(preempted) == 1


def test_no_quotas_configured_means_nothing_preemptible_and_no_reclaim():
    pool = make_pool(PoolQuotas())
    for i in range(5):
        pool.submit(req(f"u{i}", i, fraction=0.5))
    pool.schedule()
    assert all(not rec.preemptible for rec in pool.policy.leases.values())
    assert len(pool.queue) == 1 and "waiting: no GPU has 8.0 GiB free" in pool.queue[0].reason


def test_aged_gang_goes_first_and_gets_gpus_reserved():
    pool = make_pool(quotas(), sizes=(16, 16))
    pool.submit(req("carol", 0, fraction=0.5))
    pool.submit(req("carol", 0, fraction=0.5))
    pool.now = 1
    pool.schedule()
    gang = req("alice", 1, fraction=0.75, workers=2)
    pool.submit(gang)
    pool.schedule()
    assert gang in pool.queue
    pool.now = 40  # past reserve-after (30 s)
    small = req("carol", 40, fraction=0.25)
    pool.submit(small)
    pool.schedule()
    assert pool.policy.order(list(pool.queue))[0] is gang
    assert "reserved for it" in gang.reason
    # the small request may not land on the GPUs held for the gang
    assert small in pool.queue
    for lid in list(pool.leases):
        pool.end(lid)
    pool.schedule()
    assert gang not in pool.queue and len(gang.leases) == 2


def test_an_estimate_from_reported_progress_holds_still_while_one_waits():
    """The queue said 22 -> 27 -> 39 s for a cell behind a training run that reported step/total:
    running work was assumed to need as long again as it had run. With its progress (100 steps, one
    a second), the estimate is the run's end, whenever one asks, and says what it rests on."""
    pool = make_pool(PoolQuotas(suspend_idle_after=None), sizes=(16,))
    pool.eta_for = 100
    first = req("a", 0, gpus=1, workers=1)
    pool.submit(first)
    pool.schedule()
    lease = next(iter(pool.leases))
    pool.policy.leases[lease].gang = True  # a --workers run's rank: its lease ends with the run
    # recent cells lasted 20 s: they would say so
    for _ in range(3):
        pool.policy.cells.add("a", 20.0)
    waiting = req("b", 1, gpus=1)
    pool.submit(waiting)
    estimates = []
    for now in (30.0, 40.0, 60.0, 80.0):
        pool.now = now
        # started at 10 s
        pool.policy.lease_state(lease, "running", now=now, step=now - 10.0, total=100.0)
        pool.schedule()
        estimates.append((waiting.eta, waiting.eta_basis))
    assert estimates[0][1] == "user-cells"  # one report: no rate yet, a's recent cells
    assert [basis for _, basis in estimates[1:]] == ["progress"] * 3
    # 100 steps at 1/s from 10 s
    assert [eta for eta, _ in estimates[1:]] == pytest.approx([110.0] * 3)
    # a session (not a run's rank) comes free when its idle session moves out: suspend-idle-after
    # later
    pool.policy.quotas.suspend_idle_after = 30.0
    pool.policy.leases[lease].gang = False
    pool.now = 90.0
    pool.policy.lease_state(lease, "running", now=90.0, step=80.0, total=100.0)
    pool.schedule()
    assert (waiting.eta, waiting.eta_basis) == (pytest.approx(110.0 + 30.0), "progress")


def test_idle_timeout_lists_idle_leases_only():
    p = FairSharePolicy(quotas(**{"idle-timeout": "60s"}))
    p.lease_started("A", "alice", "ml", 0.5, False, now=0.0)
    p.lease_started("B", "bob", "ml", 0.5, False, now=0.0)
    p.lease_state("B", "running", 1.0)
    assert p.idle_expired(30.0) == [] and p.idle_expired(61.0) == ["A"]


def test_idle_timeout_never_takes_a_runs_rank():
    """Bug fixed: a --workers run's rank 1 sat idle while rank 0's session started (slow on a busy
    machine) and the idle timeout ended it, so the run failed ("Rank 1's GPU session was lost ...
    idle timeout")."""
    p = FairSharePolicy(quotas(**{"idle-timeout": "3s"}))
    p.lease_started("R0", "alice", "ml", 1.0, False, now=0.0, gang=True)
    p.lease_started("R1", "alice", "ml", 1.0, False, now=0.0, gang=True)
    p.lease_started("S", "bob", "ml", 0.5, False, now=0.0)
    assert p.idle_expired(10.0) == ["S"]


def test_fair_queue_best_agrees_with_the_full_order():
    import random

    rng = random.Random(3)
    q = quotas(
        teams={
            f"t{i}": {"guarantee": 0.5 + i, "members": [f"u{i}{j}" for j in range(4)]}
            for i in range(4)
        }
    )
    p = FairSharePolicy(q, clock=lambda: 100.0)
    p.reference_bytes = 16 * GiB
    fq = FairQueue(p)
    reqs = []
    for k in range(300):
        user = f"u{rng.randrange(4)}{rng.randrange(4)}"
        r = req(
            user,
            rng.uniform(0, 99),
            rng.choice(["interactive", "batch"]),
            fraction=rng.choice([0.25, 0.5, 1.0]),
        )
        r.team = q.team_of(user)
        fq.add(r)
        reqs.append(r)
    for i in range(40):
        p.lease_started(f"L{i}", reqs[i].user, reqs[i].team, 0.5, False, now=float(i))
    for _ in range(100):
        expected = p.order([r for r in reqs if r in fq])[0]
        got = fq.pop(100.0)
        assert got is expected
        p.lease_started(f"N{got.id}", got.user, got.team, 0.5, False, now=100.0)


# ---------------------------------------------------------------------- suspension of idle sessions


def suspending_pool(after="30s", sizes=(16, 16)):
    return make_pool(quotas(**{"suspend-idle-after": after}), sizes=sizes)


def held(pool, user):
    return next(ls for ls in pool.leases.values() if ls.user == user)


def test_an_idle_session_moves_to_host_memory_for_a_waiting_interactive_cell():
    pool = suspending_pool()
    pool.eta_for = 100
    for user in ("alice", "carol"):
        pool.submit(req(user, gpus=1))
    pool.schedule()
    carol = held(pool, "carol")
    pool.policy.lease_state(carol.id, "running", 0.0)  # carol computes; alice reads her results
    pool.now = 10.0
    waiting = req("bob", 10.0)
    pool.submit(waiting)
    pool.schedule()
    # it waits, saying when and why it will not wait longer
    assert (
        waiting in pool.queue
        and "1 idle session(s) there move to host memory for it in 20 s" in waiting.reason
    )
    assert waiting.eta == pytest.approx(30.0)
    pool.now = 30.0
    grants, taken = pool.schedule()
    assert [r.id for r, _ in grants] == [waiting.id]
    assert [(ls.user, why) for ls, why in taken] == [
        ("alice", "suspended after 30 s idle: bob's cell was waiting for the GPU")
    ]
    assert carol.id in pool.leases  # a running cell is never suspended


def test_batch_work_never_suspends_anybody_and_suspension_can_be_off():
    for pool, user_spec in (
        (suspending_pool("0s"), {"priority": "batch"}),
        (suspending_pool(None), {}),
    ):
        for user in ("alice", "carol"):
            pool.submit(req(user, gpus=1))
        pool.schedule()
        pool.now = 500.0
        waiting = req("bob", 500.0, **user_spec)
        pool.submit(waiting)
        _, taken = pool.schedule()
        assert taken == [] and waiting in pool.queue and "host memory" not in waiting.reason


def whom_bob_displaces(alice_idle: tuple, carol_idle: tuple) -> str:
    """alice and carol each hold a whole GPU and went idle at ``(time, resident bytes or None)``; at
    100 s bob's half-GPU cell waits: whose session is moved for it?"""
    pool = suspending_pool("0s")
    for user in ("alice", "carol"):
        pool.submit(req(user, gpus=1))
    pool.schedule()
    for user, (at, resident) in (("alice", alice_idle), ("carol", carol_idle)):
        lease = held(pool, user)
        pool.policy.lease_state(lease.id, "running", 0.0)
        pool.policy.lease_state(lease.id, "idle", at, resident=resident)
    pool.now = 100.0
    pool.submit(req("bob", 100.0))
    _, taken = pool.schedule()
    assert len(taken) == 1
    return taken[0][0].user


def test_the_sessions_least_likely_to_be_back_soon_are_moved():
    # alice's last cell ended 5 s ago, carol has been away for 90 s; neither said what it holds
    assert whom_bob_displaces((95.0, None), (10.0, None)) == "carol"


def test_a_whole_gpu_is_freed_only_where_every_session_on_it_is_idle():
    pool = suspending_pool("0s", sizes=(16, 16))
    for user, f in (("alice", 0.5), ("carol", 0.5), ("dave", 0.5)):
        pool.submit(req(user, fraction=f))
        pool.schedule()
    # two halves share a GPU, one is alone on the other; the lone one runs a cell
    lone = next(
        ls for ls in pool.leases.values() if len(pool.gpus[ls.allocations[0].gpu].leases) == 1
    )
    pool.policy.lease_state(lone.id, "running", 0.0)
    pool.now = 50.0
    whole = req("bob", 50.0, gpus=1)
    pool.submit(whole)
    _, taken = pool.schedule()
    # both halves of one GPU
    assert len(taken) == 2 and len({ls.allocations[0].gpu for ls, _ in taken}) == 1
    assert lone.id in pool.leases and whole not in pool.queue


def test_the_gpu_whose_largest_idle_state_is_smallest_is_freed_first():
    """The waiting cell waits for the displaced sessions to write their state out: a GPU where that
    is quick goes before one whose session has merely been idle longer."""
    # alice: away 90 s, holds 12 GiB; carol: away 20 s, holds 1 GiB
    assert whom_bob_displaces((10.0, 12 * GiB), (80.0, 1 * GiB)) == "carol"


def test_a_session_still_starting_is_never_taken():
    """Bug fixed: a lease counted as idle from the instant it was granted, so with min-run-time 0 a
    request could take it back (killing the session) before its session process had even started."""
    pool = suspending_pool("0s", sizes=(16,))
    policy = pool.policy
    policy.lease_started(
        "S1",
        "alice",
        "ml",
        1.0,
        False,
        now=0.0,
        allocs={pool.gpus["w0#0"].id: 16 * GiB},
        idle=False,
    )
    pool.gpus["w0#0"].leased_bytes = 16 * GiB
    pool.gpus["w0#0"].leases.add("S1")
    assert suspend_plan(policy, req("bob", 5.0), pool.gpus, 5.0) is None
    policy.lease_state("S1", "idle", 6.0)  # the session is up and says so
    assert [lid for lid, _ in suspend_plan(policy, req("bob", 7.0), pool.gpus, 7.0)] == ["S1"]
