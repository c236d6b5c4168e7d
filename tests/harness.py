"""Test harness: a real embedded pool and real IPython kernels (jupyter_client), with their outputs collected.

Shared by the integration tests and the benchmarks' smoke checks; nothing here stands in for a real part.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.manager import KernelManager

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


@dataclass
class CellResult:
    """What one executed cell produced, in order."""

    outputs: list[dict] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def stdout(self) -> str:
        return "".join(o["text"] for o in self.outputs if o["type"] == "stream" and o["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(o["text"] for o in self.outputs if o["type"] == "stream" and o["name"] == "stderr")

    @property
    def error(self) -> dict | None:
        return next((o for o in self.outputs if o["type"] == "error"), None)

    @property
    def error_text(self) -> str:
        err = self.error
        return strip_ansi("\n".join(err["traceback"])) if err else ""

    def data(self, mime: str = "text/plain") -> list[Any]:
        return [o["data"][mime] for o in self.outputs
                if o["type"] in ("display_data", "execute_result", "update_display_data") and mime in o["data"]]

    @property
    def result(self) -> str | None:
        res = [o for o in self.outputs if o["type"] == "execute_result"]
        return res[-1]["data"].get("text/plain") if res else None


class Kernel:
    """A real IPython kernel with jupyter-gpu loaded and pointed at a pool."""

    def __init__(self, pool: str | None, user: str | None = None, load: bool = True, env: dict | None = None):
        kenv = dict(os.environ)
        if pool:
            kenv["JUPYTER_GPU_SCHEDULER"] = pool
        if user:
            kenv["JUPYTER_GPU_USER"] = user
        kenv.update(env or {})
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=kenv)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        if load:
            res = self.run("%load_ext jupyter_gpu")
            assert res.error is None, res.error_text

    def run(self, code: str, timeout: float = 120) -> CellResult:
        """Execute ``code`` and collect its outputs until the kernel is idle again."""
        return self.collect(self.start(code), timeout)

    def start(self, code: str) -> str:
        """Send ``code`` without waiting (for interrupt tests); collect with ``collect``."""
        return self.kc.execute(code)

    def collect(self, msg_id: str, timeout: float = 60) -> CellResult:
        """The outputs of the cell ``msg_id`` until the kernel is idle again."""
        result = CellResult()
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind == "stream":
                result.outputs.append({"type": "stream", "name": content["name"], "text": content["text"]})
            elif kind in ("display_data", "execute_result", "update_display_data"):
                result.outputs.append({"type": kind, "data": content["data"],
                                       "transient": content.get("transient", {})})
            elif kind == "error":
                result.outputs.append({"type": "error", "ename": content["ename"], "evalue": content["evalue"],
                                       "traceback": content["traceback"]})
            elif kind == "clear_output":
                result.outputs.append({"type": "clear_output"})
        result.elapsed = time.perf_counter() - start
        return result

    def wait_for_output(self, msg_id: str, needle: str, timeout: float = 30) -> CellResult:
        """Read outputs of a running cell until ``needle`` appears in its stdout."""
        result = CellResult()
        deadline = time.monotonic() + timeout
        while needle not in result.stdout:
            msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                result.outputs.append({"type": "stream", "name": msg["content"]["name"],
                                       "text": msg["content"]["text"]})
        return result

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def alive(self) -> bool:
        return self.km.is_alive()

    def shutdown(self, now: bool = False) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=now)


def snapshot(pool: str) -> dict:
    """The broker's view of the pool, read through its scheduler handler."""
    import asyncio

    from distributed.core import rpc

    async def go() -> dict:
        r = rpc(pool)
        try:
            return await r.gpu_snapshot()
        finally:
            await r.close_rpc()

    return asyncio.run(go())


def leases(pool: str) -> list[dict]:
    return [ls for g in snapshot(pool)["gpus"] for ls in g["leases"]]


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.1) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
