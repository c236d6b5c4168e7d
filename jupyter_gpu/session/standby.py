"""A standby copy of an idle session's variables in host memory, written while nobody waits for it.

Why: suspending an idle session (for a waiting cell, a reclaim or the admin's idle timeout) means
writing its variables to host memory before its GPU memory can be given away, and the cell that
displaced it waits for that write. The pool simulator (``bench/pool_sim.py``) shows that write is
what makes a busy pool's cells wait most. A session that has been idle for ``session.standby-after``
seconds writes the copy ahead of need instead, in its otherwise idle main thread; when the broker
then suspends it, the copy is handed over by a rename and the GPU is free at once.

A copy is only ever used for the namespace it was taken of: a cell (or a restore) makes it stale,
and it is deleted there and then, so host memory holds at most one copy per idle session. A cell
that arrives while the copy is being written stops it within a few MiB of writing (``should_stop``,
asked between pieces of every large record: ``offload._StoppableFile``), never waiting for a whole
tensor, let alone the whole copy; a stale copy, or the part of one that was stopped, is freed on a
thread, so the cell does not wait for its pages either. A copy is skipped when the folder would be
left with less than twice its size free, so that copies never crowd out real offloads.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Callable

from jupyter_gpu.common.hostmem import discard, discard_soon
from jupyter_gpu.session.offload import CopyStopped, save_namespace

log = logging.getLogger(__name__)

MIN_FREE = 1 << 30  # what a copy must leave free in host memory (bytes), besides its own size again


class StandbyCopy:
    """The standby copy of one session: when it is due, writing it, and handing it over on
    suspension."""

    def __init__(self, path: str | None, after: float | None):
        self.path = path
        self.after = after
        self.generation = 0  # bumped by every cell: a copy of an older generation is stale
        self._copied: int | None = None  # generation the file at ``path`` holds
        # generation a copy was attempted for (failed: not retried)
        self._tried: int | None = None
        self._result: dict | None = None
        self.idle_since: float | None = None

    @property
    def enabled(self) -> bool:
        return self.path is not None and self.after is not None

    def changed(self) -> None:
        """The namespace is about to change (a cell starts, variables are restored): drop the
        copy."""
        self.generation += 1
        self.idle_since = None
        self.drop()

    def idle(self) -> None:
        """The session finished its work and waits: the copy falls due ``after`` seconds from
        now."""
        self.idle_since = time.monotonic()

    def due_in(self) -> float | None:
        """Seconds until a copy should be written (0: now), or None when there is nothing to do."""
        if (
            not self.enabled
            or self.idle_since is None
            or self.generation == 0
            or self.generation in (self._copied, self._tried)
        ):
            return None
        assert self.after is not None  # enabled
        return max(0.0, self.idle_since + self.after - time.monotonic())

    def take(
        self,
        ns: dict,
        hidden: dict | None,
        expected_bytes: int | None,
        should_stop: Callable[[], bool],
    ) -> bool:
        """Write the copy (``save_namespace``), unless ``should_stop`` says work arrived; True when
        written."""
        assert self.path is not None
        generation = self.generation
        self._tried = generation
        folder = os.path.dirname(self.path)
        free = shutil.disk_usage(folder).free
        if free < 2 * (expected_bytes or 0) + MIN_FREE:
            log.info(
                "no standby copy: %d bytes free in %s, the session holds about %s",
                free,
                folder,
                expected_bytes,
            )
            return False
        started = time.monotonic()
        try:
            result = save_namespace(ns, hidden, self.path, should_stop=should_stop)
        except CopyStopped:
            self._tried = None  # work arrived: try again when the session is idle again
            return False
        except BaseException as exc:  # noqa: BLE001 - a copy is an optimisation: the real offload still runs
            log.info("no standby copy (%s: %s)", type(exc).__name__, exc)
            discard(f"{self.path}.part")
            if isinstance(exc, KeyboardInterrupt):
                self._tried = None
            return False
        self._copied, self._result = generation, result
        log.info(
            "standby copy of %d variable(s), %d byte(s) in %.2f s",
            len(result["saved"]),
            result["bytes"],
            time.monotonic() - started,
        )
        return True

    def hand_over(self, path: str) -> dict | None:
        """The copy moved to ``path`` as the session's offload, when it is of the namespace as it is
        now."""
        if self._copied is None or self._copied != self.generation or self._result is None:
            return None
        assert self.path is not None  # a copy was written there
        try:
            os.replace(self.path, path)
        except OSError as exc:
            log.warning(
                "the standby copy could not be handed over (%s): writing the variables now", exc
            )
            return None
        self._copied = None
        return {**self._result, "path": path, "standby": True}

    def drop(self) -> None:
        """The copy is stale (a cell starts, variables are restored): its host memory goes, on a
        thread (``discard_soon``: the cell does not wait for the pages to be freed)."""
        if self._copied is not None and self.path:
            discard_soon(self.path)
        self._copied, self._result = None, None
