"""Request and lease ids stay unique across restarts of the pool's scheduler (``id_floor.py``).

Bug fixed: a restarted broker counted ids from 1 again. A kernel that got a new session before
every worker had rejoined was given the id of a session that a worker kept across the restart;
that worker's session was then refused ("lease L2 is already live") and ended with its variables.
"""

from __future__ import annotations

import itertools
import os
import stat

import pytest

from jupyter_gpu.broker import model
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.id_floor import IdFloor, floor_path
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import GpuSlot, Request, new_id
from jupyter_gpu.common.protocol import RequestSpec

GiB = 2**30


@pytest.fixture()
def fresh_process(monkeypatch):
    """Ids counted from 1, as in a scheduler process that just started."""

    def restart() -> None:
        monkeypatch.setattr(model, "_ids", itertools.count(1))

    restart()
    return restart


def broker_ledger() -> Ledger:
    ledger = Ledger(FairSharePolicy())
    ledger.set_worker_gpus(
        "w0", [GpuSlot(worker="w0", index=0, uuid="G0", name="g", total_bytes=16 * GiB)]
    )
    return ledger


def grant_one(ledger: Ledger, user: str) -> str:
    req = Request(
        id=new_id("R"), user=user, kernel=f"k-{user}", client=None, spec=RequestSpec(fraction=0.25)
    )
    ledger.submit(req)
    (granted, leases), *_ = ledger.schedule(None)
    return leases[0].id


def test_a_restarted_broker_never_hands_out_an_id_its_predecessor_did(tmp_path, fresh_process):
    path = floor_path(str(tmp_path / "jupyter-gpu-pool-8786.key"))
    first, old = IdFloor(path), broker_ledger()
    assert first.resume() == 0  # the pool's first start
    kept = {grant_one(old, "alice"), grant_one(old, "bob")}
    first.note(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    fresh_process()  # the scheduler restarts: a new process counts from 1 again
    second, new = IdFloor(path), broker_ledger()
    assert second.resume() == first.mark > 0
    lease = grant_one(new, "carol")  # before the workers holding alice's and bob's sessions rejoin
    assert lease not in kept and new.requests.keys().isdisjoint(old.requests.keys())
    second.note(new)
    assert IdFloor(path).resume() == second.mark > first.mark


def test_an_unreadable_mark_is_reported_and_ids_start_over(tmp_path, fresh_process, caplog):
    path = tmp_path / "pool.key.ids"
    path.write_text("not a number\n")
    assert IdFloor(str(path)).resume() == 0
    assert "could not read the pool's id mark" in caplog.text
    assert new_id("L") == "L1"


def test_no_file_is_written_until_an_id_is_made(tmp_path):
    path = tmp_path / "pool.key.ids"
    floor = IdFloor(str(path))
    floor.note(broker_ledger())
    assert not path.exists()
    floor.remove()  # nothing to remove: fine
