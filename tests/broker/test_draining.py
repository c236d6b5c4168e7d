"""The drain's pure parts (``broker/draining.py``): what a moved session asks for, and who may take
it (its own kernel only: naming another user's old lease as ``restore`` gives nothing)."""

from __future__ import annotations

from types import SimpleNamespace

from jupyter_gpu.broker.draining import moved_session, spec_of, worker_label
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import Allocation, Lease, Request
from jupyter_gpu.common.protocol import RequestSpec

GiB = 2**30


def _lease(lid: str = "L1", user: str = "alice", kernel: str = "k1") -> Lease:
    return Lease(
        id=lid,
        request="R1",
        user=user,
        kernel=kernel,
        client="c1",
        worker="tcp://10.0.0.21:40123",
        allocations=[Allocation(gpu="tcp://10.0.0.21:40123#0", index=0, bytes=4 * GiB)],
        fraction=0.25,
        priority="batch",
    )


def test_a_moved_session_asks_for_what_its_request_asked_else_for_the_memory_it_holds():
    lease = _lease()
    asked = Request(
        id="R1", user="alice", kernel="k1", client="c1", spec=RequestSpec(fraction=0.25)
    )
    assert spec_of(lease, asked) == RequestSpec(fraction=0.25)
    assert spec_of(lease, None) == RequestSpec(memory=4 * GiB, priority="batch")
    gang = Request(
        id="R1", user="alice", kernel="k1", client="c1", spec=RequestSpec(fraction=1, workers=2)
    )
    assert spec_of(lease, gang) == RequestSpec(memory=4 * GiB, priority="batch")
    assert worker_label("tls://10.0.0.21:40123") == "10.0.0.21:40123"


def test_only_its_own_kernel_is_given_the_session_a_drain_moved():
    ledger = Ledger(FairSharePolicy())
    keeper = SimpleNamespace(ledger=ledger)
    old = _lease()
    old.moved_to = "R2"
    ledger.ended[old.id] = old
    moving = Request(id="R2", user="alice", kernel="k1", client="c1", spec=RequestSpec(0.25))
    moving.state = "starting"
    ledger.requests["R2"] = moving
    assert moved_session(keeper, "L1", "alice", "k1") is moving
    assert moved_session(keeper, "L1", "bob", "k1") is None
    assert moved_session(keeper, "L1", "alice", "k2") is None
    assert moved_session(keeper, "L9", "alice", "k1") is None
    # granted: given while its session stands; once that lease ended too, restore as usual
    moving.state, moving.leases = "granted", ["L2"]
    assert moved_session(keeper, "L1", "alice", "k1") is None
    ledger.leases["L2"] = _lease("L2")
    assert moved_session(keeper, "L1", "alice", "k1") is moving
    moving.state = "cancelled"  # its move failed
    assert moved_session(keeper, "L1", "alice", "k1") is None
