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
