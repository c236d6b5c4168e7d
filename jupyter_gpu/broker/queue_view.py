"""The waiting requests' full reasons and estimated starts, worked out when a view of the queue
asks, not in the scheduling pass.

Why: both cost every GPU and every lease per request (``estimates.py``, and ``preemption``'s plan
for when idle sessions would move out): at 10,000 GPUs, 2 s for the first 100 waiting requests,
which every scheduling pass spent while every grant waited for it. Nobody reads them at each event;
a kernel's ``gpu_wait`` and the panel's ``gpu_snapshot`` do (``views.py``). So a view asks
``QueueView.refresh``, which works them out (``scheduling.explain_waiting``) if the queue, the
leases or the pool's GPUs changed since the last refresh, or a second passed (estimates move with
time), and keeps to a bounded share of the scheduler's time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from jupyter_gpu.broker.scheduling import explain_waiting

if TYPE_CHECKING:
    from collections.abc import Callable

    from jupyter_gpu.broker.fair_share import FairSharePolicy
    from jupyter_gpu.broker.packing import Packer
    from jupyter_gpu.broker.waiting import WaitingRoom

# GPUs read by one refresh (each estimated request reads every GPU): the first 100 waiting are
# estimated up to 1,000 GPUs, the first 10 at 10,000
ESTIMATE_WORK = 100_000
SHARE = 0.1  # of the scheduler's time, at most, spent on refreshes
MAX_AGE = 1.0  # seconds: what a refresh found is shown this long while nothing changes


class QueueView:
    """See the module docstring. ``eta_for``: how many waiting requests, first in the policy's
    order, get an estimated start (fewer in a pool of more than ``ESTIMATE_WORK / eta_for``
    GPUs)."""

    def __init__(
        self,
        policy: FairSharePolicy,
        queue: WaitingRoom,
        packer: Packer,
        clock: Callable[[], float],
        eta_for: int = 100,
    ) -> None:
        self.policy, self.queue, self.packer, self.clock = policy, queue, packer, clock
        self.eta_for = eta_for
        self._seen: tuple[tuple[int, int, int], float] | None = None  # (versions, clock)
        self._not_before = 0.0  # monotonic time before which no refresh runs again

    def refresh(self, now: float | None = None, force: bool = False) -> None:
        """Refresh the first waiting requests' reasons and estimates if they are out of date.
        Unless ``force``d (a simulator reading what a kernel would be told), after a refresh that
        took ``d`` seconds the next runs ``d (1 - SHARE) / SHARE`` later at the earliest; until
        then views show what it found."""
        policy, queue, packer = self.policy, self.queue, self.packer
        now = self.clock() if now is None else now
        versions = (queue.version, policy.version, packer.version)
        if self._seen is not None and not force:
            seen, at = self._seen
            if (seen == versions and now - at < MAX_AGE) or time.monotonic() < self._not_before:
                return
        started = time.monotonic()
        n = min(self.eta_for, max(1, ESTIMATE_WORK // max(1, len(packer.gpus))))
        explain_waiting(policy, queue, packer, now, n)
        done = time.monotonic()
        self._seen = (versions, now)
        self._not_before = done + (done - started) * (1 - SHARE) / SHARE
