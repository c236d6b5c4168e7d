"""What a session answers its worker is checked before the broker acts on it: a session runs its
user's code, which can answer anything."""

from __future__ import annotations

import pytest

from jupyter_gpu.common.protocol import OffloadResult
from jupyter_gpu.common.refusals import Failed
from jupyter_gpu.worker.host_copies import checked_reply

GOOD: OffloadResult = {
    "path": "/dev/shm/x/L1/offload.pkl",
    "saved": ["a"],
    "lost": [{"name": "g", "type": "generator", "why": "TypeError: cannot pickle"}],
    "bytes": 10,
    "standby": False,
}


def test_a_well_formed_offload_reply_passes():
    checked_reply(GOOD, OffloadResult, "offload")


@pytest.mark.parametrize(
    "bad, why",
    [
        ({k: v for k, v in GOOD.items() if k != "standby"}, "lacks standby"),
        ({**GOOD, "bytes": "10"}, "bytes must be a whole number"),
        ({**GOOD, "saved": "a"}, "saved must be a list"),
        ({**GOOD, "extra": 1}, "unknown field"),
        ("not a mapping", "must be a mapping"),
    ],
)
def test_a_malformed_offload_reply_fails_the_offload_naming_why(bad, why):
    with pytest.raises(Failed, match=why):
        checked_reply(bad, OffloadResult, "offload")


def test_a_spilled_copy_is_reported_as_spilled_to_a_restarted_broker():
    """What ``gpu_register_worker`` tells a new broker of a copy the old one had spilled: on disk,
    so that it books no host memory for it (``broker/adoption.py``)."""
    import asyncio
    import os

    from jupyter_gpu.worker.host_copies import HostCopies, Parked

    copies = HostCopies(worker=None)
    try:
        store = copies.local
        folder = store.folder("L1")
        with open(
            os.open(os.path.join(folder, "offload.pkl"), os.O_WRONLY | os.O_CREAT, 0o600), "wb"
        ) as f:
            f.write(b"x" * 1000)
        view = {"id": "L1", "user": "alice", "gpu_indices": [0]}
        copies.parked["L1"] = Parked({**GOOD, "lease": view, "client": None}, "alice")  # type: ignore[typeddict-item]
        assert "spilled" not in copies.parked["L1"].copy
        assert asyncio.run(copies.spill("L1")) == 1000
        assert copies.parked["L1"].copy["spilled"] is True
        assert not os.path.exists(os.path.join(folder, "offload.pkl"))
        assert os.path.getsize(store.spill_path("L1")) == 1000
    finally:
        copies.local.close()
