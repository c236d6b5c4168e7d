"""Helpers for the fair-share tests: the simulator's pool (bench/pool_sim.py, the real policy and
packing) and small builders for GPUs, quotas and requests."""

from __future__ import annotations

import importlib.util
import os
import sys

from jupyter_gpu.broker.model import GpuSlot, Request
from jupyter_gpu.broker.quotas import parse_quotas
from jupyter_gpu.common.protocol import RequestSpec

GiB = 2**30
_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "pool_sim.py")


def pool_sim():
    """The bench simulator module (loaded by path: bench/ is not a package)."""
    if "pool_sim" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pool_sim", _BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["pool_sim"] = module
        spec.loader.exec_module(module)
    return sys.modules["pool_sim"]


def gpus(*sizes_gib: int, per_worker: int = 2) -> list[GpuSlot]:
    return [
        GpuSlot(
            worker=f"w{i // per_worker}",
            index=i % per_worker,
            uuid=f"G{i}",
            name="g",
            total_bytes=int(s * GiB),
        )
        for i, s in enumerate(sizes_gib)
    ]


def quotas(**overrides):
    data = {
        "reserve-after": "30s",
        "min-run-time": "0s",
        "half-life": "1h",
        "teams": {
            "ml": {"guarantee": 1.0, "members": ["alice", "bob"]},
            "viz": {"guarantee": 1.0, "members": ["carol"]},
        },
    }
    data.update(overrides)
    return parse_quotas(data)


_n = [0]


def req(user: str, submitted: float = 0.0, priority: str = "interactive", **spec) -> Request:
    """A request; ids sort as they were made (the simulator submits at its clock, so requests
    made together tie on age and go by id: "R10" before "R9" made a test's outcome depend on how
    many requests the tests before it had made)."""
    _n[0] += 1
    spec = spec or {"fraction": 0.5}
    return Request(
        id=f"R{_n[0]:06d}",
        user=user,
        kernel="k",
        client=None,
        spec=RequestSpec(priority=priority, **spec),
        submitted=submitted,
    )
