"""What one user may put in the queue (``broker/admission.py``): the cap, and refusals paced per
user."""

from __future__ import annotations

import asyncio
import time

import dask

from jupyter_gpu.broker.admission import PACE, Admission
from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import Request
from jupyter_gpu.broker.permissions import Permissions
from jupyter_gpu.common.protocol import RequestSpec
from jupyter_gpu.common.refusals import NotPossible


def test_one_users_refused_requests_are_answered_in_turns_and_anothers_request_is_not_held():
    """Bug fixed (issue 20: a flood of 10,000 requests, 64 in flight, moved another user's first
    cell by 1.5 s with the cap alone): each refused call was answered at once, so a flood cost
    the scheduler as much as its sender could send. A user's refusals now take turns, ``PACE``
    apart (the waiting ones hold a timer, no work); someone else's request is not held back."""
    ledger = Ledger(FairSharePolicy())
    for n in range(2):
        ledger.submit(Request(f"R{n}", "alice", "k", None, RequestSpec(gpus=1)))
    admission = Admission(ledger, AuditStore(), Permissions(None))

    async def flood() -> tuple[float, list[object], RequestSpec]:
        began = time.monotonic()
        asks = [admission.admitted("alice", None, None, {"gpus": 1}) for _ in range(20)]
        refused = await asyncio.gather(*asks, return_exceptions=True)
        return began, refused, await admission.admitted("bob", None, None, {"gpus": 1})

    with dask.config.set({"jupyter-gpu.max-queued-per-user": 2}):
        began, refused, bobs = asyncio.run(flood())
    assert all(isinstance(r, NotPossible) for r in refused), refused
    assert "as many as one user may" in str(refused[0])
    assert admission._next_refusal["alice"] >= began + 20 * PACE  # twenty turns were given
    assert bobs == RequestSpec(gpus=1) and "bob" not in admission._next_refusal
    assert ledger.queue.waiting_of("alice") == 2 and ledger.queue.waiting_of("bob") == 0
