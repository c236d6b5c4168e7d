"""Idle sessions' copies in host memory, booked on the machine that keeps them.

Why: a session taken off its GPU while idle leaves its variables in ``/dev/shm`` on its worker
(``worker/host_copies.py``) for its owner's next cell; that is the same RAM the machine's sessions
use, so without a bound copies could take a machine's memory from its sessions (issue 24). Each
saved copy is booked on its machine (``HostSlot.parked``) while it fits beside the leases there;
when a new lease (or a newer copy, or a smaller report of the machine's memory) needs the memory,
the oldest copies are spilled: their workers move them to the pool's disk folder, and a restore
takes them from there (``worker/hoststore.py``, ``launcher/hostfiles.py``). Placement counts parked
memory as free: a copy never keeps a session from starting.

A separate class from the ledger so that the ledger stays a ledger of leases; it works on the
ledger's machines and ended leases, and hands each copy to spill to ``on_spill`` (the broker tells
the worker; a simulation or a test collects them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from jupyter_gpu.broker.hosts import HostSlot
from jupyter_gpu.broker.model import Lease


class ParkedCopies:
    """See the module docstring. ``hosts`` and ``ended`` are the ledger's own."""

    def __init__(self, hosts: Mapping[str, HostSlot], ended: Mapping[str, Lease]) -> None:
        self.hosts, self.ended = hosts, ended
        self.spills: list[Lease] = []  # spilled since the last ``take_spills`` (no ``on_spill``)
        self.on_spill: Callable[[Lease], object] | None = None

    def park(self, lease: Lease) -> None:
        """Book the saved copy of ended ``lease`` on the machine that keeps it: it goes to disk at
        once if it cannot fit beside the machine's leases, else the oldest copies that leave it no
        room do."""
        offload = lease.offload
        host = self.hosts.get(offload.worker) if offload is not None else None
        if offload is None or offload.state != "saved" or host is None or offload.spilled:
            return
        host.unpark(lease.id)
        if host.memory is not None and offload.bytes > host.memory - host.leased_memory:
            self._spill(lease)
            return
        host.park(lease.id, offload.bytes)
        self.spill_over(host)

    def unpark(self, lease: Lease) -> None:
        """``lease``'s copy was restored or discarded: its machine's memory is free again."""
        if lease.offload is not None:
            host = self.hosts.get(lease.offload.worker)
            if host is not None:
                host.unpark(lease.id)

    def spill_over(self, host: HostSlot | None) -> None:
        """Spill ``host``'s oldest copies until its leases and copies fit its memory."""
        if host is None or not host.parked:
            return
        for lease_id in host.to_spill():
            host.unpark(lease_id)
            lease = self.ended.get(lease_id)
            if lease is not None:
                self._spill(lease)

    def _spill(self, lease: Lease) -> None:
        if lease.offload is None:
            return
        lease.offload.spilled = True
        if self.on_spill is not None:
            self.on_spill(lease)
        else:
            self.spills.append(lease)

    def take_spills(self) -> list[Lease]:
        """The ended leases whose copies were spilled since the last call (without ``on_spill``)."""
        spills, self.spills = self.spills, []
        return spills

    def bytes_by_user(self) -> dict[str, int]:
        """Each user's copies booked in host memory now (bytes): what her idle sessions hold."""
        owners: dict[str, int] = {}
        for host in self.hosts.values():
            for lease_id, nbytes in host.parked.items():
                lease = self.ended.get(lease_id)
                if lease is not None:
                    owners[lease.user] = owners.get(lease.user, 0) + nbytes
        return owners

    def check(self) -> None:
        """Assert that every machine books exactly its saved copies, within its memory."""
        for h in self.hosts.values():
            assert h.parked_memory == sum(h.parked.values()), h
            assert not h.parked or h.overbooked() == 0, h
            for lease_id in h.parked:
                copy = self.ended[lease_id].offload
                assert copy is not None and copy.worker == h.worker and not copy.spilled, lease_id
