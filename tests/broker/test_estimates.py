"""The queue's estimated start (``broker/estimates.py``) on the broker's own ledger and policy:
what it rests on is always said, and it holds still while one waits.

Bug fixed: behind a 60 s cell that never called ``report()``, "estimated start" rose from 14 s to
60 s while waiting: a lease that outlived the median of recent lease lengths was expected to last
as long again as its age, and the badge called it "a rough guess".
"""

from __future__ import annotations

import pytest

from jupyter_gpu.broker.estimates import estimate_start
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.quotas import PoolQuotas
from jupyter_gpu.common.protocol import RequestSpec
from tests.broker.fairsim import gpus, pool_sim, req

SUSPEND = 10.0  # suspend-idle-after: an idle session moves out for a waiting interactive cell


def one_gpu_pool(suspend_after: float | None = SUSPEND):
    pool = pool_sim().SimPool(
        gpus(16), FairSharePolicy(PoolQuotas(suspend_idle_after=suspend_after))
    )
    pool.eta_for = 100
    return pool


def hold_the_gpu(pool, user: str = "alice") -> str:
    """``user``'s session takes the whole GPU; returns its lease."""
    pool.submit(req(user, pool.now, fraction=1.0))
    pool.schedule()
    return next(iter(pool.leases))


def run_cells(pool, lease: str, lengths: list[float]) -> None:
    """The lease's session runs cells of these lengths, one after the other (no reports)."""
    for length in lengths:
        pool.policy.lease_state(lease, "running", now=pool.now)
        pool.now += length
        pool.policy.lease_state(lease, "idle", now=pool.now)
        pool.now += 1.0


def waiting_behind(pool, lease: str, user: str = "bob"):
    """A cell of ``lease`` starts running, and ``user``'s interactive cell asks for the GPU."""
    pool.policy.lease_state(lease, "running", now=pool.now)
    started = pool.now
    waiting = req(user, pool.now, fraction=0.5)
    pool.submit(waiting)
    pool.schedule()
    return waiting, started


def test_without_progress_it_rests_on_the_users_recent_cells_and_holds_still():
    pool = one_gpu_pool()
    lease = hold_the_gpu(pool)
    run_cells(pool, lease, [50.0, 60.0, 70.0])
    waiting, started = waiting_behind(pool, lease)
    seen = []
    for t in (1.0, 14.0, 30.0, 45.0, 59.0):
        pool.now = started + t
        pool.schedule()
        seen.append((waiting.eta, waiting.eta_basis, waiting.eta_note))
    # the median of alice's cells (60 s), then her session moves out SUSPEND s after it goes idle
    assert [eta for eta, _, _ in seen] == pytest.approx([started + 60.0 + SUSPEND] * 5)
    assert {basis for _, basis, _ in seen} == {"user-cells"}
    assert seen[0][2] == (
        "median of alice's last 3 cells: 60 s, then 10 s idle before its session moves out"
    ), seen[0][2]


def test_a_cell_that_runs_past_its_estimate_gets_a_new_one_that_says_why():
    pool = one_gpu_pool()
    lease = hold_the_gpu(pool)
    run_cells(pool, lease, [20.0, 30.0, 40.0, 90.0, 100.0, 110.0])
    waiting, started = waiting_behind(pool, lease)
    pool.now = started + 5.0
    pool.schedule()
    first = waiting.eta
    # the median of all six (65 s): it holds until the cell runs past it
    assert first == pytest.approx(started + 65.0 + SUSPEND) and waiting.eta_basis == "user-cells"
    pool.now = started + 64.0
    pool.schedule()
    assert waiting.eta == first
    pool.now = started + 70.0
    pool.schedule()
    # past 65 s: of her cells that ran over 70 s (90, 100, 110), the median
    assert waiting.eta == pytest.approx(started + 100.0 + SUSPEND)
    assert waiting.eta_note == (
        "ran past the 65 s expected; median of alice's last 6 cells that ran over 70 s: 100 s, "
        "then 10 s idle before its session moves out"
    ), waiting.eta_note


def test_with_few_cells_of_that_user_it_rests_on_the_pools_and_says_so():
    pool = one_gpu_pool()
    lease = hold_the_gpu(pool, "carol")
    run_cells(pool, lease, [30.0, 30.0, 30.0])  # carol's cells: the pool's too
    pool.end(lease)
    lease = hold_the_gpu(pool, "alice")
    run_cells(pool, lease, [5.0])  # one cell of alice's: not enough to go by
    waiting, started = waiting_behind(pool, lease)
    assert waiting.eta_basis == "pool-cells" and "the pool's last 4 cells" in waiting.eta_note
    assert waiting.eta == pytest.approx(started + 30.0 + SUSPEND)


