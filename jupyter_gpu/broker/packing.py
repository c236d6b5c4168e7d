"""Where a request fits: GPU memory, host memory and CPU cores on one machine, for every rank.

Two ways to choose among the places a request fits:

- **Best fit**, while no machine reports its host memory and cores (GPUs are all there is): the GPU
  whose free memory is smallest but still enough, which keeps large gaps open for large requests;
  whole GPUs on the worker with the fewest entirely free GPUs that still has enough. With GPUs
  alone this is as good as fragmentation-aware placement (both allocate 96.2 % of the openb
  trace's GPUs).
- **Fragmentation-aware**, once machines report host resources (``fragmentation.py``): the machine
  and GPU where the fragmentation of the pool's free capacity, measured against the workload seen,
  grows least. That is where the two differ: CPU cores and memory strand GPUs, and best fit ignores
  them (docs/benchmarks.md: best fit 91.7 %, FGD 94.9 %, this 95.7 % on FGD's own trace).

``Packer`` keeps the pool's GPUs and machines indexed, so that a placement costs about the logarithm
of the pool's size in best-fit mode, and one cached score per distinct machine state in
fragmentation-aware mode, not a scan of every GPU (10,000 GPUs: 37 ms per scan). The ledger tells it
what changed (``touch``, ``free_index.py``). The module-level ``place``, ``never_fits`` and
``why_waiting`` take plain lists of GPUs (and machines), for callers that hold no ledger.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from jupyter_gpu.broker.fragmentation import (
    Scorer,
    StateKey,
    Workload,
    state_key,
)
from jupyter_gpu.broker.free_index import FreeIndex
from jupyter_gpu.broker.hosts import HostSlot, SessionDefaults, format_cpus, host_need
from jupyter_gpu.broker.model import Allocation, GpuSlot
from jupyter_gpu.broker.scored_choice import ScoredChoice
from jupyter_gpu.broker.waiting import Room
from jupyter_gpu.common.protocol import RequestSpec
from jupyter_gpu.common.units import format_bytes

Placement = list[tuple[str, list[Allocation]]]  # one (worker, allocations) per rank


class Packer(ScoredChoice, FreeIndex):
    """The pool's GPUs and machines, indexed for placement (see the module docstring).

    ``gpus`` and ``hosts`` are the ledger's own dicts; call ``touch(worker)`` after a worker's
    GPUs' ``leased_bytes`` or its host's bookings change, and ``rebuild()`` after workers come or
    go. ``scored`` forces fragmentation-aware mode (else: whenever a machine reports host
    resources); subclasses (the benchmark's baselines) override ``options``."""

    def __init__(
        self,
        gpus: dict[str, GpuSlot],
        hosts: dict[str, HostSlot] | None = None,
        workload: Workload | None = None,
        scored: bool | None = None,
    ):
        self.gpus = gpus
        self.hosts: dict[str, HostSlot] = hosts if hosts is not None else {}
        self.workload = workload or Workload()
        self.scorer = Scorer(self.workload)
        self.force_scored = scored
        self.rebuild()

    @property
    def defaults(self) -> SessionDefaults:
        return self.workload.defaults

    @property
    def scored(self) -> bool:
        if self.force_scored is not None:
            return self.force_scored
        return bool(self._bounded)

    def _key_of(
        self,
        worker: str,
        skip: Collection[str] = (),
        pending: tuple[int, int] = (0, 0),
    ) -> StateKey:
        slots = self._by_worker.get(worker, ())
        host = self.hosts.get(worker)
        key = state_key(
            ((g.free_bytes, g.total_bytes) for g in slots if g.id not in skip),
            host,
            gpu_count=len(slots) or (host.gpu_count if host else 0),
        )
        if pending != (0, 0):
            parts, fm, fc, mem, cpu, n = key
            key = (
                parts,
                None if fm is None else fm - pending[0],
                None if fc is None else fc - pending[1],
                mem,
                cpu,
                n,
            )
        return key

    # ------------------------------------------------------------------ what the pool has
    def largest_gpu(self) -> int:
        return max(self._free) if self._free else 0

    def changed_room(self) -> Room:
        """``room`` over the workers ``changed`` since the last complete pass: what a request that
        the last pass found no place for could get now. Costs the changed workers' GPUs, not the
        pool's."""
        if self.changed is None:
            return self.room()
        frac = bytes_ = whole = memory = cpu = 0.0
        for worker in self.changed:
            slots = self._by_worker.get(worker, ())
            if not slots:
                continue
            free_whole = 0
            for g in slots:
                free = g.free_bytes
                frac, bytes_ = max(frac, free / g.total_bytes), max(bytes_, float(free))
                free_whole += g.leased_bytes == 0
            whole = max(whole, float(free_whole))
            host = self.hosts.get(worker)
            if host is None or host.memory is None or host.cpu_milli is None:
                memory = cpu = math.inf
            else:
                memory = max(memory, float(host.free_memory))
                cpu = max(cpu, float(host.free_cpu_milli))
        return Room((frac, bytes_, whole), memory, cpu)

    def room(self) -> Room:
        """The most one request could get now, per kind of need (``waiting.Room``): a necessary
        condition for fitting, in constant time."""
        frac = bytes_ = 0.0
        for total, entries in self._free.items():
            if entries:
                top = entries[-1][0]
                frac, bytes_ = max(frac, top / total), max(bytes_, top)
        whole = float(self._whole[-1][0]) if self._whole else 0.0
        if self._unbounded:
            memory = cpu = math.inf
        else:
            memory = float(self._host_free[0][-1][0]) if self._host_free[0] else 0.0
            cpu = float(self._host_free[1][-1][0]) if self._host_free[1] else 0.0
        return Room((frac, bytes_, whole), memory, cpu)

    def why_waiting(self, spec: RequestSpec, held: Collection[str] = ()) -> str:
        """``why_waiting`` on the GPUs not ``held`` for others (all of them if none is left)."""
        avail = [self.gpus[g] for g in self.gpus if g not in held] if held else None
        if self.scored or (held and avail):
            return why_waiting(spec, avail or list(self.gpus.values()), self.hosts, self.defaults)
        if not self.gpus:
            return "waiting: no GPU worker has joined the pool yet"
        if spec.gpus is not None:
            return (
                f"waiting: needs {spec.gpus} entirely free GPU(s) on one worker; "
                f"{self._free_whole} free in the pool"
            )
        needs = sorted({spec.need_on(_Size(t)) for t in self._free if self._free[t]})
        need_text = format_bytes(needs[0]) if len(needs) == 1 else f"{format_bytes(needs[0])}+"
        largest_gap = max(e[-1][0] for e in self._free.values() if e)
        if spec.workers > 1:
            fitting = sum(
                len(e) - e.bisect_left((spec.need_on(_Size(t)), "")) for t, e in self._free.items()
            )
            return (
                f"waiting: {spec.workers} ranks need {need_text} each on distinct GPUs; {fitting} "
                "GPU(s) have that free now"
            )
        return f"waiting: no GPU has {need_text} free; largest gap {format_bytes(largest_gap)}"

    # ------------------------------------------------------------------ placing
    def host_need(
        self, spec: RequestSpec, worker: str, allocs: list[Allocation]
    ) -> tuple[int, int]:
        """What one session of ``spec`` with ``allocs`` books on ``worker``'s machine."""
        parts = [(a.bytes, self.gpus[a.gpu].total_bytes) for a in allocs if a.gpu in self.gpus]
        return host_need(spec, parts, self.hosts.get(worker), self.defaults)

    def place(self, spec: RequestSpec, exclude: Collection[str] = ()) -> Placement | None:
        """A placement for every rank of ``spec`` on what is free now, never on a GPU in
        ``exclude`` (held for another request), or None. Ranks of one gang land on distinct GPUs
        (NCCL refuses two ranks on one device)."""
        used: set[str] = set()
        pending: dict[str, tuple[int, int]] = {}
        placement: Placement = []
        for _rank in range(spec.workers):
            skip = used.union(exclude) if exclude else used
            if self.scored:
                alloc = self._place_scored(spec, skip, pending)
            elif spec.gpus is not None:
                alloc = self._place_whole(spec, skip)
            else:
                alloc = self._place_fraction(spec, skip)
            if alloc is None:
                return None
            worker, allocations = alloc
            used.update(a.gpu for a in allocations)
            mem, milli = self.host_need(spec, worker, allocations)
            held = pending.get(worker, (0, 0))
            pending[worker] = (held[0] + mem, held[1] + milli)
            placement.append(alloc)
        return placement

    def _place_fraction(
        self, spec: RequestSpec, skip: Collection[str]
    ) -> tuple[str, list[Allocation]] | None:
        """Best fit: the GPU left with the least free memory, ties by GPU id."""
        best: tuple[int, str, int] | None = None
        for total, entries in self._free.items():
            need = spec.need_on(_Size(total))
            for free, gpu_id in entries.islice(entries.bisect_left((need, ""))):
                if gpu_id in skip:
                    continue
                if best is None or (free - need, gpu_id) < best[:2]:
                    best = (free - need, gpu_id, need)
                break
        if best is None:
            return None
        gpu = self.gpus[best[1]]
        return gpu.worker, [Allocation(gpu=gpu.id, index=gpu.index, bytes=best[2])]

    def _place_whole(
        self, spec: RequestSpec, skip: Collection[str]
    ) -> tuple[str, list[Allocation]] | None:
        """Best fit: the worker with the fewest entirely free GPUs that still has enough."""
        count = int(spec.gpus or 1)
        touched = {self.gpus[g].worker for g in skip if g in self.gpus}
        best: tuple[int, str] | None = None
        for entry in self._whole.islice(self._whole.bisect_left((count, ""))):
            if entry[1] not in touched:
                best = entry
                break
        for worker in touched:
            free = [g for g in self._by_worker[worker] if g.leased_bytes == 0 and g.id not in skip]
            if len(free) >= count and (best is None or (len(free), worker) < best):
                best = (len(free), worker)
        if best is None:
            return None
        chosen = [g for g in self._by_worker[best[1]] if g.leased_bytes == 0 and g.id not in skip][
            :count
        ]
        return best[1], [Allocation(gpu=g.id, index=g.index, bytes=g.total_bytes) for g in chosen]

    def _place_scored(
        self, spec: RequestSpec, skip: Collection[str], pending: Mapping[str, tuple[int, int]]
    ) -> tuple[str, list[Allocation]] | None:
        """Fragmentation-aware: the machine and GPU where the score grows least (see the module
        docstring); machines touched by this placement's earlier ranks or by ``skip`` are scored
        as they are without those GPUs."""
        touched = {self.gpus[g].worker for g in skip if g in self.gpus} | set(pending)
        capable = self._capable_now() if self.protecting() else None
        best: tuple[tuple[Any, ...], str, StateKey, int] | None = None

        def consider(key: StateKey, worker: str) -> None:
            nonlocal best
            found = self._best_option(key, spec, capable)
            if found is not None:
                rank = found[0] + self.order_key(worker)
                if best is None or rank < best[0]:
                    best = (rank, worker, key, found[1])

        for key, members in self.states().items():
            for entry in members:
                if entry[-1] not in touched:
                    consider(key, entry[-1])
                    break
        for worker in touched:
            if worker in self._by_worker:
                consider(self._key_of(worker, skip, pending.get(worker, (0, 0))), worker)
        if best is None:
            return None
        _, worker, key, j = best
        return worker, self._allocations(spec, worker, key, j, skip)

    def _allocations(
        self, spec: RequestSpec, worker: str, key: StateKey, j: int, skip: Collection[str]
    ) -> list[Allocation]:
        free = [g for g in self._by_worker[worker] if g.id not in skip]
        if spec.gpus is not None:
            whole = [g for g in free if g.leased_bytes == 0][: int(spec.gpus)]
            return [Allocation(gpu=g.id, index=g.index, bytes=g.total_bytes) for g in whole]
        want = key[0][j]
        gpu = next(g for g in free if (g.free_bytes, g.total_bytes) == want)
        return [Allocation(gpu=gpu.id, index=gpu.index, bytes=spec.need_on(gpu))]


class _Size:
    """Anything with ``total_bytes``, for ``RequestSpec.need_on``."""

    def __init__(self, total_bytes: int):
        self.total_bytes = total_bytes


# ---------------------------------------------------------------------- without a ledger
def place(
    spec: RequestSpec,
    gpus: Iterable[GpuSlot],
    hosts: Mapping[str, HostSlot] | None = None,
    defaults: SessionDefaults | None = None,
) -> Placement | None:
    """``Packer.place`` on a plain list of GPUs (and their machines)."""
    packer = Packer(
        {g.id: g for g in gpus}, dict(hosts or {}), Workload(defaults or SessionDefaults())
    )
    return packer.place(spec)


class NeverFitsMemo:
    """``never_fits``, remembered per request shape until the pool's workers, machines or lost
    GPUs change (``clear``). Why: the check reads every GPU (7 ms at 10,000 GPUs), and a flood
    of 10,000 requests of a few shapes would otherwise cost the broker a minute (issue 24)."""

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], str | None] = {}

    def clear(self) -> None:
        self._memo.clear()

    def check(
        self,
        spec: RequestSpec,
        gpus: Callable[[], list[GpuSlot]],
        hosts: Mapping[str, HostSlot],
        defaults: SessionDefaults,
        headroom: list[GpuSlot] | None,
    ) -> str | None:
        """``never_fits(spec, gpus(), hosts, defaults)``, from memory when the same shape (with the
        same ``headroom`` GPUs) was checked since the last ``clear``."""
        shape = (spec.fraction, spec.memory, spec.gpus, spec.workers, spec.host_memory, spec.cpus)
        key = shape + tuple(g.uuid for g in headroom or ())
        if key not in self._memo:
            if len(self._memo) > 10_000:
                self._memo.clear()
            self._memo[key] = never_fits(spec, gpus(), hosts, defaults)
        return self._memo[key]


