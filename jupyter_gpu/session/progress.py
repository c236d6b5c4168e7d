"""How far the running cell is, told to the broker, so that the queue's estimates can use it.

A cell that reports ``jupyter_gpu.report(step=..., total=...)`` (or runs a tqdm bar with a total)
says how much of it is done. The broker estimates when the GPUs it holds come free from that instead
of guessing from how long sessions last (``broker/fair_share.py``). This is one small message a
second at most, on the session's one way to the control plane (``worker_link.py``, checked by the
worker in ``worker/relay.py``).
"""

from __future__ import annotations

import time
from typing import Any, TypeGuard

from jupyter_gpu.session.worker_link import WorkerLink

#: at most one progress report per this many seconds
EVERY = 1.0


class ProgressLink:
    """Passes a cell's step/total reports on to its worker, throttled (one per cell)."""

    def __init__(self, link: WorkerLink, cell: str | None, every: float = EVERY) -> None:
        self.link, self.cell, self.every = link, cell, every
        # the first progress bar seen: nested tqdm bars would muddle the estimate
        self.bar: Any = _UNSET
        self.first_step: float | None = None
        self.sent = 0.0

    def __call__(self, msg: dict) -> None:
        metrics = msg.get("metrics") or {}
        step, total = msg.get("step"), metrics.get("total")
        if not _number(step) or not _number(total) or total <= 0:
            return
        bar = metrics.get("_bar")
        if self.bar is _UNSET:
            self.bar = bar
        elif bar != self.bar:
            return
        if self.first_step is None:
            self.first_step = step
        # steps done: a loop that reports step=0 first counts from zero (as the kernel's progress
        # bar does)
        done = step + 1 if self.first_step == 0 and not metrics.get("_done") else step
        now = time.monotonic()
        if now - self.sent < self.every and done < total:
            return
        self.sent = now
        self.link.tell_lease_state(
            state="running", cell=self.cell, step=int(min(done, total)), total=int(total)
        )


_UNSET = object()


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 2**53
