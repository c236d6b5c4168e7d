"""What a session reports about its own lease, booked in the ledger: a cell started, how far it is,
that it ended and what it measured.

Why apart: it is bookkeeping only (no event loop, no worker call), which the broker's handler for
workers' relayed reports (``gpu_lease_state``) applies as it arrives; the queue's estimates, the
right-size hints and suspension read what it records.
"""

from __future__ import annotations

import time

from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.common.protocol import LeaseStateReport


def record_session_report(
    ledger: Ledger, lease_id: str, worker: str | None, report: LeaseStateReport
) -> None:
    """A session's cell started (``running``), how far it is (``running`` with ``step``) or
    that it ended (``idle``, with what it measured); a report about a lease that is not live on
    ``worker`` is dropped."""
    live = ledger.leases.get(lease_id)
    if live is None or (worker is not None and live.worker != worker):
        return
    state, step = report["state"], report.get("step")
    resident = report.get("resident_bytes")
    ls = ledger.set_state(lease_id, state, resident=resident, step=step, total=report.get("total"))
    if ls is None:
        return
    if state == "running":
        # a cell started (a progress report is not a new cell: it keeps its start)
        if step is None:
            ls.cell_started = time.time()
            ls.cell = report.get("cell") or ls.cell
    else:
        ls.cell_started = None
    peak, utilization = report.get("peak_bytes"), report.get("gpu_utilization")
    if peak is not None:
        ls.peak_bytes = max(ls.peak_bytes or 0, int(peak))
    if utilization is not None:
        ls.gpu_utilization = float(utilization)
    if resident is not None:
        ls.resident_bytes = int(resident)