def never_fits(
    spec: RequestSpec,
    gpus: Iterable[GpuSlot],
    hosts: Mapping[str, HostSlot] | None = None,
    defaults: SessionDefaults | None = None,
) -> str | None:
    """Why ``spec`` could not be granted even on an empty pool of these GPUs and machines, or None
    if it could."""
    gpus = list(gpus)
    if not gpus:
        return None  # no GPU has joined yet: wait, with that reason shown
    largest = max(g.total_bytes for g in gpus)
    if spec.memory is not None and spec.memory > largest:
        return (
            f"it asks for {format_bytes(spec.memory)} on one GPU but the largest GPU in the pool "
            f"has {format_bytes(largest)}. Ask for less (--memory "
            f"{format_bytes(largest).replace(' ', '')} or --gpus 1), or add a larger GPU to the "
            "pool."
        )
    per_worker: dict[str, int] = collections.defaultdict(int)
    for g in gpus:
        per_worker[g.worker] += 1
    if spec.gpus is not None:
        most = max(per_worker.values())
        if spec.gpus > most:
            return (
                f"it asks for {spec.gpus} GPUs in one session but no worker has more than {most}. "
                f"Use --workers {spec.gpus} for distributed training across workers, or ask for "
                f"--gpus {most}."
            )
    if spec.workers > len(gpus):
        return (
            f"it asks for {spec.workers} ranks on distinct GPUs but the pool has {len(gpus)} "
            f"GPU(s). Use --workers {len(gpus)} or fewer, or scale the pool out first (%gpu scale)."
        )
    if spec.memory is not None and spec.workers > 1:
        fitting = sum(1 for g in gpus if g.total_bytes >= spec.memory)
        if fitting < spec.workers:
            return (
                f"only {fitting} GPU(s) in the pool have {format_bytes(spec.memory)}, fewer than "
                f"the {spec.workers} ranks asked for."
            )
    by_worker: dict[str, list[GpuSlot]] = collections.defaultdict(list)
    for g in gpus:
        by_worker[g.worker].append(g)
    return _never_fits_host(spec, by_worker, hosts or {}, defaults or SessionDefaults())


