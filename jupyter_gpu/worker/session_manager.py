"""A GPU worker's session processes: starting one for a lease, watching it, ending it, and its
variables in host memory.

Why apart from the plugin: the plugin (``worker/plugin.py``) is Dask's side of the worker, its
handlers and the reports to the broker; the sessions are this worker's own state, which outlives a
scheduler restart. A session whose user is isolated comes from the privileged launcher
(``worker/launcher_link.py``), already its user's, in its cgroup, on the broker's signed grant;
any other runs as the worker's account and comes from the worker's zygote
(``worker/forkserver.py``) or, without one, from a spare process kept warm (in a cgroup the worker
makes where it may: ``launcher/cgroups.py``). Either is then given its lease (``assign``) and its
standby plan, and restored from an earlier session's variables when its request asks. Starts are
queued ``session.start-concurrency`` at a time: on a busy machine eight sessions importing torch
at once each take eight times as long.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from distributed.comm import get_address_host
from distributed.core import rpc

from jupyter_gpu.common import config
from jupyter_gpu.common.inventory import GpuInfo
from jupyter_gpu.common.protocol import (
    AssignReply,
    GpuInfoMsg,
    LeaseView,
    LiveSession,
    OffloadResult,
    RestoreRef,
    RestoreResult,
    SessionStarted,
    StandbyPlan,
    StarterInfo,
)
from jupyter_gpu.common.refusals import CallError, Failed, Malformed, NotFound, NotPossible
from jupyter_gpu.common.security import security_env
from jupyter_gpu.common.units import format_bytes, typed_size
from jupyter_gpu.launcher.cgroups import Containment, MemoryUse, host_memory_limit, session_limits
from jupyter_gpu.worker.forkserver import ForkServer
from jupyter_gpu.worker.host_copies import HostCopies, checked_reply
from jupyter_gpu.worker.hoststore import HostStore, LaunchedStore
from jupyter_gpu.worker.launcher_link import LauncherLink
from jupyter_gpu.worker.relay import Forward, relay
from jupyter_gpu.worker.spawn import (
    SessionProcess,
    exit_reason,
    kill,
    launch_session,
    session_env,
    spawn_session,
)

log = logging.getLogger(__name__)


class SessionManager:
    """The sessions of one GPU worker (``worker``: the Dask worker; ``gpus``: the GPUs it owns)."""

    def __init__(
        self, worker: Any, gpus: list[GpuInfo], launcher: LauncherLink | None = None
    ) -> None:
        self.worker, self.gpus = worker, gpus
        self.launcher = launcher  # the privileged launcher of this machine (a root start)
        self.sessions: dict[str, SessionProcess] = {}
        # variables of sessions, in host memory here
        self.copies = HostCopies(worker, LaunchedStore(launcher) if launcher else None)
        self.spare: SessionProcess | None = None
        self._spare_task: asyncio.Task[None] | None = None
        self.forkserver: ForkServer | None = None  # the zygote sessions are forked from
        self._start_slots = asyncio.Semaphore(start_concurrency())
        Containment.sweep_stale()  # groups of earlier workers on this machine that were killed
        self.containment = Containment()
        self.host_memory_limit = configured_host_memory_limit()
        self._relays: dict[str, asyncio.Task[None]] = {}
        # killed processes, waited for so none stays a zombie
        self.reaping: list[subprocess.Popen[bytes]] = []

    def prewarm(self) -> None:
        """Start the zygote (or a spare process) now, so the first session starts warm (a worker
        with a launcher: the launcher's zygote is warm already; its own is made when needed)."""
        if config.get("session.fork-server") and sys.platform == "linux":
            tls = security_env(self.worker.security)
            self.forkserver = ForkServer(
                list(config.get("session.preload-modules") or []), session_env(tls)
            )
            if config.get("session.prewarm") and self.launcher is None:
                self.forkserver.start()
        elif config.get("session.prewarm") and self.launcher is None:
            self.refill_spare()

    def close(self) -> None:
        for sp in list(self.sessions.values()) + ([self.spare] if self.spare else []):
            sp.killed = True
            self.end_process(sp)
        if self.forkserver is not None:
            self.forkserver.close()
        self.containment.close()
        self.copies.close()  # offloaded namespaces die with their worker
        if self.launcher is not None:  # the launcher ends this connection's sessions and folders
            self.launcher.close()

    # ------------------------------------------------------------------ processes
    async def spawn(self) -> SessionProcess:
        """A new session process, started when one of the ``session.start-concurrency`` start slots
        is free."""
        async with self._start_slots:
            return await spawn_session(
                get_address_host(self.worker.address),
                self.worker.address,
                security_env(self.worker.security),
                forkserver=self.forkserver,
            )

    def refill_spare(self) -> None:
        if self.forkserver is not None:
            return
        if self.spare is not None or (self._spare_task is not None and not self._spare_task.done()):
            return

        async def refill() -> None:
            try:
                self.spare = await self.spawn()
            except Exception as exc:  # noqa: BLE001 - a spare is an optimisation: a session start spawns its own
                log.warning("could not pre-warm a session process: %s", exc)

        self._spare_task = asyncio.ensure_future(refill())

    async def take_process(self) -> SessionProcess:
        """The spare process (waiting for one on its way), or a new one."""
        if self._spare_task is not None and not self._spare_task.done():
            await self._spare_task
        sp, self.spare = self.spare, None
        if sp is None or sp.proc.poll() is not None:
            sp = await self.spawn()
        if config.get("session.prewarm"):
            self.refill_spare()
        return sp

    def starter_info(self) -> StarterInfo:
        if self.forkserver is not None:
            return {
                "kind": "fork",
                "worker_pid": os.getpid(),
                **self.forkserver.info(),
                "ready": self.forkserver.alive() and self.forkserver.ready.is_set(),
            }
        spare = self.spare
        return {
            "kind": "spare",
            "ready": spare is not None and spare.proc.poll() is None,
            "worker_pid": os.getpid(),
        }

    def end_process(self, sp: SessionProcess) -> None:
        """Kill a session and everything it started (its group), and reap it."""
        if sp.launched and self.launcher is not None:  # the launcher's: its group, its folder
            keep = sp.lease in self.copies.parked
            self.launcher.spawn(self.launcher.end(sp.lease or "", keep_folder=keep))
            self._end_link(sp)
            return
        kill(sp.proc)
        if sp.group is not None:
            sp.group.kill()
            sp.group.remove()
            sp.group = None
        self._end_link(sp)
        self.reaping.append(sp.proc)

    def _end_link(self, sp: SessionProcess) -> None:
        if sp.control is not None:
            sp.control.close()
            sp.control = None
        task = self._relays.pop(sp.lease or "", None)
        if task is not None:
            task.cancel()

    def kill(self, lease: str) -> bool:
        """End ``lease``'s session (False: none runs here)."""
        sp = self.sessions.pop(lease, None)
        if sp is None:
            return False
        sp.killed = True
        self.end_process(sp)
        self.copies.session_ended(lease)
        return True

    def exits(self) -> list[tuple[str, str]]:
        """The sessions that ended by themselves since the last call, with why (those the worker
        killed are not listed)."""
        self.reaping = [p for p in self.reaping if p.poll() is None]
        gone = []
        for lease, sp in list(self.sessions.items()):
            code = sp.proc.poll()
            if code is None:
                continue
            self.sessions.pop(lease, None)
            use = memory_use(sp)  # read before its group goes
            self.end_process(sp)  # what the session started ends with it
            self.copies.session_ended(lease)
            if sp.killed:
                continue
            gone.append((lease, ended_reason(lease, code, use)))
        if self.spare is not None and self.spare.proc.poll() is not None:
            self.spare = None
            if config.get("session.prewarm"):
                self.refill_spare()
        return gone

    # ------------------------------------------------------------------ a lease's session
    def check_lease(self, lease: LeaseView) -> None:
        """A lease this worker can start a session for: an id, and GPUs of this worker."""
        ours = {g.index for g in self.gpus}
        indices = lease.get("gpu_indices")
        if not lease.get("id") or not indices or not set(indices) <= ours:
            raise Malformed(
                f"gpu_session_start: the lease must name an id and GPUs of this worker "
                f"({sorted(ours)}), not {indices}"
            )
        if lease["id"] in self.sessions:
            raise NotPossible(f"gpu_session_start: lease {lease['id']} already has a session here")

    async def start(
        self,
        lease: LeaseView,
        client: str | None,
        secret: str,
        grant: tuple[str | None, str] | None,
        restore: RestoreRef | None,
        forward: Callable[[SessionProcess], Forward],
    ) -> SessionStarted:
        """Give a session process the lease: pinned, capped, restored; ``forward(sp)`` passes its
        reports on. ``grant``: (the pool user it runs as, or None: the service account; the
        broker's signed grant) for a session the launcher starts; None: one of this worker's
        account, from its zygote or its spare. A failure ends the process and raises ``Failed``
        with what went wrong."""
        lease_id = lease["id"]
        t0 = time.monotonic()
        try:
            if grant is not None:
                sp = await self.launch(lease_id, *grant)
            else:
                sp = await self.take_process()
            t_process = time.monotonic()
            by_index = {g.index: g for g in self.gpus}
            gpus: list[GpuInfoMsg] = [by_index[i].message() for i in lease["gpu_indices"]]
            sp.lease, sp.secret = lease_id, secret
            sp.grant = {"lease": dict(lease), "client": client}
            self.sessions[lease_id] = sp
            if sp.control is not None:  # its reports, checked, to the broker
                self._relays[lease_id] = asyncio.ensure_future(
                    relay(sp.control, lease_id, forward(sp))
                )
                sp.control = None
            containment, rlimit = self._contain(sp, lease, gpus)
            restored = await self._assign(sp, lease, gpus, secret, rlimit, restore)
        except Exception as exc:
            log.exception("could not start a session for lease %s", lease_id)
            self.kill(lease_id)
            raise Failed(
                str(exc) if isinstance(exc, CallError) else f"{type(exc).__name__}: {exc}"
            ) from None
        log.info(
            "lease %s: session %d ready in %.0f ms (process %.0f ms, assign %.0f ms)",
            lease_id,
            sp.pid,
            (time.monotonic() - t0) * 1e3,
            (t_process - t0) * 1e3,
            (time.monotonic() - t_process) * 1e3,
        )
        assert sp.grant is not None  # given the lease above
        isolation = sp.grant["lease"]["isolation"]
        sp.grant["lease"].update(containment=containment[0], host_memory_limit=containment[1])
        return {
            "address": sp.address,
            "pid": sp.pid,
            "isolation": isolation,
            "restored": restored,
            "as_user": sp.user is not None,
            "containment": containment[0],
            "host_memory_limit": containment[1],
        }

    async def launch(self, lease_id: str, user: str | None, grant: str) -> SessionProcess:
        """A session as ``user`` (None: the service account), started by the launcher on the
        broker's ``grant``: confined and in its cgroup before it runs anything (``launcher/``)."""
        assert self.launcher is not None and self.copies.launched is not None  # a root start
        async with self._start_slots:
            sp, folder = await launch_session(
                self.launcher,
                lease_id,
                user,
                grant,
                get_address_host(self.worker.address),
                session_env(security_env(self.worker.security)),
            )
        self.copies.launched.register(lease_id, folder)
        return sp

    def _contain(
        self, sp: SessionProcess, lease: LeaseView, gpus: list[GpuInfoMsg]
    ) -> tuple[tuple[str, int | None], int | None]:
        """Put the session in its cgroup with the host memory and cores its lease booked, and a
        processes cap (the launcher's sessions are in theirs already, with the limits of their
        signed grant); without one, a data-size rlimit stands in for the memory limit on virtual
        GPUs (CUDA maps more than it uses). Returns what the lease says of it (how it is
        contained, its host-memory limit), and the rlimit."""
        virtual = all(g.get("virtual") for g in gpus)
        limits = lease_limits(lease, self.host_memory_limit)
        memory = limits["memory.max"]
        if sp.launched and sp.containment is not None:
            kind, limit = sp.containment
            if kind == "process group" and virtual and memory:
                return ("rlimit", memory), memory
            return (kind, limit), None
        sp.group = self.containment.group(lease["id"], limits)
        if sp.group is not None:
            sp.group.add(sp.pid)
        rlimit = memory if sp.group is None and virtual else None
        kind = (
            self.containment.kind
            if sp.group is not None
            else ("rlimit" if rlimit else "process group")
        )
        limit = sp.group.memory_limit if sp.group is not None else rlimit
        return (kind, limit), rlimit

    async def _assign(
        self,
        sp: SessionProcess,
        lease: LeaseView,
        gpus: list[GpuInfoMsg],
        secret: str,
        rlimit: int | None,
        restore: RestoreRef | None,
    ) -> RestoreResult | None:
        """``assign`` (and ``restore``) on the session, over the worker's TLS."""
        store = self.copies.store(lease["id"])
        store.folder(lease["id"])  # made now (this worker's), or the launcher's already
        restored: RestoreResult | None = None
        async with rpc(sp.address, connection_args=self.worker.connection_args) as session:
            reply = await session.assign(
                key=sp.spawn_key,
                secret=secret,
                lease=lease,
                gpus=gpus,
                standby=standby_plan(lease, store),
                memory_rlimit=rlimit,
            )
            checked_reply(reply, AssignReply, "assign")
            if restore:
                path = await self.copies.restore_file(restore, lease["id"], sp.user)
                restored = await session.restore(path=path, secret=secret) if path else None
                checked_reply(restored, RestoreResult | None, "restore")
        assert sp.grant is not None  # set by start
        sp.grant["lease"].update(address=sp.address, pid=sp.pid, isolation=reply["isolation"])
        return restored

    async def busy(self, sp: SessionProcess) -> bool:
        """Whether ``sp`` runs a cell now (not answering: busy, so it is never moved while
        unsure)."""
        try:
            async with rpc(sp.address, connection_args=self.worker.connection_args) as session:
                reply = await asyncio.wait_for(session.ping(secret=sp.secret), 5)
            return bool(reply["busy"])
        except Exception:  # noqa: BLE001 - not answering: count it busy, so it is never moved while unsure
            return True

    async def live(self) -> list[LiveSession]:
        """The sessions that hold a lease here, for a restarted broker to adopt."""
        found: list[LiveSession] = []
        for sp in list(self.sessions.values()):
            if sp.grant is None or sp.proc.poll() is not None or "address" not in sp.grant["lease"]:
                continue
            grant = sp.grant
            found.append(
                {"lease": grant["lease"], "client": grant["client"], "busy": await self.busy(sp)}
            )
        return found

    async def offload(self, lease: str, timeout: float) -> OffloadResult:
        """Move a session's variables to host memory on this machine (its lease is being
        reclaimed)."""
        sp = self.sessions.get(lease)
        if sp is None:
            raise NotFound(f"no session of lease {lease} runs here")
        return await self.copies.offload(sp, lease, timeout)


def standby_plan(lease: LeaseView, store: HostStore) -> StandbyPlan | None:
    """Where (and after how long idle) a session writes its standby copy (``standby.py``); none
    for the ranks of a --workers run (never moved to host memory) or when idle sessions are not
    offloaded."""
    if (
        config.get("session.standby-after") is None
        or not config.get("reclaim-offload")
        or lease.get("world_size", 1) > 1
    ):
        return None
    try:
        after = config.get_seconds("session.standby-after")
    except (ValueError, TypeError, KeyError):
        after = -1.0
    if after < 0:
        log.error(
            "jupyter-gpu.session.standby-after is %r, not a duration: standby copies are off "
            "until it is set to one (e.g. 2s) or to null",
            config.get("session.standby-after"),
        )
        return None
    return {"path": store.standby_path(lease["id"]), "after": after}


def memory_use(sp: SessionProcess) -> MemoryUse | None:
    """What the session's cgroup counted of its host memory (the launcher's exit event, or this
    worker's own group); None where it had no group (nothing was counted)."""
    if sp.group is not None:
        return sp.group.memory_use()
    if sp.launched and sp.containment is not None and sp.containment[0] != "process group":
        proc = sp.proc
        limit = getattr(proc, "memory_limit", None)
        return MemoryUse(
            peak=getattr(proc, "memory_peak", None),
            limit=limit if limit is not None else sp.containment[1],
            oom_kills=int(bool(getattr(proc, "oom", False))),  # the launcher: over its limit
            limit_hits=int(bool(getattr(proc, "oom", False))),
        )
    return None


def lease_limits(lease: LeaseView, cap: int | None) -> dict[str, int | None]:
    """The cgroup limits of ``lease``'s session: what the broker booked for it here (its host
    memory and cores), under the admin's ``cap`` (``session.host-memory-limit``)."""
    cpus = lease.get("cpus") or 0
    milli = int(round(cpus * 1000)) if isinstance(cpus, (int, float)) else 0
    memory = lease.get("host_memory") or 0
    return session_limits(
        memory if isinstance(memory, int) else 0, milli, cap, pids_limit(), min_cpu_milli()
    )


def ended_reason(lease: str, code: int, use: MemoryUse | None) -> str:
    """Why a session ended, saying only what is known: that it went over its own host-memory
    limit only when its cgroup counted an OOM kill after its usage reached that limit (a cgroup's
    limit kills inside the group, so no other session was stopped for it); any other SIGKILL came
    from outside it (the machine's OOM killer, which its group counts too, or a signal), and is
    said so."""
    if use is not None and use.over_its_limit and use.limit:
        peak = f"; its peak was {format_bytes(use.peak)}" if use.peak else ""
        return (
            f"this cell's session (lease {lease}) used more host memory than its limit of "
            f"{format_bytes(use.limit)}{peak}; the "
            "operating system stopped this session alone, and its variables are lost. Ask for "
            f"more with `%%gpu --host-memory {typed_size(2 * use.limit)}` (the "
            "pool's limit per session permitting), or use less memory in the cell"
        )
    reason = exit_reason(code)
    if use is not None and use.limit and code == -signal.SIGKILL:
        peak = f" (peak {format_bytes(use.peak)})" if use.peak else ""
        reason = (
            f"the session process was killed by SIGKILL from outside it (lease {lease}): it "
            f"stayed within its own host-memory limit of {format_bytes(use.limit)}{peak}, so that "
            "limit did not stop it; the machine's out-of-memory killer (the machine itself ran "
            "short of memory) or a process allowed to signal it did"
        )
    return reason


def pids_limit() -> int | None:
    """How many processes one session (with all it starts) may have (``session.pids-limit``)."""
    value = config.get("session.pids-limit")
    return int(value) if value else None


def min_cpu_milli() -> int:
    """``session.min-cpus`` in thousandths of a core: the least ``cpu.max`` a session gets (a
    setting that is not a number is said, and counts as 0: strict)."""
    value = config.get("session.min-cpus") or 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
        log.error("jupyter-gpu.session.min-cpus is %r, not a number of cores: 0 is used", value)
        return 0
    return int(value * 1000)


def start_concurrency() -> int:
    """How many session processes a worker starts at once (``session.start-concurrency``)."""
    return max(1, int(config.get("session.start-concurrency") or 1))


def configured_host_memory_limit() -> int | None:
    """``session.host-memory-limit`` in bytes for this machine (a typo turns it off, loudly)."""
    import psutil

    setting = config.get("session.host-memory-limit")
    try:
        return host_memory_limit(setting, psutil.virtual_memory().total)
    except (ValueError, TypeError) as exc:
        log.error(
            "jupyter-gpu.session.host-memory-limit is %r (%s): sessions have no host-memory limit "
            "until it is a size (64GiB), a share of the machine (50%%) or null",
            setting,
            exc,
        )
        return None


def forwarding(
    send: Callable[[SessionProcess, str, dict[str, Any]], Any],
) -> Callable[[SessionProcess], Forward]:
    """``forward(sp)`` for ``start``: the plugin's ``send(sp, op, fields)`` bound to ``sp``."""
    return lambda sp: functools.partial(send, sp)
