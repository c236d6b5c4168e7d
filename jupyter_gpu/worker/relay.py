"""What a session reports, checked and passed on to the broker by its worker.

A session holds no credential of the pool (``session/worker_link.py``): it writes JSON lines on the
private socket its worker gave it. The worker reads them here, keeps only the reports a session may
make about itself (``common/protocol.py``'s ``SESSION_REPORTS``: ``LeaseStateReport``,
``RunMetricsReport``), with fields of the right types and ranges, names the lease itself (the
session cannot claim another one), and forwards them with the pool key. Anything else is dropped
with a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from jupyter_gpu.common.protocol import SESSION_REPORTS
from jupyter_gpu.common.validation import BadMessage, check_fields

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
Forward = Callable[[str, dict[str, Any]], Awaitable[None]]


def checked(message: Any) -> tuple[str, dict[str, Any]] | None:
    """(op, fields) of a report a session may make, or None."""
    if not isinstance(message, dict) or message.get("op") not in SESSION_REPORTS:
        return None
    op = message.pop("op")
    try:
        check_fields(message, SESSION_REPORTS[op])
    except BadMessage as exc:
        log.warning("dropped a %s report from a session: %s", op, exc)
        return None
    return op, message


async def relay(sock: socket.socket, lease: str, forward: Forward) -> None:
    """Read one session's reports until it closes its end; ``forward(op, fields)`` each good one."""
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
    try:
        while True:
            try:
                line = await reader.readline()
            except (asyncio.LimitOverrunError, ValueError):
                log.warning("dropped an oversized report from the session of lease %s", lease)
                continue
            if not line:
                return
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("dropped a report that is not JSON from the session of lease %s", lease)
                continue
            report = checked(message)
            if report is not None:
                try:
                    await forward(*report)
                except Exception as exc:  # noqa: BLE001 - the broker is away: the report is lost, not the session
                    log.debug("could not pass on %s of lease %s: %s", report[0], lease, exc)
    finally:
        writer.close()