def test_unknown_is_said_with_the_reason_never_a_number():
    pool = one_gpu_pool()
    lease = hold_the_gpu(pool)
    waiting, _ = waiting_behind(pool, lease)
    assert (waiting.eta, waiting.eta_basis) == (None, "unknown")
    assert waiting.eta_note == "no cells have finished on this pool yet to estimate from"
    # the cell ahead has run longer than the recent cells
    pool.policy.cells.pool.extend([5.0, 6.0, 7.0])
    pool.now += 60.0
    pool.schedule()
    assert (waiting.eta, waiting.eta_basis) == (None, "unknown")
    assert "has run 60 s, longer than nearly all recent cells" in waiting.eta_note
    # a batch request does not move idle sessions: it waits for a release, which nobody can tell
    batch = req("carol", pool.now, priority="batch", fraction=0.5)
    pool.submit(batch)
    pool.schedule()
    assert (batch.eta, batch.eta_basis) == (None, "unknown")
    assert batch.eta_note == "the sessions ahead hold their GPU memory until released"


def test_an_idle_session_ahead_moves_out_after_suspend_idle_after():
    pool = one_gpu_pool(suspend_after=30.0)
    lease = hold_the_gpu(pool)
    run_cells(pool, lease, [5.0])
    idle_since = pool.now - 1.0
    waiting = req("bob", pool.now, fraction=0.5)
    pool.submit(waiting)
    pool.schedule()
    assert (waiting.eta, waiting.eta_basis) == (pytest.approx(idle_since + 30.0), "idle")


def test_no_gpu_that_fits_is_unknown():
    eta, end, placement = estimate_start(RequestSpec(fraction=0.5), [], {}, 0.0)
    assert (eta, end.basis, end.note, placement) == (
        None,
        "unknown",
        "no GPU in the pool can hold it",
        [],
    )


def test_a_request_behind_another_waits_for_the_room_the_first_one_leaves():
    """The memory that comes free first goes to the request ahead: the second one's estimate is
    the next end, not the same one (each said "in 70 s": the second started minutes later)."""
    pool = one_gpu_pool()
    first_lease = hold_the_gpu(pool, "alice")
    pool.policy.lease_state(first_lease, "running", now=pool.now)
    for _ in range(3):
        pool.policy.cells.add("alice", 60.0)
    ahead, behind = req("bob", pool.now, fraction=1.0), req("carol", pool.now + 1, fraction=1.0)
    pool.submit(ahead)
    pool.submit(behind)
    pool.now += 1.0
    pool.schedule()
    assert ahead.eta == pytest.approx(60.0 + SUSPEND) and ahead.eta_basis == "user-cells"
    # bob's session keeps the whole GPU once it has it: when it ends, nobody knows yet
    assert (behind.eta, behind.eta_basis) == (None, "unknown")
    assert behind.eta_note == "the requests ahead take what comes free"


def test_an_estimate_that_moves_later_says_why():
    pool = one_gpu_pool(suspend_after=60.0)
    lease = hold_the_gpu(pool)
    run_cells(pool, lease, [50.0, 60.0, 70.0])
    pool.now += 20.0  # alice's session has been idle for 20 s
    waiting = req("bob", pool.now, fraction=0.5)
    pool.submit(waiting)
    pool.schedule()
    assert waiting.eta_basis == "idle"
    told = waiting.eta
    # alice runs a cell before her session moves out: her cell's end, and the reason it is later
    pool.now += 5.0
    pool.policy.lease_state(lease, "running", now=pool.now)
    pool.schedule()
    assert waiting.eta > told + 30 and waiting.eta_basis == "user-cells"
    assert waiting.eta_note.startswith(
        "later than before: the idle session ahead started a cell; median of alice's"
    ), waiting.eta_note


def test_the_status_and_the_snapshot_carry_the_basis_in_words():
    from jupyter_gpu.broker.views import request_status

    pool = one_gpu_pool()
    lease = hold_the_gpu(pool)
    run_cells(pool, lease, [50.0, 60.0, 70.0])
    waiting, _ = waiting_behind(pool, lease)
    status = request_status(pool.ledger, waiting)
    assert status["eta_basis"] == "user-cells" and "median of alice's" in status["eta_note"]
