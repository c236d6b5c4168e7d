"""Where a request fits: best-fit packing of GPU fractions, whole GPUs and gangs.

Best fit (the GPU whose free memory is smallest but still enough) keeps large gaps open for large
requests, which is what lets many fractional notebooks share few GPUs without blocking a whole-GPU
job.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from jupyter_gpu.broker.model import Allocation, GpuSlot
from jupyter_gpu.common.protocol import RequestSpec
from jupyter_gpu.common.units import format_bytes

Placement = list[tuple[str, list[Allocation]]]  # one (worker, allocations) per rank


def _fits(spec: RequestSpec, gpu: GpuSlot, taken: dict[str, int]) -> int | None:
    need = spec.need_on(gpu)
    if spec.gpus is not None and (gpu.leased_bytes + taken.get(gpu.id, 0)) > 0:
        return None  # whole GPUs must be entirely free
    free = gpu.free_bytes - taken.get(gpu.id, 0)
    return need if need <= free else None


def place(spec: RequestSpec, gpus: Iterable[GpuSlot]) -> Placement | None:
    """A placement for every rank of ``spec`` on the current free memory, or None if it does not fit
    now.

        Ranks of one gang always land on distinct GPUs (NCCL refuses two ranks on one device).
    """
    gpus = list(gpus)
    taken: dict[str, int] = {}
    used: set[str] = set()
    placement: Placement = []
    for _rank in range(spec.workers):
        if spec.gpus is not None:
            alloc = _place_whole(spec, gpus, taken, used)
        else:
            alloc = _place_fraction(spec, gpus, taken, used)
        if alloc is None:
            return None
        worker, allocations = alloc
        for a in allocations:
            taken[a.gpu] = taken.get(a.gpu, 0) + a.bytes
            used.add(a.gpu)
        placement.append((worker, allocations))
    return placement


def _place_fraction(
    spec: RequestSpec, gpus: list[GpuSlot], taken: dict[str, int], used: set[str]
) -> tuple[str, list[Allocation]] | None:
    best: tuple[int, str, GpuSlot, int] | None = None
    for gpu in gpus:
        if gpu.id in used:
            continue
        need = _fits(spec, gpu, taken)
        if need is None:
            continue
        left = gpu.free_bytes - taken.get(gpu.id, 0) - need
        key = (left, gpu.id)
        if best is None or key < best[:2]:
            best = (left, gpu.id, gpu, need)
    if best is None:
        return None
    gpu, need = best[2], best[3]
    return gpu.worker, [Allocation(gpu=gpu.id, index=gpu.index, bytes=need)]


def _place_whole(
    spec: RequestSpec, gpus: list[GpuSlot], taken: dict[str, int], used: set[str]
) -> tuple[str, list[Allocation]] | None:
    by_worker: dict[str, list[GpuSlot]] = defaultdict(list)
    for gpu in gpus:
        if gpu.id not in used and _fits(spec, gpu, taken) is not None:
            by_worker[gpu.worker].append(gpu)
    count = int(spec.gpus or 1)
    candidates = [(len(free), w) for w, free in by_worker.items() if len(free) >= count]
    if not candidates:
        return None
    # the worker with the fewest free GPUs that still has enough: best fit
    _, worker = min(candidates)
    chosen = sorted(by_worker[worker], key=lambda g: g.index)[:count]
    return worker, [Allocation(gpu=g.id, index=g.index, bytes=g.total_bytes) for g in chosen]


def never_fits(spec: RequestSpec, gpus: Iterable[GpuSlot]) -> str | None:
    """Why ``spec`` could not be granted even on an empty pool of these GPUs, or None if it
    could."""
    gpus = list(gpus)
    if not gpus:
        return None  # no GPU has joined yet: wait, with that reason shown
    largest = max(g.total_bytes for g in gpus)
    if spec.memory is not None and spec.memory > largest:
        return (
            f"it asks for {format_bytes(spec.memory)} on one GPU but the largest GPU in the pool "
            "has "
            f"{format_bytes(largest)}. Ask for less (--memory "
            f"{format_bytes(largest).replace(' ', '')} or "
            "--gpus 1), or add a larger GPU to the pool."
        )
    if spec.gpus is not None:
        per_worker: dict[str, int] = defaultdict(int)
        for g in gpus:
            per_worker[g.worker] += 1
        most = max(per_worker.values())
        if spec.gpus > most:
            return (
                f"it asks for {spec.gpus} GPUs in one session but no worker has more than {most}. "
                "Use "
                f"--workers {spec.gpus} for distributed training across workers, or ask for --gpus "
                f"{most}."
            )
    if spec.workers > len(gpus):
        return (
            f"it asks for {spec.workers} ranks on distinct GPUs but the pool has {len(gpus)} "
            "GPU(s). "
            f"Use --workers {len(gpus)} or fewer, or scale the pool out first (%gpu scale)."
        )
    if spec.memory is not None and spec.workers > 1:
        fitting = sum(1 for g in gpus if g.total_bytes >= spec.memory)
        if fitting < spec.workers:
            return (
                f"only {fitting} GPU(s) in the pool have {format_bytes(spec.memory)}, fewer than "
                "the "
                f"{spec.workers} ranks asked for."
            )
    return None


def why_waiting(spec: RequestSpec, gpus: Iterable[GpuSlot]) -> str:
    """The reason a request that can fit some day does not fit now, for the queue display."""
    gpus = list(gpus)
    if not gpus:
        return "waiting: no GPU worker has joined the pool yet"
    if spec.gpus is not None:
        free_whole = sum(1 for g in gpus if g.leased_bytes == 0)
        return f"waiting: needs {spec.gpus} entirely free GPU(s) on one worker; {free_whole} free in the pool"
    needs = sorted({spec.need_on(g) for g in gpus})
    need_text = format_bytes(needs[0]) if len(needs) == 1 else f"{format_bytes(needs[0])}+"
    largest_gap = max(g.free_bytes for g in gpus)
    if spec.workers > 1:
        fitting = sum(1 for g in gpus if spec.need_on(g) <= g.free_bytes)
        return (
            f"waiting: {spec.workers} ranks need {need_text} each on distinct GPUs; {fitting} "
            "GPU(s) have "
            "that free now"
        )
    return f"waiting: no GPU has {need_text} free; largest gap {format_bytes(largest_gap)}"
