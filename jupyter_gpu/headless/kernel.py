"""Kernels for headless runs: started wired to a pool, and a small client for users' tests (``gpu_kernel``).

Every kernel started here gets a connection file named ``kernel-<id>.json`` in a directory we own, because
that id is what the kernel reports to the broker as its identity (``kernelext.connection.kernel_identity``)
and so what the lease checks look for in ``gpu_snapshot``. On POSIX kernels talk over IPC sockets in that
directory: nothing listens on TCP ports and ipykernel does not warn about unencrypted TCP on every run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpu.common.protocol import SCHEDULER_ENV

log = logging.getLogger(__name__)

ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """Tracebacks from IPython are coloured; reports and assertions want plain text."""
    return ANSI_RE.sub("", text)


def kernel_env(pool: str, notebook: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a headless kernel: ours, plus the pool to use and the notebook it runs.

    ``JPY_SESSION_NAME`` is what Jupyter Server sets for its kernels; the magic reads it to label leases
    with their notebook, so the panel and ``%gpu queue`` show which notebook a headless run holds GPUs for.
    """
    env = dict(os.environ)
    env[SCHEDULER_ENV] = pool
    if notebook:
        env["JPY_SESSION_NAME"] = os.path.abspath(notebook)
    env.update(extra or {})
    return env


def manager_kwargs(directory: str, kernel_name: str = "python3") -> tuple[str, dict[str, Any]]:
    """A new kernel id and the KernelManager arguments that give it a connection file named after it."""
    kernel_id = str(uuid.uuid4())
    connection_file = os.path.join(directory, f"kernel-{kernel_id}.json")
    kwargs: dict[str, Any] = {"kernel_name": kernel_name, "connection_file": connection_file}
    if os.name == "posix":
        kwargs.update(transport="ipc", ip=os.path.join(directory, f"k-{kernel_id[:8]}"))
    return kernel_id, kwargs


def kernel_directory() -> str:
    """A short private directory for connection files and IPC sockets (socket paths are length-limited)."""
    return tempfile.mkdtemp(prefix="jgpu-k-", dir="/tmp" if os.path.isdir("/tmp") else None)


