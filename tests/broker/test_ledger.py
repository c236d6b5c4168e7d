"""The broker's ledger on its own (no Dask): grants, ends, and a bad request that must not wedge
it."""

from __future__ import annotations

from jupyter_gpu.broker.draining import drain_worker
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import GpuSlot, Request
from jupyter_gpu.common.protocol import RequestSpec

GiB = 2**30


def ledger_with(*sizes_gib: int) -> Ledger:
    ledger = Ledger(FairSharePolicy())
    ledger.set_worker_gpus(
        "w0",
        [
            GpuSlot(worker="w0", index=i, uuid=f"G{i}", name="g", total_bytes=s * GiB)
            for i, s in enumerate(sizes_gib)
        ],
    )
    return ledger


def request(rid: str, user: str = "alice", **spec) -> Request:
    return Request(id=rid, user=user, kernel=f"k-{user}", client=None, spec=RequestSpec(**spec))


def test_grant_books_bytes_and_the_policy_end_frees_them():
    ledger = ledger_with(16, 16)
    ledger.submit(request("R1", fraction=0.5))
    ledger.submit(request("R2", "bob", workers=2, fraction=0.25))
    grants = ledger.schedule(None)
    assert [(r.id, len(leases)) for r, leases in grants] == [("R1", 1), ("R2", 2)]
    assert sorted(g.leased_bytes for g in ledger.gpus.values()) == [4 * GiB, 12 * GiB]
    assert {ls.rank for ls in grants[1][1]} == {0, 1} and len(
        {ls.worker for ls in grants[1][1]}
    ) == 1
    ledger.check()
    lease = grants[0][1][0]
    assert ledger.end(lease.id, "done").end_reason == "done"
    assert ledger.end(lease.id, "again") is None  # ending twice changes nothing
    assert sum(g.leased_bytes for g in ledger.gpus.values()) == 8 * GiB
    ledger.check()


def test_a_request_that_breaks_the_pass_is_failed_and_the_others_are_served():
    """Bug fixed: a request with ``workers: 1.5`` (it got past the broker once) made every later
    scheduling pass raise TypeError in packing, so nobody's cell was scheduled until the scheduler
    restarted."""
    ledger = ledger_with(16)
    bad = request("R1", workers=1, fraction=0.5)
    bad.spec.workers = 1.5  # as it would arrive unchecked
    ledger.submit(bad)
    good = request("R2", "bob", fraction=0.5)
    ledger.submit(good)
    failed = []
    grants = ledger.schedule(
        None,
        fail=lambda req, why: (
            failed.append((req.id, why)),
            ledger.finish_request(req, "failed", why),
        ),
    )
    assert [r.id for r, _ in grants] == ["R2"]
    assert (
        [rid for rid, _ in failed] == ["R1"]
        and "TypeError" in failed[0][1]
        and "not your code's" in failed[0][1]
    )
    assert bad.state == "failed" and bad not in ledger.queue
    ledger.submit(request("R3", "carol", fraction=0.25))
    assert [r.id for r, _ in ledger.schedule(None)] == ["R3"]  # scheduling goes on
    ledger.check()


def test_a_worker_being_drained_gets_no_new_lease_until_it_is_gone():
    """``Ledger.draining`` (broker/draining.py): its GPUs still count (it comes back after its
    upgrade) but nothing new is placed on them; a request that fits only there waits."""
    ledger = ledger_with(16)
    ledger.set_worker_gpus(
        "w1", [GpuSlot(worker="w1", index=0, uuid="H0", name="g", total_bytes=8 * GiB)]
    )
    drain_worker(ledger, "w0")
    ledger.submit(request("R1", memory=4 * GiB))
    ledger.submit(request("R2", "bob", memory=12 * GiB))
    grants = ledger.schedule(None)
    assert [(r.id, leases[0].worker) for r, leases in grants] == [("R1", "w1")]
    assert [r.id for r in ledger.queued()] == ["R2"]  # it fits only on the drained worker
    assert len(ledger.capacity()) == 2
    ledger.remove_worker("w0")
    assert not ledger.draining
