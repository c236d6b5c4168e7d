"""The session's one way to the control plane: a private socket its worker handed it when it started
it.

Why not a connection to the scheduler: a session runs its user's code, so nothing it holds may let
that code act as a part of the pool (the pool's TLS key, its address with a credential, another
lease's name). The worker starts each session with one end of a socket pair (``--control-fd``); what
arrives on it can only come from that session, so the worker knows which lease it is about without
trusting what it says, checks every field, and forwards it to the broker with its own credential.
The session only ever reports on itself: cell started or ended (with its measured memory), and the
metrics of a ``--workers`` rank.

Messages are JSON lines, ``{"op": ..., **fields}`` with the fields of ``common/protocol.py``'s
``SESSION_REPORTS`` (``LeaseStateReport``, ``RunMetricsReport``); writes are fire-and-forget on the
session's I/O loop, so reporting never sits on a cell's path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from jupyter_gpu.common.protocol import LeaseStateReport

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import Unpack

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # what the worker reads at most per message


class WorkerLink:
    """Reports from this session to its worker (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int | None):
        self.loop = loop
        self._fd = fd
        self._writer: asyncio.StreamWriter | None = None
        # a coalesced report waiting to go (tell_coalesced)
        self._held: tuple[str, dict] | None = None

    async def open(self) -> None:
        """Wrap the inherited socket (on the I/O loop, once, before anything is reported)."""
        if self._fd is None:
            return
        sock = socket.socket(fileno=self._fd)
        sock.setblocking(False)
        _, self._writer = await asyncio.open_unix_connection(sock=sock)

    @property
    def connected(self) -> bool:
        return self._writer is not None

    def tell(self, op: str, **fields: Any) -> None:
        """Send one report, from any thread; dropped (logged) if it cannot be sent."""
        if self._writer is None:
            return
        line = self._line(op, fields)
        if line is not None:
            self.loop.call_soon_threadsafe(self._write, line)

    @staticmethod
    def _line(op: str, fields: dict) -> bytes | None:
        line = json.dumps({"op": op, **fields}, default=repr).encode() + b"\n"
        if len(line) > MAX_LINE:
            log.warning("report %s too large (%d bytes): not sent", op, len(line))
            return None
        return line

    def tell_coalesced(
        self, delay: float, op: str, merge: Callable[[dict, dict], dict], **fields: Any
    ) -> None:
        """Send a report within ``delay`` s, merged (``merge(held, new)``) with any report held back
        the same way meanwhile: a loop of quick cells tells its worker, and through it the broker, a
        few times a second instead of after every cell. Any other report sends the held one first,
        so the order of states holds (a cell's "running" never overtakes the "idle" of the cell
        before it)."""
        if self._writer is not None:
            self.loop.call_soon_threadsafe(self._hold, delay, op, fields, merge)

    def _hold(
        self, delay: float, op: str, fields: dict, merge: Callable[[dict, dict], dict]
    ) -> None:
        if self._held is not None:
            self._held = (op, merge(self._held[1], fields))
            return
        self._held = (op, fields)
        self.loop.call_later(delay, self._release_held)

    def _release_held(self) -> None:
        if self._held is None:
            return
        (op, fields), self._held = self._held, None
        line = self._line(op, fields)
        if line is not None:
            self._send(line)

    def tell_later(self, delay: float, op: str, **fields: Any) -> Any:
        """Send a report in ``delay`` s unless :meth:`cancel` comes first (from any thread): a cell
        that is over by then is reported once, when it ends, and a warm no-op cell costs the pool
        nothing more."""
        if self._writer is None:
            return None
        pending: dict[str, Any] = {"cancelled": False, "sent": False, "lock": threading.Lock()}

        def go() -> None:
            with pending["lock"]:
                if pending["cancelled"]:
                    return
                pending["sent"] = True
            self.tell(op, **fields)

        self.loop.call_soon_threadsafe(lambda: self.loop.call_later(delay, go))
        return pending

    @staticmethod
    def cancel(pending: Any) -> bool:
        """Cancel a :meth:`tell_later`; whether it was still pending (False: it was sent, or never
        planned)."""
        if not pending:
            return False
        with pending["lock"]:
            if pending["cancelled"] or pending["sent"]:
                return False
            pending["cancelled"] = True
            return True

    def _write(self, line: bytes) -> None:
        self._release_held()
        self._send(line)

    def _send(self, line: bytes) -> None:
        try:
            assert self._writer is not None  # connected (callers check)
            self._writer.write(line)
        except Exception as exc:  # noqa: BLE001 - the worker is gone: so is this session, soon
            log.debug("could not tell the worker: %s", exc)

    def tell_lease_state(self, **fields: Unpack[LeaseStateReport]) -> None:
        """Cell running / idle, with what the session measured (the worker adds which lease)."""
        self.tell("lease_state", **fields)
