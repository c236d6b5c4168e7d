"""The order in which the broker considers waiting requests: the one place queue policy lives.

The broker asks its policy for an order and grants, in that order, every request that fits now. Replace
the policy (``GpuBroker(policy=...)``) to change who goes first; placement and bookkeeping stay put.
"""

from __future__ import annotations

from typing import Protocol

from .leases import Request


class QueuePolicy(Protocol):
    """Decides the order of the queue; the broker grants in that order whatever fits."""

    def order(self, queue: list[Request], broker_state: object) -> list[Request]:
        """Return ``queue`` sorted so that the first request is the one to serve first."""


class FifoPolicy:
    """First come, first served, with backfill: a later request that fits may start while an earlier,
    larger one waits for room (which keeps GPUs busy; starvation control comes with fair share)."""

    def order(self, queue: list[Request], broker_state: object) -> list[Request]:
        return sorted(queue, key=lambda r: (r.submitted, r.id))
