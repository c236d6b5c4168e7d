"""Enforcing a lease inside its session process: GPU pinning and memory caps.

Applied before CUDA initialises in the process (a pre-warmed process has imported torch but never
touched CUDA). The strongest mechanism available wins and is recorded with the lease: ``mig`` (a MIG
slice is its own device) > ``mps`` (an MPS daemon enforces a pinned memory limit) > ``torch-cap``
(PyTorch's caching allocator refuses to grow past the fraction) > ``none`` (virtual GPU).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


def mps_running() -> bool:
    """Whether an MPS control daemon serves this machine (its pipe directory exists)."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe_dir, "control"))


def pin_environment(lease: dict, gpus: list[dict]) -> dict[str, str]:
    """Environment variables that pin the process to its leased GPUs (and MPS limits where MPS
    runs)."""
    env: dict[str, str] = {"JUPYTER_GPU_LEASE": lease["id"]}
    real = [g for g in gpus if not g.get("virtual")]
    if real:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(g["uuid"] for g in real)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        if mps_running() and not any(g.get("mig") for g in real):
            limit_mib = max(1, int(lease["bytes"] / max(1, len(real)) / 2**20))
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(
                f"{i}={limit_mib}M" for i in range(len(real))
            )
    else:
        # a virtual GPU: the session must not grab a real one by accident
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def apply_memory_cap(lease: dict, gpus: list[dict]) -> str:
    """Cap this process at its leased share of each GPU; return the isolation level achieved."""
    if not gpus or all(g.get("virtual") for g in gpus):
        return "none"
    if all(g.get("mig") for g in gpus):
        return "mig"
    level = "mps" if "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in os.environ else "none"
    torch: Any = sys.modules.get("torch")
    if torch is None:
        try:
            torch = importlib.import_module("torch")
        except ImportError:
            return level
    try:
        if not torch.cuda.is_available():
            log.warning(
                "lease %s names a real GPU but CUDA is not available to torch here", lease["id"]
            )
            return level
        per_gpu = lease["bytes"] / len(gpus)
        for i, gpu in enumerate(gpus):
            fraction = min(1.0, per_gpu / float(gpu["total_bytes"]))
            torch.cuda.set_per_process_memory_fraction(fraction, device=i)
        return level if level == "mps" else "torch-cap"
    except Exception as exc:  # pragma: no cover  # noqa: BLE001 - depends on the driver: the session runs uncapped, with a warning
        log.warning("could not apply the memory cap for lease %s: %s", lease["id"], exc)
        return level