@dataclass
class CellResult:
    """What one ``execute`` produced: nbformat outputs, the status, and the error if any."""

    code: str
    outputs: list[dict] = field(default_factory=list)
    status: str = "ok"
    ename: str | None = None
    evalue: str | None = None
    traceback: str = ""
    timed_out: bool = False
    execution_count: int | None = None

    @property
    def stdout(self) -> str:
        return "".join(o.get("text", "") for o in self.outputs if o.get("output_type") == "stream"
                       and o.get("name") == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(o.get("text", "") for o in self.outputs if o.get("output_type") == "stream"
                       and o.get("name") == "stderr")

    @property
    def text(self) -> str:
        """All the text a person would read in the cell: streams and the text/plain of results/displays."""
        parts = []
        for o in self.outputs:
            if o.get("output_type") == "stream":
                parts.append(o.get("text", ""))
            elif o.get("output_type") in ("execute_result", "display_data"):
                parts.append(str(o.get("data", {}).get("text/plain", "")) + "\n")
        return "".join(parts)

    @property
    def result(self) -> str | None:
        """The text/plain of the cell's last value (``Out[n]``), if it had one."""
        for o in self.outputs:
            if o.get("output_type") == "execute_result":
                return str(o.get("data", {}).get("text/plain", ""))
        return None


class KernelCellError(AssertionError):
    """Code run through :class:`GpuKernel` raised (or timed out); the message carries the traceback."""

    def __init__(self, result: CellResult):
        what = "timed out and was interrupted" if result.timed_out else f"raised {result.ename}: {result.evalue}"
        super().__init__(f"The code {what}.\n--- code ---\n{result.code}\n--- traceback ---\n{result.traceback}")
        self.result = result


class GpuKernel:
    """A started IPython kernel connected to a pool, with ``%load_ext jupyter_gpu`` run.

    ``execute(code)`` runs code as a notebook cell would (``%%gpu`` cells included) and returns a
    :class:`CellResult`; it raises :class:`KernelCellError` when the code raises, unless ``allow_error``.
    ``stop()`` shuts the kernel down and checks, through the broker, that it left no lease behind.
    """

    def __init__(self, pool: str, cwd: str | None = None, kernel_name: str = "python3",
                 load_extension: bool = True, default_timeout: float | None = 120.0):
        self.pool = pool
        self.cwd = cwd or os.getcwd()
        self.kernel_name = kernel_name
        self.load_extension = load_extension
        self.default_timeout = default_timeout
        self.directory = kernel_directory()
        self.kernel_id, self._km_kwargs = manager_kwargs(self.directory, kernel_name)
        self.km: Any = None
        self.kc: Any = None
        self.leftovers: list[str] = []

    def start(self) -> "GpuKernel":
        from jupyter_client.manager import KernelManager

        started = time.monotonic()
        self.km = KernelManager(**self._km_kwargs)
        self.km.start_kernel(env=kernel_env(self.pool), cwd=self.cwd)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        if self.load_extension:
            self.execute("%load_ext jupyter_gpu")
        log.info("kernel %s ready in %.1f s (pool %s)", self.kernel_id, time.monotonic() - started, self.pool)
        return self

    def execute(self, code: str, timeout: float | None = None, allow_error: bool = False) -> CellResult:
        """Run ``code`` as a cell; on timeout interrupt the kernel (the magic stops the remote work)."""
        from nbformat.v4 import output_from_msg

        from jupyter_gpu.common import config

        timeout = self.default_timeout if timeout is None else timeout
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        result = CellResult(code=code)
        displays: dict[str, list[int]] = {}
        deadline = time.monotonic() + timeout if timeout else None
        interrupted = False
        while True:
            wait = 0.5 if deadline is None else max(0.05, min(0.5, deadline - time.monotonic()))
            try:
                msg = self.kc.get_iopub_msg(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    if interrupted:
                        raise TimeoutError(f"the kernel did not stop within {timeout:g} s, nor after an interrupt")
                    self.km.interrupt_kernel()
                    interrupted = result.timed_out = True
                    deadline = time.monotonic() + config.get_seconds("interrupt-grace") + 15
                if not self.km.is_alive():
                    raise RuntimeError("the kernel died while running the code")
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content.get("execution_state") == "idle":
                break
            if kind == "clear_output":
                result.outputs.clear()
                displays.clear()
            elif kind == "update_display_data":
                did = content.get("transient", {}).get("display_id")
                for i in displays.get(did, []):
                    result.outputs[i]["data"] = content.get("data", {})
            elif kind in ("stream", "display_data", "execute_result", "error"):
                out = output_from_msg(msg)
                if kind == "stream" and result.outputs and result.outputs[-1].get("output_type") == "stream" \
                        and result.outputs[-1].get("name") == out.get("name"):
                    result.outputs[-1]["text"] += out["text"]
                    continue
                did = content.get("transient", {}).get("display_id")
                if did:
                    displays.setdefault(did, []).append(len(result.outputs))
                result.outputs.append(out)
        reply = self._reply(msg_id)
        content = reply.get("content", {})
        result.status = content.get("status", "error")
        result.execution_count = content.get("execution_count")
        if result.status == "error":
            result.ename, result.evalue = content.get("ename"), content.get("evalue")
            result.traceback = strip_ansi("\n".join(content.get("traceback", [])))
            if not allow_error:
                raise KernelCellError(result)
        return result

    def _reply(self, msg_id: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_shell_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg
        return {"content": {"status": "error", "ename": "TimeoutError", "evalue": "no execute_reply"}}

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def stop(self) -> list[str]:
        """Shut the kernel down, then make sure the pool holds nothing for it; returns what had to be ended."""
        from jupyter_gpu.headless.pool import release_kernel_leases

        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
            self.kc = None
        if self.km is not None:
            with contextlib.suppress(Exception):
                self.km.shutdown_kernel(now=False)
            self.km = None
        self.leftovers = release_kernel_leases(self.pool, self.kernel_id)
        shutil.rmtree(self.directory, ignore_errors=True)
        return self.leftovers

    def __enter__(self) -> "GpuKernel":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
