"""The indexed queue (broker/waiting.py) and the walk of a scheduling pass over it: what cannot act
is passed over, and nothing that can act is."""

from __future__ import annotations

from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.quotas import PoolQuotas
from tests.broker.fairsim import gpus, pool_sim, req


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
