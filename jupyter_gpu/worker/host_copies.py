"""A GPU worker's copies of sessions' variables in host memory: written when a lease is taken back,
kept for their owner, handed to the worker of the owner's next session.

Why apart from the sessions: a copy outlives its session (its owner's next cell brings the variables
back, maybe on another machine) and a restart of the scheduler (a restarted broker is told of it:
``ParkedCopy``). The files are the store's (``worker/hoststore.py``): the worker's own for sessions
of its account, the launcher's for sessions that run as their users. Copies are named by the lease
whose session wrote them, never by a path a caller gives. When host memory is short the broker has
the oldest spilled to the pool's disk folder (``spill``); a restore takes them from there.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from distributed.core import rpc

from jupyter_gpu.common.protocol import OffloadResult, ParkedCopy, RestoreRef
from jupyter_gpu.common.refusals import CallError, Failed, NotFound
from jupyter_gpu.common.validation import BadMessage, check
from jupyter_gpu.worker.hoststore import HostStore, LaunchedStore
from jupyter_gpu.worker.spawn import SessionProcess

log = logging.getLogger(__name__)


@dataclass
class Parked:
    """An ended session's variables kept in host memory here, with their owner (what a restarted
    broker needs to give them back) and the pool user whose account the files are (None: this
    worker's own)."""

    copy: ParkedCopy
    user: str | None


def checked_reply(reply: Any, shape: Any, op: str) -> None:
    """A session's reply to its worker, checked against its type (a session runs its user's code,
    which may answer anything): ``Failed`` naming what is wrong."""
    try:
        check(reply, shape, f"the session's {op} reply")
    except BadMessage as exc:
        raise Failed(str(exc)) from None


class HostCopies:
    """The copies of one worker (``worker``: the Dask worker, for its TLS and its rpc;
    ``launched``: the store of its launcher's sessions, when it has a launcher)."""

    def __init__(self, worker: Any, launched: LaunchedStore | None = None) -> None:
        self.worker = worker
        self.local = HostStore()
        self.launched = launched
        self.parked: dict[str, Parked] = {}  # lease id -> its variables kept here
        self.pool_key: str | None = None  # what another worker asks of a fetch (the plugin's)
        # one move at a time per copy: a spill and a restore of one copy never overlap
        self._moving: dict[str, asyncio.Lock] = {}

    def _lock(self, lease: str) -> asyncio.Lock:
        return self._moving.setdefault(lease, asyncio.Lock())

    def store(self, lease: str) -> HostStore:
        """Where ``lease``'s folder is: the launcher's if it made it, else this worker's."""
        if self.launched is not None and lease in self.launched.folders:
            return self.launched
        return self.local

    async def offload(self, sp: SessionProcess, lease: str, timeout: float) -> OffloadResult:
        """Have ``sp`` write its variables here; kept with its owner, so that a restarted broker
        can give them back."""
        try:
            async with rpc(sp.address, connection_args=self.worker.connection_args) as session:
                result: OffloadResult = await asyncio.wait_for(
                    session.offload(path=self.store(lease).offload_path(lease), secret=sp.secret),
                    timeout,
                )
        except CallError:
            raise
        except Exception as exc:  # noqa: BLE001 - the broker then ends the session without its variables
            raise Failed(f"{type(exc).__name__}: {exc}") from None
        # the session runs its user's code: what it answers is checked before anyone acts on it
        checked_reply(result, OffloadResult, "offload")
        if sp.grant is not None:
            copy: ParkedCopy = {
                "lease": sp.grant["lease"],
                "client": sp.grant["client"],
                "path": result["path"],
                "saved": result["saved"],
                "lost": result["lost"],
                "bytes": result["bytes"],
                "standby": bool(result.get("standby")),
            }
            self.parked[lease] = Parked(copy, sp.user)
        return result

    async def restore_file(self, restore: RestoreRef, lease: str, user: str | None) -> str | None:
        """The offloaded namespace of lease ``restore["lease"]`` as a file in the new session's
        folder: moved there when it was parked on this worker, else fetched from the worker that
        keeps it (a pool across machines). None: it is gone, or it is not a file this session's
        account may trust."""
        old = restore["lease"]
        try:
            async with self._lock(old):
                if old in self.parked:
                    if self.parked[old].user != user:
                        raise PermissionError(f"the copy of {old} belongs to another user")
                    moved = await self.store(old).move(old, lease)
                    self.forget(old)
                    return moved
            async with self.worker.rpc(restore["worker"]) as keeper:
                fetched = await keeper.gpu_offload_fetch(lease=old, key=self.pool_key)
            return await self.store(lease).write(fetched["data"], lease)
        except Exception as exc:  # noqa: BLE001 - refused, unsafe, or that worker is gone: the variables are lost, said by the kernel
            log.warning("not restoring the variables of %s for lease %s: %s", old, lease, exc)
            return None

    async def fetch(self, lease: str) -> bytes:
        """The copy of ``lease`` parked here, for the worker where its kernel's new session starts;
        forgotten here."""
        async with self._lock(lease):
            if self.parked.get(lease) is None:
                raise NotFound(f"no offloaded variables of {lease} on this worker")
            data = await self.store(lease).read(lease)
            self.forget(lease)
            return data

    async def spill(self, lease: str) -> int:
        """Move the copy of ``lease`` parked here from host memory to the pool's disk folder (the
        broker needs the memory for sessions); returns its bytes (0: on disk already)."""
        async with self._lock(lease):
            if lease not in self.parked:
                raise NotFound(f"no offloaded variables of {lease} on this worker")
            copied = await self.store(lease).spill(lease)
            self.parked[lease].copy["spilled"] = True  # a restarted broker books no memory for it
        log.info("the copy of %s moved to disk (%d bytes)", lease, copied)
        return copied

    def forget(self, lease: str, live: frozenset[str] = frozenset()) -> None:
        """Forget the copy of ``lease`` (its folder goes too, unless its session still runs:
        ``live``)."""
        self._moving.pop(lease, None)
        if self.parked.pop(lease, None) is not None and lease not in live:
            self.store(lease).forget(lease)

    def session_ended(self, lease: str) -> None:
        """A session ended: its folder goes, unless its variables are parked there for its
        owner."""
        store = self.store(lease)
        if lease not in self.parked:
            store.forget(lease)
        elif store is self.local:  # a standby copy it was writing is of no use now
            from jupyter_gpu.common.hostmem import discard

            discard(self.local.standby_path(lease))

    def close(self) -> None:
        self.local.close()
        if self.launched is not None:
            self.launched.close()
