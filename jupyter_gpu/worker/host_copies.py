"""A GPU worker's copies of sessions' variables in host memory: written when a lease is taken back,
kept for their owner, handed to the worker of the owner's next session.

Why apart from the sessions: a copy outlives its session (its owner's next cell brings the variables
back, maybe on another machine) and a restart of the scheduler (a restarted broker is told of it:
``ParkedCopy``). The files are the ``HostStore``'s (``worker/hoststore.py``: per-session folders,
0600 files, checked before a restore trusts them).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

from distributed.core import rpc

from jupyter_gpu.common.protocol import Account, OffloadResult, ParkedCopy, RestoreRef
from jupyter_gpu.common.refusals import CallError, Failed, NotFound
from jupyter_gpu.common.validation import BadMessage, check
from jupyter_gpu.worker.hoststore import HostStore, UnsafeFile
from jupyter_gpu.worker.spawn import SessionProcess

log = logging.getLogger(__name__)


@dataclass
class Parked:
    """An ended session's variables kept in host memory here, with their owner (what a restarted
    broker needs to give them back) and the account whose files they are."""

    copy: ParkedCopy
    account: Account | None


def checked_reply(reply: Any, shape: Any, op: str) -> None:
    """A session's reply to its worker, checked against its type (a session runs its user's code,
    which may answer anything): ``Failed`` naming what is wrong."""
    try:
        check(reply, shape, f"the session's {op} reply")
    except BadMessage as exc:
        raise Failed(str(exc)) from None


class HostCopies:
    """The copies of one worker (``worker``: the Dask worker, for its TLS and its rpc)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.store = HostStore()
        self.parked: dict[str, Parked] = {}  # lease id -> its variables kept here
        self.pool_key: str | None = None  # what another worker asks of a fetch (the plugin's)

    async def offload(self, sp: SessionProcess, lease: str, timeout: float) -> OffloadResult:
        """Have ``sp`` write its variables here; kept with its owner, so that a restarted broker
        can give them back."""
        try:
            async with rpc(sp.address, connection_args=self.worker.connection_args) as session:
                result: OffloadResult = await asyncio.wait_for(
                    session.offload(path=self.store.offload_path(lease), secret=sp.secret),
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
            self.parked[lease] = Parked(copy, sp.account)
        return result

    async def restore_file(
        self, restore: RestoreRef, lease: str, account: Account | None
    ) -> str | None:
        """The offloaded namespace as a file in the new session's folder: moved there when it was
        parked on this worker, else fetched from the worker that keeps it (a pool across machines).
        None: it is gone, or it is not a file this session's account may trust."""
        path = restore["path"]
        try:
            if self.store.owns(path) and os.path.exists(path):
                moved = self.store.hand_over(path, lease, account)
                self.forget(path)
                return moved
            async with self.worker.rpc(restore["worker"]) as keeper:
                fetched = await keeper.gpu_offload_fetch(path=path, key=self.pool_key)
        except UnsafeFile as exc:
            log.warning("not restoring %s for lease %s: %s", path, lease, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - that worker refused or is gone: the variables are lost, said by the kernel
            log.warning(
                "could not fetch offloaded variables %s from %s: %s", path, restore["worker"], exc
            )
            return None
        return self.store.receive(fetched["data"], lease, account)

    def fetch(self, path: str) -> bytes:
        """An offloaded namespace, for the worker where its kernel's new session starts; forgotten
        here."""
        if not self.store.owns(path) or not os.path.isfile(path):
            raise NotFound(f"no offloaded variables at {path} on this worker")
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
        self.forget(path)
        return data

    def forget(self, path: str, live: frozenset[str] = frozenset()) -> None:
        """Forget the copy at ``path`` (its folder goes too, unless its session still runs:
        ``live``)."""
        for lease, entry in list(self.parked.items()):
            if entry.copy["path"] == path:
                del self.parked[lease]
                if lease not in live:
                    self.store.forget(lease)

    def session_ended(self, lease: str) -> None:
        """A session ended: its folder goes, unless its variables are parked there for its owner."""
        if lease not in self.parked:
            self.store.forget(lease)
        else:  # a standby copy it was writing is of no use now
            try:
                os.unlink(self.store.standby_path(lease))
            except OSError:
                pass
