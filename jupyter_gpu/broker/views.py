"""What the broker shows: the pool snapshot, a request's status, a lease with its GPUs.

Why apart from the plugin: these are pure functions of the ledger (and the samples the broker
keeps), the one place that decides what the panel, ``%gpu status`` and ``jupyter-gpu status`` see.
They build the ``protocol`` shapes (``Snapshot``, ``RequestStatus``, ``LeaseView``) and nothing
else.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Literal, cast

from jupyter_gpu.broker.hosts import CPU_MILLI
from jupyter_gpu.broker.identity import Verdict
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import GpuSlot, Lease, Request
from jupyter_gpu.common.protocol import (
    GpuView,
    HostView,
    LeaseView,
    ParkedView,
    PoolInfo,
    QueueItem,
    QuotasView,
    RequestStatus,
    RunView,
    Sample,
    Snapshot,
    TeamQuotaView,
    UsageReport,
    UsageView,
    UserQuotaView,
    Viewer,
)
from jupyter_gpu.common.rightsizing import right_size
from jupyter_gpu.common.units import format_bytes

SAMPLES_SHOWN = 60  # per GPU in a snapshot (the panel's sparklines)
RUNS_SHOWN = 10  # the latest --workers runs
RUN_POINTS_SHOWN = 300  # per rank of a run: the panel polls the snapshot every second


def host_of(address: str) -> str:
    from distributed.comm import get_address_host

    try:
        return get_address_host(address)
    except Exception:  # noqa: BLE001 - a malformed address, or a scheme whose backend fails to load
        return address


def host_order(host: str) -> tuple[int, int, int | str]:
    """Sort key of a host: IPv4/IPv6 addresses by number (10.0.0.9 before 10.0.0.10), names by
    name."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return (1, 0, host)
    return (0, ip.version, int(ip))


def gpu_order(
    worker: str, index: int
) -> tuple[tuple[int, int, int | str], int, tuple[int, int, str]]:
    """Sort key of a GPU: by host, then by its device number on that host, then by worker address
    (port by number). Not by the worker's address first: with one worker per GPU, the worker holding
    GPU 1 may have the lower port, and "GPU 1, GPU 0" reads as a mistake."""
    host = host_of(worker)
    port = worker.rsplit(":", 1)[-1]
    return (host_order(host), index, (0, int(port), "") if port.isdigit() else (1, 0, worker))


def hosts_view(gpus: list[GpuView], ledger: Ledger) -> list[HostView]:
    """The machines of the pool, each with its workers' GPUs, host memory and cores, in the order
    of ``gpus`` (already by host)."""
    hosts: dict[str, HostView] = {}
    workers: dict[str, set[str]] = {}
    for g in gpus:
        h = hosts.setdefault(
            g["host"],
            {
                "host": g["host"],
                "workers": 0,
                "gpus": [],
                "total_bytes": 0,
                "leased_bytes": 0,
                "host_memory": 0,
                "host_memory_leased": 0,
                "host_memory_parked": 0,
                "host_memory_spilled": 0,
                "cpus": 0.0,
                "cpus_leased": 0.0,
            },
        )
        h["gpus"].append(g["id"])
        h["total_bytes"] += g["total_bytes"]
        h["leased_bytes"] += g["leased_bytes"]
        workers.setdefault(g["host"], set()).add(g["worker"])
    spilled: dict[str, int] = {}
    for ls in ledger.ended.values():
        if ls.offload is not None and ls.offload.spilled:
            spilled[ls.offload.worker] = spilled.get(ls.offload.worker, 0) + ls.offload.bytes
    for name, h in hosts.items():
        h["workers"] = len(workers[name])
        for worker in sorted(workers[name]):
            slot = ledger.hosts.get(worker)
            if slot is None:  # not booked here: unbounded
                h["host_memory"], h["cpus"] = None, None
                continue
            memory, cpus = h["host_memory"], h["cpus"]
            h["host_memory"] = (
                None if memory is None or slot.memory is None else memory + slot.memory
            )
            h["cpus"] = (
                None
                if cpus is None or slot.cpu_milli is None
                else cpus + slot.cpu_milli / CPU_MILLI
            )
            h["host_memory_leased"] += slot.leased_memory
            h["host_memory_parked"] += slot.parked_memory
            h["host_memory_spilled"] += spilled.get(worker, 0)
            h["cpus_leased"] += slot.leased_cpu_milli / CPU_MILLI
    return list(hosts.values())


def right_size_hint(lease: Lease) -> str | None:
    """The panel's right-sizing line for ``lease`` (``used 600.0 MiB of 8.0 GiB: ask --memory 1GiB
    next time``), or None when ``common.rightsizing`` finds nothing to say.

        Why the broker words it: the rule (when a reservation counts as over-sized, what to suggest)
        lives in ``rightsizing.py`` for the kernel and ``%gpu status`` too; the panel shows this
        text as sent instead of keeping a copy of the rule. ``--memory`` sizes one GPU's share, so a
        lease over several GPUs (whole GPUs) gets no suggestion.
    """
    if len(lease.allocations) != 1:
        return None
    sizing = right_size(lease.peak_bytes, lease.bytes)
    if sizing is None:
        return None
    return (
        f"used {format_bytes(sizing.peak_bytes)} of {format_bytes(sizing.reserved_bytes)}: "
        f"ask --memory {sizing.suggestion()} next time"
    )