def _never_fits_host(
    spec: RequestSpec,
    by_worker: Mapping[str, list[GpuSlot]],
    hosts: Mapping[str, HostSlot],
    defaults: SessionDefaults,
) -> str | None:
    """Why no machine, empty, has the host memory or cores ``spec`` asks for beside the GPUs it
    needs (None: enough do). Only machines with the GPUs count: a machine with the memory but
    too few GPUs, or the GPUs but too little memory, runs nothing of it. A ``--workers`` run needs
    room for all its ranks, several on one machine adding up."""
    ranks = 0
    short_mem = short_cpu = False
    most_mem = most_cpu = 0
    for worker, slots in by_worker.items():
        host = hosts.get(worker) or HostSlot(worker=worker, gpu_count=len(slots))
        if spec.gpus is not None:
            if len(slots) < spec.gpus:
                continue
            able = 1
            parts = [(g.total_bytes, g.total_bytes) for g in slots[: int(spec.gpus)]]
        else:
            fit = [g for g in slots if spec.need_on(g) <= g.total_bytes]
            if not fit:
                continue
            able = len(fit)
            parts = [(spec.need_on(fit[0]), fit[0].total_bytes)]
        memory, milli = host_need(spec, parts, host, defaults)
        if host.memory is not None:
            most_mem = max(most_mem, host.memory)
            short_mem |= memory > host.memory
            able = min(able, host.memory // memory if memory else able)
        if host.cpu_milli is not None:
            most_cpu = max(most_cpu, host.cpu_milli)
            short_cpu |= milli > host.cpu_milli
            able = min(able, host.cpu_milli // milli if milli else able)
        ranks += able
        if ranks >= spec.workers:
            return None
    where = "no machine in the pool with the GPUs it needs"
    if short_mem and spec.host_memory is not None and spec.workers == 1:
        return (
            f"it asks for {format_bytes(spec.host_memory)} of host memory but {where} leaves "
            f"more than {format_bytes(most_mem)} to sessions. Ask for less (--host-memory "
            f"{format_bytes(most_mem).replace(' ', '')}), or ask the pool's admin for a machine "
            "with more memory."
        )
    if short_cpu and spec.cpus is not None and spec.workers == 1:
        return (
            f"it asks for {spec.cpus:g} CPU cores but {where} leaves more than "
            f"{format_cpus(most_cpu)} to sessions. Ask for fewer (--cpus {most_cpu / 1000:g}), or "
            "ask the pool's admin for a machine with more cores."
        )
    return (
        f"it asks for {spec.workers} ranks with {spec.describe()} each, but the machines with the "
        f"GPUs it needs have host memory and cores for only {ranks} of them. Ask for fewer "
        "ranks, less host memory (--host-memory) or fewer cores (--cpus)."
    )


def why_waiting(
    spec: RequestSpec,
    gpus: Iterable[GpuSlot],
    hosts: Mapping[str, HostSlot] | None = None,
    defaults: SessionDefaults | None = None,
) -> str:
    """The reason a request that can fit some day does not fit now, for the queue display: what is
    short (GPU memory, whole GPUs, host memory or cores) and the most there is."""
    gpus = list(gpus)
    if not gpus:
        return "waiting: no GPU worker has joined the pool yet"
    hosts = hosts or {}
    defaults = defaults or SessionDefaults()
    if any(h.bounded for h in hosts.values()):
        short = _host_shortage(spec, gpus, hosts, defaults)
        if short is not None:
            return short
    if spec.gpus is not None:
        free_whole = sum(1 for g in gpus if g.leased_bytes == 0)
        return (
            f"waiting: needs {spec.gpus} entirely free GPU(s) on one worker; {free_whole} free in "
            "the pool"
        )
    needs = sorted({spec.need_on(g) for g in gpus})
    need_text = format_bytes(needs[0]) if len(needs) == 1 else f"{format_bytes(needs[0])}+"
    largest_gap = max(g.free_bytes for g in gpus)
    if spec.workers > 1:
        fitting = sum(1 for g in gpus if spec.need_on(g) <= g.free_bytes)
        return (
            f"waiting: {spec.workers} ranks need {need_text} each on distinct GPUs; {fitting} "
            "GPU(s) have that free now"
        )
    return f"waiting: no GPU has {need_text} free; largest gap {format_bytes(largest_gap)}"


def _host_shortage(
    spec: RequestSpec,
    gpus: list[GpuSlot],
    hosts: Mapping[str, HostSlot],
    defaults: SessionDefaults,
) -> str | None:
    """When GPUs with room exist but their machines lack host memory or cores: which, and the
    most free on such a machine."""
    by_worker: dict[str, list[GpuSlot]] = collections.defaultdict(list)
    for g in gpus:
        by_worker[g.worker].append(g)
    mem_short = cpu_short = False
    need_mem = need_cpu = 0
    most_mem = most_cpu = 0.0
    for worker, slots in by_worker.items():
        host = hosts.get(worker) or HostSlot(worker=worker)
        if spec.gpus is not None:
            free = [g for g in slots if g.leased_bytes == 0]
            if len(free) < spec.gpus:
                continue
            parts = [(g.total_bytes, g.total_bytes) for g in free[: int(spec.gpus)]]
        else:
            fit = [g for g in slots if spec.need_on(g) <= g.free_bytes]
            if not fit:
                continue
            parts = [(spec.need_on(fit[0]), fit[0].total_bytes)]
        m, c = host_need(spec, parts, host, defaults)
        if host.fits(m, c):
            return None  # this one fits: GPUs are what is short (or ranks, elsewhere)
        mem_short |= m > host.free_memory
        cpu_short |= c > host.free_cpu_milli
        need_mem, need_cpu = max(need_mem, m), max(need_cpu, c)
        most_mem = max(most_mem, host.free_memory)
        most_cpu = max(most_cpu, host.free_cpu_milli)
    if not (mem_short or cpu_short):
        return None
    what = []
    if mem_short:
        what.append(
            f"no machine with GPU room has {format_bytes(need_mem)} of host memory free for "
            f"sessions; largest {format_bytes(most_mem)}"
        )
    if cpu_short:
        what.append(
            f"no machine with GPU room has {format_cpus(need_cpu)} free for sessions; most "
            f"{format_cpus(most_cpu)}"
        )
    return "waiting: " + "; ".join(what)
