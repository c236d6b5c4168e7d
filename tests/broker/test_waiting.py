"""The indexed queue (broker/waiting.py) and the walk of a scheduling pass over it: what cannot act
is passed over, and nothing that can act is."""

from __future__ import annotations

from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.model import Allocation
from jupyter_gpu.broker.quotas import PoolQuotas
from tests.broker.fairsim import gpus, pool_sim, quotas, req


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
