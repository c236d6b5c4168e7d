"""The lease book's index of what could be taken back (``takeback.TakeBackIndex``) answers what a
scan of every lease answers (``preemption.suspend_candidates``, ``preemption.reclaim_candidates``),
whatever leases started, ended, went idle or busy, and whenever one asks."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from jupyter_gpu.broker import preemption
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.quotas import PoolQuotas, Team

TEAMS = ("a", "b", "c")

changes = st.lists(
    st.tuples(
        st.sampled_from(["start", "end", "idle", "running", "tick", "gang"]),
        st.integers(0, 5),  # which lease (L0 and L3: a gang's ranks)
        st.sampled_from(TEAMS),
        st.sampled_from([0.25, 0.5, 1.0, 2.0]),  # GPUs
        st.booleans(),  # preemptible / gang
        st.sampled_from([0.0, 0.5, 1.0, 3.0]),  # time step
    ),
    max_size=60,
)


def _answers(policy: FairSharePolicy, now: float, after: float, min_run: float) -> tuple:
    over = {t: policy.over_guarantee(t) for t in TEAMS}
    scanned = (
        bool(preemption.suspend_candidates(policy, now, after)),
        bool(preemption.reclaim_candidates(policy, "another", now, over)),
    )
    indexed = (
        policy.takeback.may_suspend(now, after),
        policy.takeback.may_reclaim(now, min_run, policy.over_guarantee),
    )
    return scanned, indexed


@settings(max_examples=150, deadline=None)
@given(changes, st.sampled_from([0.0, 1.0, 2.5]), st.sampled_from([0.0, 1.0, 4.0]))
# a gang's borrowed rank, idle: neither suspended nor reclaimed
@example([("start", 0, "a", 1.0, True, 0.0), ("tick", 0, "a", 1.0, True, 1.0)], 0.0, 0.0)
def test_what_may_be_taken_back_is_what_a_scan_of_every_lease_finds(steps, after, min_run):
    quotas = PoolQuotas(
        teams={t: Team(name=t, guarantee=g) for t, g in zip(TEAMS, (0.5, 1.0, 2.0))},
        min_run_time=min_run,
        configured=True,
    )
    policy = FairSharePolicy(quotas, clock=lambda: 0.0)
    now = 0.0
    for what, n, team, gpus, flag, dt in steps:
        lid = f"L{n}"
        rec = policy.leases.get(lid)
        if what == "start" and rec is None:
            policy.lease_started(lid, f"u{n}", team, gpus, flag, now=now, gang=n % 3 == 0)
        elif what == "end":
            policy.lease_ended(lid, now=now)
        elif what in ("idle", "running") and rec is not None:
            policy.lease_state(lid, what, now=now)
        elif what == "gang" and rec is not None:
            rec.gang = flag  # (as a test may set it after the grant)
        elif what == "tick":
            now += dt
        for t in (now, now + dt):
            scanned, indexed = _answers(policy, t, after, min_run)
            assert indexed == scanned, (what, lid, t)


def test_an_idle_session_may_move_out_once_idle_long_enough_and_not_the_instant_it_started():
    quotas = PoolQuotas(configured=False)
    policy = FairSharePolicy(quotas, clock=lambda: 0.0)
    policy.lease_started("L1", "u", "t", 1.0, False, now=10.0)  # idle from its start
    assert not policy.takeback.may_suspend(10.0, 0.0)  # granted this very instant
    assert not policy.takeback.may_suspend(39.0, 30.0)
    assert policy.takeback.may_suspend(40.0, 30.0)
    policy.lease_state("L1", "running", now=41.0)
    assert not policy.takeback.may_suspend(100.0, 30.0)
    policy.lease_state("L1", "idle", now=50.0)
    assert not policy.takeback.may_suspend(79.0, 30.0)
    assert policy.takeback.may_suspend(80.0, 30.0)
    policy.lease_ended("L1", now=81.0)
    assert not policy.takeback.may_suspend(200.0, 30.0)
