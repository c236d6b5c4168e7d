"""The fragmentation-aware choice among the machines and GPUs where a request fits: ``Packer``'s
scored mode (packing.py), kept apart so that each class stays one job.

Each machine's state (``fragmentation.StateKey``) is scored once per distinct state and shape
(``options``, memoised), so a choice costs one score per distinct machine state, not one per GPU.
A machine that is one of the last ``LAST_CAPABLE`` able to host a shape of the workload keeps that
shape if another machine can take the request instead (``_protect``): best fit and FGD give away
the last machines with enough free cores or memory for a large shape, and that shape's GPUs are
then stranded.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable
from typing import Any

from sortedcontainers import SortedList

from jupyter_gpu.broker.fragmentation import (
    LAST_CAPABLE,
    STEP,
    Scorer,
    StateKey,
    Workload,
    host_of,
    per_gpu_need,
    shape_of,
)
from jupyter_gpu.broker.hosts import HostSlot, SessionDefaults, host_need
from jupyter_gpu.common.protocol import RequestSpec

# how a machine's option compares (lower first) and the chosen position in its StateKey's GPUs
Option = tuple[tuple[Any, ...], int, frozenset[int]]


class ScoredChoice:
    """The scoring half of ``packing.Packer``: it reads the packer's index of machines by state
    (``_groups``: state -> its machines' ``order_key``s) and keeps how many machines can host each
    shape of the workload."""

    protects = True  # the last machines able to host a shape keep it (see the module docstring)
    # ... in a pool of more machines than this only: in a small pool every machine is one of "the
    # last" able to host each shape, so keeping that ability would forbid filling any machine and
    # spread halves over GPUs that best fit and FGD would pack (two 0.5 sessions on two GPUs)
    PROTECT_FROM_MACHINES = 4 * LAST_CAPABLE
    workload: Workload
    scorer: Scorer
    hosts: dict[str, HostSlot]
    _groups: dict[StateKey, SortedList]
    states: Callable[[], dict[StateKey, SortedList]]  # (free_index.FreeIndex)
    _capable: collections.Counter[int]
    _capable_version: int

    def protecting(self) -> bool:
        """Whether the last machines able to host a shape keep it (``PROTECT_FROM_MACHINES``)."""
        return self.protects and len(self.hosts) > self.PROTECT_FROM_MACHINES

    def order_key(self, worker: str) -> tuple[Any, ...]:
        """Ties go to the machine with the fewest cores, then in worker order (the worker's name
        comes last: the index stores these)."""
        host = self.hosts.get(worker)
        cores = host.cpu_milli if host is not None and host.cpu_milli is not None else math.inf
        return (cores, worker)

    def _count(self, key: StateKey, delta: int) -> None:
        if self._capable_version == self.workload.version:
            for i in self.scorer.hostable(key):
                self._capable[i] += delta

    def _capable_now(self) -> collections.Counter[int]:
        """How many machines can host each shape of the workload (recounted when it changes)."""
        if self._capable_version != self.workload.version:
            self._capable = collections.Counter()
            for key, members in self.states().items():
                for i in self.scorer.hostable(key):
                    self._capable[i] += len(members)
            self._capable_version = self.workload.version
        return self._capable

    def _best_option(
        self, key: StateKey, spec: RequestSpec, capable: collections.Counter[int] | None
    ) -> tuple[tuple[Any, ...], int] | None:
        options = self._options_cached(key, spec)
        best: tuple[tuple[Any, ...], int] | None = None
        for score, j, lost in options:
            rank = (self._protect(lost, capable),) + score
            if best is None or rank < best[0]:
                best = (rank, j)
        return best

    def _protect(self, lost: frozenset[int], capable: collections.Counter[int] | None) -> float:
        """What taking ``lost`` shapes from a machine costs: nothing, unless it is one of the last
        ``LAST_CAPABLE`` machines able to host one of them (then that shape's GPUs, shared among
        the machines left)."""
        if capable is None or not lost:
            return 0.0
        shapes = self.workload.shapes
        return round(
            sum(
                shapes[i].weight * shapes[i].gpus / capable[i]
                for i in lost
                if 0 < capable[i] <= LAST_CAPABLE
            ),
            9,
        )

    def _options_cached(self, key: StateKey, spec: RequestSpec) -> list[Option]:
        if getattr(self, "_memo_version", None) != self.workload.version:
            self._memo: dict[tuple[StateKey, Any], list[Option]] = {}
            self._memo_version = self.workload.version
        memo_key = (key, shape_of(spec))
        found = self._memo.get(memo_key)
        if found is None:
            found = self.options(key, spec)
            if len(self._memo) > 200_000:
                self._memo.clear()
            self._memo[memo_key] = found
        return found

    def options(self, key: StateKey, spec: RequestSpec) -> list[Option]:
        """Each way one session of ``spec`` fits on a machine in state ``key``: (its score: the
        fragmentation added in ``STEP``s then the GPU left over, its GPU position in the key, the
        shapes the machine could host before and not after)."""
        out: list[Option] = []
        before = self.scorer.score(key)
        able = self.scorer.hostable(key)
        for j, after in after_states(key, spec, self.workload.defaults):
            added = self.scorer.score(after) - before
            left = key[0][j][0] - per_gpu_need(shape_of(spec), key[0][j][1]) if j >= 0 else 0
            lost = able - self.scorer.hostable(after)
            out.append(((round(added / STEP), left), j, lost))
        return out

    def choose_host(self, memory: int, milli: int) -> str | None:
        """The machine where host memory and cores alone (no GPU) fit with the least added
        fragmentation: for work that is not a session (the benchmark's CPU-only tasks)."""
        capable = self._capable_now() if self.protecting() else None
        best: tuple[tuple[Any, ...], str] | None = None
        for key, members in self.states().items():
            _, fm, fc, mem, cpu, n = key
            if (fm is not None and fm < memory) or (fc is not None and fc < milli):
                continue
            after: StateKey = (
                key[0],
                None if fm is None else fm - memory,
                None if fc is None else fc - milli,
                mem,
                cpu,
                n,
            )
            option = self.host_option(key, after)
            worker = members[0][-1]
            rank = (self._protect(option[2], capable),) + option[0] + self.order_key(worker)
            if best is None or rank < best[0]:
                best = (rank, worker)
        return best[1] if best is not None else None

    def host_option(self, key: StateKey, after: StateKey) -> Option:
        """``options`` for host memory and cores taken without a GPU."""
        added = self.scorer.score(after) - self.scorer.score(key)
        lost = self.scorer.hostable(key) - self.scorer.hostable(after)
        return (round(added / STEP), 0), -1, lost


def after_states(
    key: StateKey, spec: RequestSpec, defaults: SessionDefaults
) -> Iterable[tuple[int, StateKey]]:
    """Each distinct way one session of ``spec`` fits a machine in state ``key``: (the position in
    ``key``'s GPUs it takes, -1 for whole GPUs; the state after)."""
    parts, fm, fc, mem, cpu, n = key
    choices: list[tuple[int, list[tuple[int, int]], list[tuple[int, int]]]] = []
    if spec.gpus is not None:
        whole = [i for i, (f, t) in enumerate(parts) if f == t][: int(spec.gpus)]
        if len(whole) < spec.gpus:
            return
        new = [(0, t) if i in whole else (f, t) for i, (f, t) in enumerate(parts)]
        choices.append((-1, new, [(parts[i][1], parts[i][1]) for i in whole]))
    else:
        shape = shape_of(spec)
        seen: set[tuple[int, int]] = set()
        for i, (f, t) in enumerate(parts):
            need = per_gpu_need(shape, t)
            if f >= need and (f, t) not in seen:
                seen.add((f, t))
                new = list(parts)
                new[i] = (f - need, t)
                choices.append((i, new, [(need, t)]))
    host = host_of(key)
    for i, new, held in choices:
        m, c = host_need(spec, held, host, defaults)
        if (fm is not None and m > fm) or (fc is not None and c > fc):
            continue
        yield (
            i,
            (
                tuple(sorted(new)),
                None if fm is None else fm - m,
                None if fc is None else fc - c,
                mem,
                cpu,
                n,
            ),
        )
