"""Each cell's peak memory (and GPU utilization on real GPUs), measured inside the session
process.

Why: a lease reserves memory for the session's life, so users need to see how much their cells
really used to ask for the right amount (``jupyter_gpu.common.rightsizing``), and the audit store
keeps the peak per lease. What "memory" means depends on the GPU:

- a real GPU with PyTorch's CUDA initialised: ``torch.cuda.max_memory_allocated`` (all the session's
  live tensors at their peak, not just the cell's new ones), and the process's SM utilization from NVML
  (``nvmlDeviceGetProcessUtilization``) averaged over the cell;
- a virtual GPU (cells run on the CPU): the session's resident memory above what it held when the lease
  was assigned (imports, interpreter), at its peak during the cell. Linux resets the peak resident size
  (``VmHWM``) when ``5`` is written to ``/proc/self/clear_refs``, so no sampling thread is needed.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

log = logging.getLogger(__name__)

_STATUS = "/proc/self/status"


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_host_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # not Linux, or not allowed: the peak is then the life-time peak
        return False


class CellMemoryMeter:
    """Start before a cell, ``stop()`` after it: ``(peak_bytes, gpu_utilization_percent)``.

    ``virtual`` says the session's GPUs are virtual, so host memory stands in for GPU memory.
    """

    def __init__(self, virtual: bool, gpu_uuids: list[str] | None = None):
        self.virtual = virtual
        self.gpu_uuids = list(gpu_uuids or [])
        self.baseline: int | None = _proc_status_bytes("VmRSS")
        self._cuda = False
        self._util_since = 0

    def start(self) -> None:
        if self.virtual:
            _reset_host_peak()
            return
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()
                self._cuda = True
        except Exception:  # noqa: BLE001 - a broken CUDA state is the cell's problem, reported by the cell
            self._cuda = False
        self._util_since = int(time.time() * 1e6)

    def stop(self) -> tuple[int | None, float | None]:
        if self.virtual:
            peak = _proc_status_bytes("VmHWM")
            if peak is None or self.baseline is None:
                return None, None
            return max(0, peak - self.baseline), None
        torch = sys.modules.get("torch")
        peak = None
        try:
            if torch is not None and torch.cuda.is_initialized():
                peak = int(
                    sum(
                        torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())
                    )
                )
            elif not self._cuda:
                peak = 0  # the cell never touched the GPU
        except Exception:  # noqa: BLE001 - a broken CUDA state: no peak rather than a wrong one
            peak = None
        return peak, self._utilization()

    def resident(self) -> int | None:
        """What the session holds now, between cells: roughly what moving it to host memory would
        write (the session's resident memory above its start, plus live CUDA tensors on a real GPU).
        The broker prefers to suspend sessions that hold little, because the cell that waits for the
        move waits for the largest of them to be written out."""
        rss = _proc_status_bytes("VmRSS")
        held = (
            max(0, rss - self.baseline) if rss is not None and self.baseline is not None else None
        )
        if self.virtual:
            return held
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_initialized():
                cuda = int(
                    sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
                )
                return cuda + (held or 0)
        except Exception:  # noqa: BLE001 - a broken CUDA state: say nothing rather than something wrong
            return None
        return held

    def _utilization(self) -> float | None:
        """The mean SM utilization NVML sampled for this process during the cell (real GPUs
        only)."""
        if not self.gpu_uuids:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no NVML library or driver: no utilization
            return None
        try:
            samples: list[int] = []
            for uuid in self.gpu_uuids:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
                try:
                    for s in pynvml.nvmlDeviceGetProcessUtilization(handle, self._util_since):
                        if s.pid == os.getpid():
                            samples.append(s.smUtil)
                except pynvml.NVMLError:  # no samples in the window (a short cell) or not supported
                    continue
            return sum(samples) / len(samples) if samples else None
        except Exception as exc:  # noqa: BLE001 - NVML fails in many ways across drivers: no utilization
            log.debug("NVML process utilization unavailable: %s", exc)
            return None
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass
