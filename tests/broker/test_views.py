"""What the broker's snapshot tells the panel, so the panel shows it instead of re-deriving the
broker's rules.

The right-sizing cases below were the panel's own jest tests (``suggestMemory``, ``rightSizeHint``)
while the panel kept a copy of ``common/rightsizing.py``; the rule and its tests now live on the
broker's side.
"""

from __future__ import annotations

import pytest

from jupyter_gpu.broker import views
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import Allocation, GpuSlot, Lease, Request
from jupyter_gpu.broker.quotas import parse_quotas
from jupyter_gpu.common.protocol import RequestSpec
from jupyter_gpu.common.rightsizing import RightSize, suggest_bytes

GiB, MiB = 1 << 30, 1 << 20
WORKER = "tcp://127.0.0.1:40000"


def pool(policy: FairSharePolicy | None = None) -> Ledger:
    """A ledger with one worker offering two 16 GiB GPUs."""
    ledger = Ledger(policy or FairSharePolicy())
    ledger.set_worker_gpus(
        WORKER,
        [
            GpuSlot(worker=WORKER, index=i, uuid=f"GPU-{i}", name=f"GPU {i}", total_bytes=16 * GiB)
            for i in range(2)
        ],
    )
    return ledger


def grant(ledger: Ledger, user: str, spec: RequestSpec) -> Lease:
    req = Request(
        id=f"R-{user}-{len(ledger.requests)}", user=user, kernel=f"k-{user}", client=None, spec=spec
    )
    ledger.submit(req)
    ((granted, leases),) = ledger.schedule(None)
    assert granted is req
    return leases[0]


def snapshot_leases(ledger: Ledger) -> dict[str, dict]:
    """The snapshot's lease views by id (a lease over several GPUs is listed under each: same
    view)."""
    snap = views.snapshot(ledger, {}, {"embedded": True}, [], "names")
    return {ls["id"]: ls for gpu in snap["gpus"] for ls in gpu["leases"]}


def one_gpu_lease(peak: int | None, reserved: int) -> Lease:
    return Lease(
        id="L",
        request="R",
        user="ann",
        kernel="k",
        client=None,
        worker=WORKER,
        allocations=[Allocation(gpu=f"{WORKER}#0", index=0, bytes=reserved)],
        fraction=0.5,
        peak_bytes=peak,
    )


def test_snapshot_lease_carries_the_brokers_right_size_hint():
    ledger = pool()
    lease = grant(ledger, "alice", RequestSpec(memory=8 * GiB))
    # no cell has measured a peak yet
    assert snapshot_leases(ledger)[lease.id]["right_size"] is None
    lease.peak_bytes = 600 * MiB
    # the panel shows this text as sent (ui-tests/tests/panel.spec.ts reads it)
    assert (
        snapshot_leases(ledger)[lease.id]["right_size"]
        == "used 600.0 MiB of 8.0 GiB: ask --memory 1GiB next time"
    )
    lease.peak_bytes = 3 * GiB  # over a quarter of the reservation: nothing to say
    assert snapshot_leases(ledger)[lease.id]["right_size"] is None


def test_a_lease_over_several_gpus_gets_no_memory_suggestion():
    ledger = pool()
    lease = grant(ledger, "alice", RequestSpec(gpus=2))
    lease.peak_bytes = 10 * MiB
    view = snapshot_leases(ledger)[lease.id]
    assert len(view["gpus"]) == 2 and view["right_size"] is None  # --memory sizes one GPU's share


def test_a_granted_request_status_carries_the_field_too():
    ledger = pool()
    lease = grant(ledger, "alice", RequestSpec(fraction=0.5))
    req = ledger.requests[lease.request]
    req.state = "granted"  # what the broker sets once the lease's session has started
    status = views.request_status(ledger, req)
    assert [ls["id"] for ls in status["leases"]] == [lease.id] and status["leases"][0][
        "right_size"
    ] is None


@pytest.mark.parametrize(
    ("peak", "suggestion"),
    [
        (0, 256 * MiB),
        (100 * MiB, 256 * MiB),
        (205 * MiB, 512 * MiB),  # 256.25 MiB needed
        (round(0.4 * GiB), 512 * MiB),  # floor(1.25 x peak) is exactly 512 MiB
        (600 * MiB, GiB),
        (int(0.8 * GiB), GiB),  # exactly 1 GiB with headroom: it fits
        (3 * GiB, 4 * GiB),
        (int(3.5 * GiB), 8 * GiB),
    ],
)
def test_suggestion_is_the_smallest_power_of_two_over_the_peak_with_headroom(peak, suggestion):
    assert suggest_bytes(peak) == suggestion


@pytest.mark.parametrize(
    ("suggestion", "option"), [(256 * MiB, "256MiB"), (GiB, "1GiB"), (8 * GiB, "8GiB")]
)
def test_suggestions_are_written_as_the_magic_reads_them(suggestion, option):
    assert RightSize(0, 64 * GiB, suggestion).suggestion() == option


def test_hint_suggests_a_smaller_memory_when_the_peak_is_under_a_quarter():
    assert (
        views.right_size_hint(one_gpu_lease(round(0.45 * GiB), 8 * GiB))
        == "used 460.8 MiB of 8.0 GiB: ask --memory 1GiB next time"
    )
    assert (
        views.right_size_hint(one_gpu_lease(int(1.5 * GiB), 8 * GiB))
        == "used 1.5 GiB of 8.0 GiB: ask --memory 2GiB next time"
    )
    assert (
        views.right_size_hint(one_gpu_lease(512 * MiB, 4 * GiB))
        == "used 512.0 MiB of 4.0 GiB: ask --memory 1GiB next time"
    )


@pytest.mark.parametrize(
    ("peak", "reserved"),
    [
        (None, 8 * GiB),  # no peak measured yet
        (2 * GiB, 8 * GiB),  # a quarter: fine
        (7 * GiB, 8 * GiB),
        (100 * MiB, 768 * MiB),  # under 1 GiB reserved: not worth a hint
        (300 * MiB, GiB + MiB),  # 512 MiB would do, but that is not under a quarter
        (10 * MiB, 0),
    ],
)
def test_hint_stays_quiet_without_a_peak_at_a_quarter_or_more_or_when_not_smaller(peak, reserved):
    assert views.right_size_hint(one_gpu_lease(peak, reserved)) is None


def test_quota_users_list_every_member_with_their_team_so_the_panel_looks_its_team_up():
    quotas = parse_quotas(
        {
            "teams": {
                "ml": {"guarantee": 1, "limit": 2, "members": ["alice", "bob"]},
                "viz": {"guarantee": 0.5, "members": ["carol"]},
            },
            "users": {"alice": {"limit": 1}},
        }
    )
    ledger = pool(FairSharePolicy(quotas))
    grant(ledger, "dave", RequestSpec(fraction=0.25))  # named nowhere: the default team
    view = views.snapshot(ledger, {}, {}, [], "tokens")["quotas"]
    teams = {u["user"]: u["team"] for u in view["users"]}
    assert teams == {"alice": "ml", "bob": "ml", "carol": "viz", "dave": "default"}
    assert view["default_team"] == "default"  # where a user the broker does not list lands
    alice = next(u for u in view["users"] if u["user"] == "alice")
    assert alice["limit"] == 1


def test_estimated_starts_are_worked_out_when_a_view_asks_not_in_the_scheduling_pass():
    """Bug fixed (issue 24): every scheduling pass worked out the first 100 waiting requests'
    estimated starts, each over every GPU and lease (2 s a pass at 10,000 GPUs), so every grant
    waited for them. The pass now decides only; a view of the queue works them out, once per
    change of the ledger."""
    ledger = pool()
    for user in ("ann", "ben"):
        lease = grant(ledger, user, RequestSpec(gpus=1))
        ledger.set_state(lease.id, "running")
    waiting = Request(id="R-cy", user="cy", kernel="k-cy", client=None, spec=RequestSpec(gpus=1))
    ledger.submit(waiting)
    assert ledger.schedule(None) == []
    assert (waiting.eta_basis, waiting.eta_note) == (None, None)  # the pass estimated nothing
    status = views.request_status(ledger, waiting)
    assert status["eta_basis"] == "unknown" and status["eta_note"], status
    assert status["reason"].startswith("waiting"), status
    queued = views.snapshot(ledger, {}, {"embedded": True}, [], "names")["queue"]
    assert [(q["id"], q["eta_note"]) for q in queued] == [("R-cy", status["eta_note"])]