def lease_view(lease: Lease) -> LeaseView:
    """``Lease.public()`` plus what the broker concludes about it for the panel (``right_size``)."""
    view = lease.public()
    view["right_size"] = right_size_hint(lease)
    return view


PRIVATE_FIELDS: tuple[Literal["address", "pid"], ...] = (
    "address",
    "pid",
)  # where a session can be reached: its owner's business only


def lease_on_gpu(lease: Lease, gpu_id: str) -> LeaseView:
    """A lease as everybody sees it in the snapshot: who holds what, never where its session
    answers."""
    view = lease_view(lease)
    for key in PRIVATE_FIELDS:
        view.pop(key, None)
    view["bytes_on_gpu"] = sum(a.bytes for a in lease.allocations if a.gpu == gpu_id)
    return view


def lease_with_gpus(lease: Lease, gpus: Mapping[str, GpuSlot]) -> LeaseView:
    """A granted lease as its kernel (and only its kernel) gets it: with its GPUs' names, whether
    they are virtual, and the secret its session asks of every call."""
    view = lease_view(lease)
    slots = [gpus[a.gpu] for a in lease.allocations if a.gpu in gpus]
    view["gpu_names"] = [g.name for g in slots]
    view["virtual"] = all(g.virtual for g in slots)
    view["secret"] = lease.secret
    return view


def parked(lease: Lease) -> ParkedView:
    """A session whose variables wait in host memory (no file path: that stays with the workers)."""
    offload = lease.offload
    assert offload is not None  # listed only with an offload (snapshot)
    return {
        "id": lease.id,
        "user": lease.user,
        "kernel": lease.kernel,
        "notebook": lease.notebook,
        "cell": lease.cell,
        "state": offload.state,
        "saved": offload.saved,
        "lost": [x.get("name", "?") for x in offload.lost],
        "bytes": offload.bytes if offload.state == "saved" else None,
        "standby": offload.standby if offload.state == "saved" else None,
        "spilled": offload.spilled if offload.state == "saved" else None,
        "move_seconds": offload.seconds,
        "since": lease.ended,
        "reason": lease.end_reason,
    }


def waiting_reason(req: Request, note: str | None) -> str:
    """Why ``req`` waits, with the cluster manager's ``note`` (``waiting for a new worker (job 123
    pending)``) when new workers are on their way, unless it waits for its quota, which new workers
    do not change."""
    reason = req.reason or ""
    if note and req.state == "queued" and "quota" not in reason:
        return f"{reason}; {note}" if reason else note
    return reason


def request_status(
    ledger: Ledger,
    req: Request,
    start_slots: Mapping[str, int] | None = None,
    waiting_note: str | None = None,
) -> RequestStatus:
    if req.state == "queued":
        ledger.view.refresh()  # its reason and estimated start, if they are out of date
    status: RequestStatus = {
        "id": req.id,
        "state": req.state,
        "reason": waiting_reason(req, waiting_note),
        "eta": req.eta,
        "request": req.spec.describe(),
        "secret": req.secret,
    }
    status["eta_basis"] = req.eta_basis
    status["eta_note"] = req.eta_note
    if req.state == "starting":
        status["reason"] = starting_reason(ledger, req, start_slots or {})
    if req.state == "queued":
        order = ledger.ordered_queue()
        status["position"] = order.index(req) + 1 if req in order else None
        status["queue_length"] = len(order)
    if req.state == "granted":
        status["leases"] = [
            lease_with_gpus(ledger.leases[lid], ledger.gpus)
            for lid in req.leases
            if lid in ledger.leases
        ]
        status["restored"] = req.restored
    return status


def starting_reason(ledger: Ledger, req: Request, start_slots: Mapping[str, int]) -> str:
    """Why a granted request's session is not there yet: its worker starts a few session processes
    at a time, and this many were granted before it there."""
    mine = [ledger.leases[lid] for lid in req.leases if lid in ledger.leases]
    waits = []
    for lease in mine:
        slots = start_slots.get(lease.worker, 1)
        ahead = sum(
            1
            for other in ledger.leases.values()
            if other.worker == lease.worker
            and other.state == "starting"
            and (other.started, other.id) < (lease.started, lease.id)
        )
        if ahead >= slots:
            waits.append(
                f"{ahead} session start(s) ahead of it on {host_of(lease.worker)}, {slots} at a "
                "time"
            )
    if waits:
        return "starting the session process, queued: " + "; ".join(waits)
    return "starting the session process"


