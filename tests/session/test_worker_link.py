"""The session's reports to its worker (session/worker_link.py) on a real socket pair and a real
event loop: quick cells' idle notes are merged, and no report overtakes one held back."""

from __future__ import annotations

import asyncio
import json
import socket

from jupyter_gpu.session.executor import merge_idle_notes
from jupyter_gpu.session.worker_link import WorkerLink


def _reports(run) -> list[dict]:
    ours, theirs = socket.socketpair()

    async def main() -> None:
        link = WorkerLink(asyncio.get_running_loop(), ours.detach())
        await link.open()
        await run(link)
        await asyncio.sleep(0.05)
        link._writer.close()

    try:
        asyncio.run(main())
        theirs.settimeout(5)
        data = b""
        while chunk := theirs.recv(65536):
            data += chunk
    finally:
        theirs.close()
    return [json.loads(line) for line in data.splitlines()]


def test_quick_cells_idle_notes_go_as_one_with_the_largest_peak():
    async def cells(link: WorkerLink) -> None:
        for peak in (10, 30, 20):
            link.tell_coalesced(
                0.2,
                "lease_state",
                merge_idle_notes,
                state="idle",
                peak_bytes=peak,
                resident_bytes=peak,
            )
        await asyncio.sleep(0.05)
        assert link._held is not None  # held, not sent yet
        await asyncio.sleep(0.3)

    assert _reports(cells) == [
        {"op": "lease_state", "state": "idle", "peak_bytes": 30, "resident_bytes": 20}
    ]


def test_a_report_sends_the_held_note_first():
    async def cells(link: WorkerLink) -> None:
        link.tell_coalesced(5.0, "lease_state", merge_idle_notes, state="idle", peak_bytes=None)
        # a long cell: "running" after the held "idle"
        link.tell_lease_state(state="running", cell="train")
        link.tell_coalesced(5.0, "lease_state", merge_idle_notes, state="idle", peak_bytes=7)
        link.tell("metrics", step=1)

    assert _reports(cells) == [
        {"op": "lease_state", "state": "idle", "peak_bytes": None},
        {"op": "lease_state", "state": "running", "cell": "train"},
        {"op": "lease_state", "state": "idle", "peak_bytes": 7},
        {"op": "metrics", "step": 1},
    ]
