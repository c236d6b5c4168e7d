"""The packer's index of free room: each GPU by its free memory, each machine by its entirely free
GPUs, its free host memory and cores, and its state of free room (the groups fragmentation-aware
placement scores once each), kept in step as bookings change (``touch``).

Why apart from ``packing.py``: what it keeps is plain bookkeeping, changed on every grant and end;
placement only reads it. A booking changes one or two of a machine's GPUs, so ``touch`` leaves the
entries that did not change where they are (a grant re-indexed all of its machine's before, a tenth
of a decision at 10,000 GPUs)."""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterable
from typing import Any

from sortedcontainers import SortedList

from jupyter_gpu.broker.fragmentation import StateKey
from jupyter_gpu.broker.hosts import HostSlot
from jupyter_gpu.broker.model import GpuSlot


class FreeIndex:
    """The index ``Packer`` places from (see the module docstring). ``order_key`` and ``_count``
    come from ``ScoredChoice``, ``_key_of`` from ``Packer``."""

    gpus: dict[str, GpuSlot]
    hosts: dict[str, HostSlot]

    @property
    def scored(self) -> bool:
        raise NotImplementedError

    def order_key(self, worker: str) -> tuple[Any, ...]:
        raise NotImplementedError

    def _count(self, key: StateKey, delta: int) -> None:
        raise NotImplementedError

    def _key_of(
        self, worker: str, skip: Collection[str] = (), pending: tuple[int, int] = (0, 0)
    ) -> StateKey:
        raise NotImplementedError

    def rebuild(self) -> None:
        """Index everything afresh (after the ledger's dicts were replaced wholesale)."""
        self._by_worker: dict[str, list[GpuSlot]] = collections.defaultdict(list)
        for g in self.gpus.values():
            self._by_worker[g.worker].append(g)
        for slots in self._by_worker.values():
            slots.sort(key=lambda g: g.index)
        self._free: dict[int, SortedList] = collections.defaultdict(SortedList)
        self._entry: dict[str, tuple[int, int, str]] = {}
        self._whole: SortedList = SortedList()
        self._whole_entry: dict[str, tuple[int, str]] = {}
        self._free_whole = 0  # entirely free GPUs in the pool
        # free host memory and thousandths of a core of the machines that report them
        self._host_free: tuple[SortedList, SortedList] = (SortedList(), SortedList())
        self._host_entry: dict[str, tuple[tuple[float, str], tuple[float, str]]] = {}
        self._unbounded: set[str] = set()  # machines that report no memory or no cores
        self._bounded: set[str] = set()  # machines that report memory or cores
        self._state: dict[str, StateKey] = {}
        self._entries: dict[str, tuple[Any, ...]] = {}  # each worker's entry in its group
        self._groups: dict[StateKey, SortedList] = {}
        self._states_stale = False  # (see ``states``)
        self._capable: collections.Counter[int] = collections.Counter()
        self._capable_version = -1
        # the workers whose room may have grown since the last complete scheduling pass (None:
        # all of them): a request the last pass could not place can only fit there now
        self.changed: set[str] | None = None
        self.version = getattr(self, "version", 0) + 1  # bumped by every change (queue_view.py)
        for worker in list(self._by_worker) + [w for w in self.hosts if w not in self._by_worker]:
            self.touch(worker)

    def reindex(self, worker: str, slots: Iterable[GpuSlot] | None = None) -> None:
        """Re-index ``worker`` after it joined (with ``slots``), left or offered other GPUs."""
        for g in self._by_worker.pop(worker, []):
            old = self._entry.pop(g.id, None)
            if old is not None:
                self._free[old[0]].discard(old[1:])
        if slots is None:
            slots = (g for g in self.gpus.values() if g.worker == worker)
        slots = sorted(slots, key=lambda g: g.index)
        if slots:
            self._by_worker[worker] = slots
        self.touch(worker)

    def touch(self, worker: str) -> None:
        """Re-index ``worker`` after its GPUs' or its host's bookings changed."""
        self.mark(worker)
        self.version += 1
        slots = self._by_worker.get(worker, ())
        for g in slots:  # (a grant or an end changes one or two of a worker's GPUs: the others
            entry = (g.total_bytes, g.free_bytes, g.id)  # keep their entries)
            old = self._entry.get(g.id)
            if old == entry:
                continue
            if old is not None:
                self._free[old[0]].discard(old[1:])
            self._entry[g.id] = entry
            self._free[g.total_bytes].add(entry[1:])
        self._index_whole(worker, sum(1 for g in slots if g.leased_bytes == 0))
        self._index_host(worker)
        if self.scored:
            self._index_state(worker)
        else:  # (read by fragmentation-aware placement only: brought up to date when it reads)
            self._states_stale = True

    def states(self) -> dict[StateKey, SortedList]:
        """The machines grouped by their state of free room, each at its ``order_key``, up to
        date. Why not kept at every ``touch``: only fragmentation-aware placement reads them, and
        while no machine reports its host (best fit) keeping them was a third of each booking."""
        if self._states_stale:
            self._states_stale = False
            for worker in sorted(set(self._state) | set(self._by_worker) | set(self.hosts)):
                self._index_state(worker)
        return self._groups

    def _index_whole(self, worker: str, free_whole: int) -> None:
        """Keep ``worker``'s count of entirely free GPUs in ``_whole`` (unchanged: untouched)."""
        old = self._whole_entry.get(worker)
        if (old[0] if old is not None else 0) == free_whole:
            return
        if old is not None:
            del self._whole_entry[worker]
            self._whole.discard(old)
            self._free_whole -= old[0]
        if free_whole:
            self._whole_entry[worker] = (free_whole, worker)
            self._whole.add((free_whole, worker))
            self._free_whole += free_whole

    def _index_host(self, worker: str) -> None:
        """Keep ``worker``'s free host memory and cores in ``_host_free`` (or it in
        ``_unbounded`` when its machine reports none)."""
        host = self.hosts.get(worker)
        known = host is not None and host.memory is not None and host.cpu_milli is not None
        want = None
        if worker in self._by_worker and known:
            assert host is not None
            want = ((host.free_memory, worker), (host.free_cpu_milli, worker))
        old = self._host_entry.get(worker)
        if old != want:
            if old is not None:
                del self._host_entry[worker]
                self._host_free[0].discard(old[0])
                self._host_free[1].discard(old[1])
            if want is not None:
                self._host_entry[worker] = want
                self._host_free[0].add(want[0])
                self._host_free[1].add(want[1])
        if worker in self._by_worker and not known:
            self._unbounded.add(worker)
        else:
            self._unbounded.discard(worker)
        (self._bounded.add if host is not None and host.bounded else self._bounded.discard)(worker)

    def _index_state(self, worker: str) -> None:
        """Keep ``worker`` in the group of its free-room state (``_groups``), at its order key."""
        key: StateKey | None = None
        entry: tuple[Any, ...] = ()
        if worker in self._by_worker or worker in self.hosts:
            key, entry = self._key_of(worker), self.order_key(worker)
        old_key = self._state.get(worker)
        if old_key == key and (key is None or self._entries.get(worker) == entry):
            return
        if old_key is not None:
            del self._state[worker]
            members = self._groups[old_key]
            members.discard(self._entries.pop(worker))
            if not members:
                del self._groups[old_key]
            self._count(old_key, -1)
        if key is not None:
            self._state[worker] = key
            self._entries[worker] = entry
            self._groups.setdefault(key, SortedList()).add(entry)
            self._count(key, 1)

    def mark(self, worker: str) -> None:
        """``worker`` may have more room than the last pass saw (a booking ended, GPUs held for
        another request were let go)."""
        if self.changed is not None:
            self.changed.add(worker)

    def mark_all(self) -> None:
        """Anything may fit anywhere again (a limit loosened, the pool was re-indexed)."""
        self.changed = None
