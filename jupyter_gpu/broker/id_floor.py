"""Request and lease ids stay unique across restarts of the pool's scheduler.

Why: ids are short numbers counted from 1 (``R12``, ``L13``: people read and type them), and a
restarted broker counted from 1 again. Workers rejoin one after another, each reporting the sessions
it kept, which the new broker adopts under their old ids; a kernel that asked for a session in
between got a new lease numbered like one of those, and the session of the worker that rejoined
next was then refused ("lease L2 is already live") and ended, variables and all. A kernel waiting
on a request id of the old broker could likewise read someone else's new request.

So the broker keeps the highest id it has handed out in a small file next to the pool key (which
only the pool's account reads and writes), and a broker that starts continues after it. The mark is
written when it grows, in the same pass that made the id (before any kernel hears of it), and when
the broker stops; an embedded pool, which never restarts with its sessions, removes the file with
its key.
"""

from __future__ import annotations

import contextlib
import logging
import os

from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import ids_beyond

log = logging.getLogger(__name__)


def floor_path(key_path: str) -> str:
    """Where the broker whose pool key is at ``key_path`` keeps its id mark."""
    return f"{key_path}.ids"


def _number(ident: str | None) -> int:
    """The number of an id (``L13`` -> 13); 0 for anything else."""
    digits = (ident or "")[1:]
    return int(digits) if digits.isdigit() else 0


class IdFloor:
    """The id mark of one broker: :meth:`resume` when it starts, :meth:`note` after it made ids."""

    def __init__(self, path: str):
        self.path = path
        self.mark = 0

    def resume(self) -> int:
        """Continue after the ids of this pool's earlier brokers; returns the mark found (0: none
        recorded)."""
        try:
            with open(self.path) as f:
                self.mark = int(f.read().strip() or 0)
        except FileNotFoundError:
            self.mark = 0
        except (OSError, ValueError) as exc:
            log.warning(
                "could not read the pool's id mark %s (%s): ids start over, and sessions kept "
                "across this restart may be refused if an id is handed out twice",
                self.path,
                exc,
            )
            self.mark = 0
        if self.mark:
            ids_beyond([f"X{self.mark}"])
            log.info("request and lease ids continue after %d (%s)", self.mark, self.path)
        return self.mark

    def note(self, ledger: Ledger) -> None:
        """Record the newest id of ``ledger`` when it is beyond the mark. The newest request and
        lease are the last ones recorded (dicts keep their order), so this costs two lookups."""
        newest = max(
            _number(next(reversed(ledger.requests), None)),
            _number(next(reversed(ledger.leases), None)),
        )
        if newest <= self.mark:
            return
        self.mark = newest
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w") as f:
                f.write(f"{newest}\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not record the pool's id mark in %s: %s", self.path, exc)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
