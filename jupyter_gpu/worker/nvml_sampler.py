"""GPU utilization sampling with NVML, in a thread of its own.

Why a thread: NVML calls block (tens of milliseconds on a busy GPU); none may run on the worker's
event loop. The thread samples every ``worker.sample-interval`` and hands each batch to ``send`` (a
coroutine function run on the worker's loop), which forwards it to the broker for the panel.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from jupyter_gpu.common import config
from jupyter_gpu.common.inventory import GpuInfo

log = logging.getLogger(__name__)


class NvmlSampler:
    """Samples the real GPUs of ``gpus`` until ``stop()``."""

    def __init__(
        self,
        gpus: list[GpuInfo],
        loop: asyncio.AbstractEventLoop,
        send: Callable[[dict[str, Any]], Coroutine[Any, Any, None]],
    ):
        self.gpus = [g for g in gpus if not g.virtual]
        self.loop, self.send = loop, send
        self._stop = threading.Event()

    def start(self) -> None:
        if self.gpus:
            threading.Thread(target=self._run, daemon=True, name="jupyter-gpu-nvml").start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import pynvml

        try:
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - no NVML library or driver: no sampling, the worker runs
            log.warning("NVML sampling disabled: %s", exc)
            return
        handles = {}
        for g in self.gpus:
            try:
                handles[g.index] = pynvml.nvmlDeviceGetHandleByUUID(g.uuid)
            except pynvml.NVMLError:  # not found by UUID: by index then
                if g.nvml_index is not None:
                    handles[g.index] = pynvml.nvmlDeviceGetHandleByIndex(g.nvml_index)
        interval = config.get_seconds("worker.sample-interval")
        while not self._stop.wait(interval):
            samples = {}
            for index, h in handles.items():
                try:
                    util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
                except pynvml.NVMLError:
                    util = None  # MIG slices have no utilization counter
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                samples[str(index)] = {
                    "t": time.time(),
                    "utilization": util,
                    "memory_used_bytes": int(mem.used),
                }
            asyncio.run_coroutine_threadsafe(self.send(samples), self.loop)
