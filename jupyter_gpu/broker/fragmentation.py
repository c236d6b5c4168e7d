"""How much of a machine's free GPU capacity the pool's future requests could not use: the score
that fragmentation-aware placement (``packing.Packer``) keeps low.

It follows FGD (Weng et al., "Beware of Fragmentation: Scheduling GPU-Sharing Workloads with
Fragmentation Gradient Descent", USENIX ATC 2023, and its artifact
hkust-adsl/kubernetes-scheduler-simulator): a machine's fragmentation is measured against the
pool's workload, the request shapes seen so far (``Workload``): for each shape, the free GPU
capacity that a request of that shape could not use on the machine (all of it when the machine
cannot host the shape at all, else the GPUs individually too small for it), weighted by how common
the shape is. A request goes where that increases least. What differs from FGD, each measured on
FGD's own trace (``bench/openb.py``, docs/benchmarks.md):

- host memory limits a shape like cores do (FGD tests cores only, and its simulator refuses a task
  that lacks memory after choosing by cores alone);
- stranding: free GPUs that the machine's free cores cannot feed at the workload's cores per GPU
  count as lost too (FGD sees that only once a common request no longer fits);
- every shape seen counts, a whole-GPU shape weighted 1 + its GPUs (FGD's artifact keeps the most
  common 95 % of shapes, unweighted), so the rare large requests are not forgotten;
- the last machines able to host a shape keep it (``LAST_CAPABLE``): a placement that would take
  that ability from one of them costs more than any amount of fragmentation.

Scores are compared in steps of ``STEP`` GPUs: equal ones go to the machine with the fewest cores
(the large machines stay free for large requests), then to the first machine in the pool's order,
which consolidates load the way FGD's scheduler does when its scores tie.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from jupyter_gpu.broker.hosts import CPU_MILLI, HostSlot, SessionDefaults, host_need
from jupyter_gpu.common.protocol import RequestSpec

STEP = 0.025  # GPUs: fragmentation changes smaller than this are ties
LAST_CAPABLE = 3  # the last this many machines able to host a shape keep that ability
HALF_LIFE = 10_000  # requests: the workload forgets a shape seen this many requests ago by half
MAX_SHAPES = 256  # the most shapes a score weighs (the heaviest ones)

# (fraction, memory, whole GPUs, host memory, cpus): what one session of a request needs
ShapeKey = tuple[float | None, int | None, int | None, int | None, float | None]
# a machine as placement sees it: (free bytes, total bytes) per usable GPU, sorted; free host
# memory and thousandths of a core (None: unbounded); what it leaves to sessions in all; its GPUs
StateKey = tuple[tuple[tuple[int, int], ...], int | None, int | None, int | None, int | None, int]


def shape_of(spec: RequestSpec) -> ShapeKey:
    return (spec.fraction, spec.memory, spec.gpus, spec.host_memory, spec.cpus)


def state_key(
    gpus: Iterable[tuple[int, int]], host: HostSlot | None, gpu_count: int | None = None
) -> StateKey:
    """The ``StateKey`` of a machine with these (free, total) GPUs and this host."""
    parts = tuple(sorted(gpus))
    if host is None:
        return parts, None, None, None, None, gpu_count or len(parts)
    return (
        parts,
        None if host.memory is None else host.memory - host.leased_memory,
        None if host.cpu_milli is None else host.cpu_milli - host.leased_cpu_milli,
        host.memory,
        host.cpu_milli,
        gpu_count if gpu_count is not None else host.gpu_count,
    )


def host_of(key: StateKey) -> HostSlot:
    """A stand-in ``HostSlot`` with the key's free host resources, for ``host_need``."""
    _, free_mem, free_cpu, mem, cpu, count = key
    return HostSlot(
        worker="",
        memory=mem,
        cpu_milli=cpu,
        gpu_count=count,
        leased_memory=0 if mem is None or free_mem is None else mem - free_mem,
        leased_cpu_milli=0 if cpu is None or free_cpu is None else cpu - free_cpu,
    )


def per_gpu_need(shape: ShapeKey, total: int) -> int:
    """Bytes one GPU of ``total`` bytes must have free for the shape (whole GPUs: all of it)."""
    fraction, memory, whole, _, _ = shape
    if whole is not None:
        return total
    if memory is not None:
        return memory
    return int(math.ceil(float(fraction or 0.0) * total))


@dataclass(frozen=True)
class Weighted:
    shape: ShapeKey
    spec: RequestSpec
    weight: float  # share of the workload (the weights sum to 1)
    gpus: float  # GPUs one session of it holds (a fraction of one for a memory shape: 1)
    cpu_milli: int | None  # what it asks for explicitly (None: the default)
    count: int  # GPUs it needs on one machine (whole GPUs), else 1
    explicit: bool  # asks for both host memory and cores (no default to work out per machine)


class Workload:
    """The request shapes seen, weighted by how recently: what fragmentation is measured against.

    Learned from the requests themselves (``observe`` at each submission), with a half-life of
    ``HALF_LIFE`` requests, so the score follows the pool's workload as it changes. Its summary
    (``shapes``) is recomputed when the weights have grown by a tenth, so that scores can be cached
    between recomputations (``version`` says when)."""

    def __init__(self, defaults: SessionDefaults | None = None, half_life: float = HALF_LIFE):
        self.defaults = defaults or SessionDefaults()
        self._growth = 2.0 ** (1.0 / half_life)
        self._scale = 1.0
        self._counts: dict[ShapeKey, float] = {}
        self._total = 0.0
        self._next = 1.0
        self.version = 0
        self.shapes: list[Weighted] = []
        self.cpu_per_gpu: float | None = None  # thousandths of a core per GPU, explicit asks

    def observe(self, spec: RequestSpec, times: int = 1) -> None:
        key = shape_of(spec)
        weight = (1.0 + (spec.gpus or 0)) * self._scale * max(1, spec.workers) * times
        self._counts[key] = self._counts.get(key, 0.0) + weight
        self._total += weight
        self._scale *= self._growth**times
        if self._scale > 1e200:  # keep the numbers finite: the weights are relative
            self._counts = {k: v / self._scale for k, v in self._counts.items()}
            self._total /= self._scale
            self._next /= self._scale
            self._scale = 1.0
        if self._total >= self._next:
            self._summarise()
            self._next = self._total * 1.1 + 32 * self._scale

    def _summarise(self) -> None:
        heaviest = sorted(self._counts.items(), key=lambda kv: (-kv[1], repr(kv[0])))[:MAX_SHAPES]
        total = sum(w for _, w in heaviest) or 1.0
        shapes = []
        cpu = gpu = 0.0
        for key, w in heaviest:
            fraction, memory, whole, host_memory, cpus = key
            spec = RequestSpec(
                fraction=fraction, memory=memory, gpus=whole, host_memory=host_memory, cpus=cpus
            )
            held = (
                float(whole) if whole is not None else (fraction if fraction is not None else 1.0)
            )
            milli = None if cpus is None else int(math.ceil(cpus * CPU_MILLI - 1e-9))
            explicit = host_memory is not None and milli is not None
            shapes.append(Weighted(key, spec, w / total, held, milli, whole or 1, explicit))
            if milli is not None:
                cpu += w * milli
                gpu += w * held
        self.shapes = shapes
        self.cpu_per_gpu = cpu / gpu if gpu > 0 else None
        self.version += 1


class Scorer:
    """Fragmentation, stranding and which shapes a machine can host, per ``StateKey`` (cached for
    the current summary of the workload)."""

    def __init__(self, workload: Workload):
        self.workload = workload
        self._version = -1
        self._frag: dict[StateKey, float] = {}
        self._hostable: dict[StateKey, frozenset[int]] = {}

    def _fresh(self) -> None:
        if self._version != self.workload.version:
            self._frag.clear()
            self._hostable.clear()
            self._version = self.workload.version

    def hostable(self, key: StateKey) -> frozenset[int]:
        """The indices (in ``workload.shapes``) of the shapes the machine can host now: enough
        GPUs with room (entirely free ones for whole GPUs), host memory and cores."""
        self._fresh()
        found = self._hostable.get(key)
        if found is not None:
            return found
        parts, free_mem, free_cpu = key[0], key[1], key[2]
        able: list[int] = []
        if parts:
            total = max(t for _, t in parts)
            whole_free = sum(1 for f, t in parts if f == t)
            frees = sorted(f for f, _ in parts)
            bounded = free_mem is not None or free_cpu is not None
            host = host_of(key) if bounded else None
            defaults = self.workload.defaults
            for i, shape in enumerate(self.workload.shapes):
                if shape.shape[2] is not None:
                    if whole_free < shape.count:
                        continue
                    need = total
                else:
                    need = per_gpu_need(shape.shape, total)
                    if frees[-1] < need:
                        continue
                if bounded:
                    if shape.explicit:
                        mem, milli = shape.spec.host_memory or 0, shape.cpu_milli or 0
                    else:
                        mem, milli = host_need(
                            shape.spec, [(need, total)] * shape.count, host, defaults
                        )
                    if (free_mem is not None and mem > free_mem) or (
                        free_cpu is not None and milli > free_cpu
                    ):
                        continue
                able.append(i)
        found = self._hostable[key] = frozenset(able)
        return found

    def score(self, key: StateKey) -> float:
        """Fragmentation plus stranding of a machine, in GPUs (lower is better)."""
        self._fresh()
        value = self._frag.get(key)
        if value is None:
            value = self._fragmentation(key) + self._stranded(key)
            self._frag[key] = value
        return value

    def _fragmentation(self, key: StateKey) -> float:
        parts = key[0]
        free = [(f / t, f, t) for f, t in parts if t > 0 and f > 0]
        total_free = sum(x for x, _, _ in free)
        if total_free <= 0:
            return 0.0
        able = self.hostable(key)
        partial = sum(x for x, f, t in free if f < t)  # lost to whole-GPU shapes
        value = 0.0
        for i, shape in enumerate(self.workload.shapes):
            if i not in able:
                value += shape.weight * total_free
            elif shape.shape[2] is not None:
                value += shape.weight * partial
            else:  # a share of one GPU: the GPUs too small for it are lost to it
                lost = 0.0
                for x, f, t in free:
                    if f < per_gpu_need(shape.shape, t):
                        lost += x
                value += shape.weight * lost
        return value

    def _stranded(self, key: StateKey) -> float:
        per_gpu = self.workload.cpu_per_gpu
        free_cpu = key[2]
        if not per_gpu or free_cpu is None:
            return 0.0
        gpus = sum(f / t for f, t in key[0] if t > 0)
        return max(0.0, gpus - free_cpu / per_gpu)