def quota_view(ledger: Ledger, identity: Literal["tokens", "hub", "names"]) -> QuotasView:
    """Teams' guarantees, limits and GPUs held now, for ``%gpu status`` and the panel."""
    policy = ledger.policy
    if not policy.quotas.configured:
        return {"configured": False, "teams": [], "users": [], "identity": identity}
    teams: list[TeamQuotaView] = [
        {
            "team": t.name,
            "guarantee": t.guarantee,
            "limit": t.limit,
            "priority": t.priority,
            "held": round(policy.held_team.get(t.name, 0.0), 4),
            "members": sorted(t.members),
        }
        for t in policy.quotas.teams.values()
    ]
    quotas = policy.quotas
    parked_bytes = ledger.parking.bytes_by_user()
    names = (
        set(quotas.users)
        | {u for u, held in policy.held_user.items() if held > 0}
        | set(parked_bytes)
    )
    users: list[UserQuotaView] = [
        {
            "user": u,
            "team": quotas.team_of(u),
            "limit": quotas.user_limit(u),
            "priority": quotas.priority(u),
            "held": round(policy.held_user.get(u, 0.0), 4),
            "parked_bytes": parked_bytes.get(u, 0),
        }
        for u in sorted(names)
    ]
    return {
        "configured": True,
        "default_team": quotas.default_team,
        "teams": teams,
        "users": users,
        "identity": identity,
    }


def snapshot(
    ledger: Ledger,
    samples: Mapping[str, Iterable[Sample]],
    pool: PoolInfo,
    runs: Iterable[RunView],
    identity: Literal["tokens", "hub", "names"],
    waiting_note: str | None = None,
) -> Snapshot:
    """The whole pool as the panel, ``%gpu status`` and ``jupyter-gpu status`` show it
    (``waiting_note``: the cluster manager's word on new workers on their way, for the queue's
    reasons)."""
    ledger.view.refresh()  # the queue's reasons and estimated starts, if out of date
    gpus: list[GpuView] = []
    # grouped by machine: the panel draws one group per host when the pool spans several
    for gpu in sorted(ledger.gpus.values(), key=lambda g: gpu_order(g.worker, g.index)):
        kept = list(samples.get(gpu.id, ()))
        last = kept[-1] if kept else {}
        gpus.append(
            {
                "id": gpu.id,
                "worker": gpu.worker,
                "host": host_of(gpu.worker),
                "index": gpu.index,
                "uuid": gpu.uuid,
                "name": gpu.name,
                "total_bytes": gpu.total_bytes,
                "leased_bytes": gpu.leased_bytes,
                "virtual": gpu.virtual,
                "mig": gpu.mig,
                "utilization": last.get("utilization"),
                "memory_used_bytes": last.get("memory_used_bytes"),
                "samples": kept[-SAMPLES_SHOWN:],
                "leases": [
                    lease_on_gpu(ledger.leases[lid], gpu.id)
                    for lid in sorted(gpu.leases)
                    if lid in ledger.leases
                ],
            }
        )
    queue: list[QueueItem] = [
        {
            "id": req.id,
            "user": req.user,
            "kernel": req.kernel,
            "notebook": req.notebook,
            "cell": req.cell,
            "request": req.spec.describe(),
            "priority": req.spec.priority,
            "position": pos,
            "reason": waiting_reason(req, waiting_note),
            "eta": req.eta,
            "eta_basis": req.eta_basis,
            "eta_note": req.eta_note,
            "since": req.submitted,
        }
        for pos, req in enumerate(ledger.ordered_queue(), start=1)
    ]
    return {
        "time": time.time(),
        "pool": {
            **pool,
            "workers": len(ledger.worker_gpus),
            "virtual": any(g.virtual for g in ledger.gpus.values()),
        },
        "gpus": gpus,
        "hosts": hosts_view(gpus, ledger),
        "queue": queue,
        # sessions taken off their GPU whose variables wait in host memory for their owner's next
        # cell
        "in_host_memory": [parked(ls) for ls in ledger.ended.values() if ls.offload is not None],
        "quotas": quota_view(ledger, identity),
        # the latest runs, each rank's stream thinned to its last points: the panel polls this every
        # second
        "runs": [
            cast(
                RunView,
                {
                    **run,
                    "ranks": {
                        r: items[-RUN_POINTS_SHOWN:] for r, items in run.get("ranks", {}).items()
                    },
                },
            )
            for run in list(runs)[-RUNS_SHOWN:]
        ],
    }


def viewer(user: str, verdict: Verdict) -> Viewer:
    """What a snapshot says about the user who asked: whether they may see and cancel everyone's
    work (the panel then lists every session with a Cancel button, ``%gpu status`` every user's)."""
    return {
        "user": user,
        "admin": verdict.error is None and verdict.admin,
        "groups": sorted(verdict.groups),
        "error": verdict.error,
    }


def usage_for(usage: UsageReport, user: str | None, admin: bool) -> UsageView:
    """``usage`` as ``user`` may read it behind JupyterHub: everything for an admin; otherwise
    their own rows beside the teams' totals (the pool-wide view), other users' rows left out."""
    view = cast(UsageView, dict(usage))  # the report, which lacks only the optional key
    if not admin:
        view["users"] = [r for r in usage["users"] if user is not None and r.get("user") == user]
        view["others_hidden"] = True
    return view
