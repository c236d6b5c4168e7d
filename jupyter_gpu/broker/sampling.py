"""GPU utilization samples for the panel: NVML's from workers, the broker's own for virtual GPUs.

Why the broker samples virtual GPUs: they have no counter, and the panel must show the pool moving
on machines without a GPU; their utilization is the share of their memory leased to sessions that
are running a cell.
"""

from __future__ import annotations

import collections
import time

from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import Sample


class GpuSamples:
    """GPU id -> its latest samples (``worker.samples-kept`` of them)."""

    def __init__(self) -> None:
        self.by_gpu: dict[str, collections.deque[Sample]] = {}

    def track(self, gpu_ids: list[str]) -> None:
        for gpu_id in gpu_ids:
            self.by_gpu.setdefault(
                gpu_id, collections.deque(maxlen=int(config.get("worker.samples-kept")))
            )

    def forget(self, gpu_ids: list[str]) -> None:
        for gpu_id in gpu_ids:
            self.by_gpu.pop(gpu_id, None)

    def add(self, worker: str, samples: dict[str, Sample]) -> None:
        """A worker's NVML samples, keyed by GPU index (GPUs the broker does not know are
        ignored)."""
        for index, sample in samples.items():
            kept = self.by_gpu.get(f"{worker}#{index}")
            if kept is not None:
                kept.append(sample)

    def sample_virtual(self, ledger: Ledger) -> None:
        now = time.time()
        for gpu in ledger.gpus.values():
            if not gpu.virtual or gpu.id not in self.by_gpu:
                continue
            running = sum(
                a.bytes
                for lid in gpu.leases
                if lid in ledger.leases
                for a in ledger.leases[lid].allocations
                if a.gpu == gpu.id and ledger.leases[lid].state == "running"
            )
            self.by_gpu[gpu.id].append(
                {
                    "t": now,
                    "utilization": round(100.0 * running / gpu.total_bytes, 1),
                    "memory_used_bytes": gpu.leased_bytes,
                }
            )
