"""Kernels for headless runs: started wired to a pool, and the one client that drives a kernel cell
by cell.

:class:`GpuKernel` and its :class:`CellResult` serve users' tests (the ``gpu_kernel`` fixture), this
project's integration tests (``tests/harness.py``) and its benchmarks (``bench/_common.py``);
whole-notebook runs go through nbclient (``runner.py``), which starts its kernels with the same
:func:`manager_kwargs` and
:func:`kernel_env`.

Every kernel started here gets a connection file named ``kernel-<id>.json`` in a directory we own,
because that id is what the kernel reports to the broker as its identity
(``kernelext.connection.kernel_identity``) and so what the lease checks look for in
``gpu_snapshot``. On POSIX kernels talk over IPC sockets in that directory: nothing listens on TCP
ports and ipykernel does not warn about unencrypted TCP on every run.
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
from typing import Any, cast

from jupyter_gpu.common.protocol import SCHEDULER_ENV, USER_ENV

log = logging.getLogger(__name__)

ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """Tracebacks from IPython are coloured; reports and assertions want plain text."""
    return ANSI_RE.sub("", text)


def kernel_env(
    pool: str | None, notebook: str | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a headless kernel: ours, plus the pool to use (unless None) and the
    notebook it runs.

        ``JPY_SESSION_NAME`` is what Jupyter Server sets for its kernels; the magic reads it to
        label leases with their notebook, so the panel and ``%gpu queue`` show which notebook a
        headless run holds GPUs for.
    """
    env = dict(os.environ)
    # no widget frontend here: progress as text (kernelext/progress_bar.py)
    env["JUPYTER_GPU_PROGRESS"] = "text"
    if pool is not None:
        env[SCHEDULER_ENV] = pool
    if notebook:
        env["JPY_SESSION_NAME"] = os.path.abspath(notebook)
    env.update(extra or {})
    return env


def manager_kwargs(directory: str, kernel_name: str = "python3") -> tuple[str, dict[str, Any]]:
    """A new kernel id and the KernelManager arguments that give it a connection file named after
    it."""
    kernel_id = str(uuid.uuid4())
    connection_file = os.path.join(directory, f"kernel-{kernel_id}.json")
    kwargs: dict[str, Any] = {"kernel_name": kernel_name, "connection_file": connection_file}
    if os.name == "posix":
        kwargs.update(transport="ipc", ip=os.path.join(directory, f"k-{kernel_id[:8]}"))
    return kernel_id, kwargs


def _account_kernel_manager() -> type:
    from jupyter_client.manager import KernelManager

    class AccountKernelManager(KernelManager):
        """A kernel manager (run by root) whose kernel runs as another account: that account must be
        able to read the connection file it writes."""

        def __init__(self, account: tuple[int, int], **kwargs: Any):
            super().__init__(**kwargs)
            self._account = account

        def write_connection_file(self, **kwargs: Any) -> Any:
            result = super().write_connection_file(**kwargs)
            os.chown(self.connection_file, *self._account)
            return result

    return AccountKernelManager


def _AccountKernelManager(account: tuple[int, int], **kwargs: Any) -> Any:
    return _account_kernel_manager()(account=account, **kwargs)


def kernel_directory() -> str:
    """A short private directory for connection files and IPC sockets (socket paths are
    length-limited)."""
    return tempfile.mkdtemp(prefix="jgpu-k-", dir="/tmp" if os.path.isdir("/tmp") else None)


@dataclass
class CellResult:
    """What one cell sent, kept two ways, plus how it ended.

    ``outputs`` are the cell's nbformat outputs as a notebook saves them: consecutive stream
    text merged, ``update_display_data`` applied to the display it names, ``clear_output``
    applied (``wait=True`` clears at the next output). ``log`` is every output message in the
    order it arrived, nbformat-shaped too (``output_type`` of ``stream``, ``display_data``,
    ``execute_result``, ``update_display_data``, ``error`` or ``clear_output``; displays keep
    their ``transient``), untouched by later updates and clears.

    ``stdout``, ``stderr``, ``data()``, ``result`` and ``error`` read the log (all the cell
    sent, even what a later ``clear_output`` removed); ``text`` reads the outputs (what a person
    sees in the saved cell). ``status``, ``ename``, ``evalue``, ``traceback`` and
    ``execution_count`` come from the execute reply; ``elapsed`` is the seconds from sending the
    code to the kernel going idle. A result collected with ``record=False`` has no outputs or
    log, only the reply's fields and ``elapsed``.
    """

    code: str = ""
    outputs: list[dict] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    status: str = "ok"
    ename: str | None = None
    evalue: str | None = None
    traceback: str = ""
    timed_out: bool = False
    execution_count: int | None = None
    elapsed: float = 0.0

    def _streams(self, name: str) -> str:
        return "".join(
            o.get("text", "")
            for o in self.log
            if o["output_type"] == "stream" and o.get("name") == name
        )

    @property
    def stdout(self) -> str:
        """Everything the cell wrote to stdout, in order."""
        return self._streams("stdout")

    @property
    def stderr(self) -> str:
        """Everything the cell wrote to stderr, in order."""
        return self._streams("stderr")

    @property
    def text(self) -> str:
        """All the text a person would read in the cell: streams and the text/plain of
        results/displays."""
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
        res = [o for o in self.log if o["output_type"] == "execute_result"]
        return str(res[-1].get("data", {}).get("text/plain", "")) if res else None

    @property
    def error(self) -> dict | None:
        """The cell's error output (``ename``, ``evalue``, ``traceback`` as a list of coloured
        lines), or None."""
        return next((o for o in self.log if o["output_type"] == "error"), None)

    @property
    def error_text(self) -> str:
        """The error output's traceback as plain text ('' when the cell raised nothing)."""
        err = self.error
        return strip_ansi("\n".join(err.get("traceback", []))) if err else self.traceback

    def data(self, mime: str = "text/plain") -> list[Any]:
        """The ``mime`` payloads of every display_data, execute_result and update_display_data, in
        order."""
        return [
            o["data"][mime]
            for o in self.log
            if o["output_type"] in ("display_data", "execute_result", "update_display_data")
            and mime in o.get("data", {})
        ]


class _Recorder:
    """Turns one cell's iopub output messages into its :class:`CellResult`, as a notebook front end
    would."""

    KINDS = ("stream", "display_data", "execute_result", "error")

    def __init__(self, result: CellResult):
        self.result = result
        self.displays: dict[str, list[int]] = {}  # display_id -> indexes in result.outputs
        self.clear_at_next = False

    def add(self, msg: dict) -> None:
        from nbformat.v4 import output_from_msg

        res = self.result
        kind, content = msg["msg_type"], msg["content"]
        transient = content.get("transient") or {}
        if kind == "clear_output":
            res.log.append({"output_type": "clear_output", "wait": bool(content.get("wait"))})
            if content.get("wait"):
                self.clear_at_next = True
            else:
                self._clear()
        elif kind == "update_display_data":
            data, metadata = content.get("data", {}), content.get("metadata", {})
            res.log.append(
                {"output_type": kind, "data": data, "metadata": metadata, "transient": transient}
            )
            # no display id: it updates nothing
            for i in self.displays.get(cast(str, transient.get("display_id")), []):
                res.outputs[i]["data"], res.outputs[i]["metadata"] = data, metadata
        elif kind in self.KINDS:
            if self.clear_at_next:
                self._clear()
            out = output_from_msg(msg)
            entry = dict(out)
            if transient:
                entry["transient"] = transient
            res.log.append(entry)
            last = res.outputs[-1] if res.outputs else None
            if (
                kind == "stream"
                and last is not None
                and last.get("output_type") == "stream"
                and last.get("name") == out.get("name")
            ):
                last["text"] += out["text"]
                return
            if transient.get("display_id"):
                self.displays.setdefault(transient["display_id"], []).append(len(res.outputs))
            res.outputs.append(out)

    def _clear(self) -> None:
        self.result.outputs.clear()
        self.displays.clear()
        self.clear_at_next = False


class KernelCellError(AssertionError):
    """Code run through :meth:`GpuKernel.execute` raised (or timed out); the message carries the
    traceback."""

    def __init__(self, result: CellResult):
        what = (
            "timed out and was interrupted"
            if result.timed_out
            else f"raised {result.ename}: {result.evalue}"
        )
        super().__init__(
            f"The code {what}.\n--- code ---\n{result.code}\n--- traceback ---\n{result.traceback}"
        )
        self.result = result


class GpuKernel:
    """A real IPython kernel (jupyter_client) pointed at a pool, with ``%load_ext jupyter_gpu``
    run.

    The one driver of a kernel for users' tests (``gpu_kernel``), this project's tests and its benchmarks::

        with GpuKernel(pool) as k:                    # start() ... stop()
            k.execute("%%gpu\\nx = 1")                # raises KernelCellError if the code raises
            res = k.run("%%gpu\\n1 / 0")              # never raises for the cell's error: res.error
            msg = k.submit("%%gpu\\nimport time\\nprint('go', flush=True)\\ntime.sleep(60)")
            k.wait_for_output(msg, "go"); k.interrupt(); res = k.collect(msg)

        ``user`` and ``env`` go into the kernel's environment (``JUPYTER_GPU_USER``, anything else),
        over
    :func:`kernel_env`'s; ``pool`` may be None to leave ``JUPYTER_GPU_SCHEDULER`` as the environment has it.
        ``shutdown()`` ends the kernel; ``stop()`` also makes sure, through the broker, that it left
        no lease.
    """

    def __init__(
        self,
        pool: str | None,
        cwd: str | None = None,
        kernel_name: str = "python3",
        load_extension: bool = True,
        default_timeout: float | None = 120.0,
        user: str | None = None,
        env: dict[str, str] | None = None,
        account: str | None = None,
    ):
        self.pool = pool
        self.cwd = cwd or os.getcwd()
        self.kernel_name = kernel_name
        self.load_extension = load_extension
        self.default_timeout = default_timeout
        self.user = user
        self.env = dict(env or {})
        # run the kernel process as this OS account (the caller must be root)
        self.account = account
        self.directory = kernel_directory()
        self.kernel_id, self._km_kwargs = manager_kwargs(self.directory, kernel_name)
        self.km: Any = None
        self.kc: Any = None
        self.leftovers: list[str] = []
        self.start_s = float("nan")  # seconds from starting the kernel process to its being ready
        self._sent: dict[str, tuple[str, float]] = {}  # msg_id -> (code, perf_counter when sent)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "GpuKernel":
        """Start the kernel, wait until it answers, and (``load_extension``) run ``%load_ext
        jupyter_gpu``."""
        from jupyter_client.manager import KernelManager

        extra = {USER_ENV: self.user} if self.user else {}
        extra.update(self.env)
        started = time.perf_counter()
        launch: dict[str, Any] = {}
        # a user's kernel as that user runs it: their uid, groups, home
        if self.account is not None:
            import pwd

            entry = pwd.getpwnam(self.account)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
            launch = {
                "user": entry.pw_uid,
                "group": entry.pw_gid,
                "extra_groups": os.getgrouplist(entry.pw_name, entry.pw_gid),
                "umask": 0o077,
            }
            extra = {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name, **extra}
            self.km = _AccountKernelManager(account=(entry.pw_uid, entry.pw_gid), **self._km_kwargs)
        else:
            self.km = KernelManager(**self._km_kwargs)
        self.km.start_kernel(env=kernel_env(self.pool, extra=extra), cwd=self.cwd, **launch)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.start_s = time.perf_counter() - started
        if self.load_extension:
            self.execute("%load_ext jupyter_gpu")
        log.info("kernel %s ready in %.1f s (pool %s)", self.kernel_id, self.start_s, self.pool)
        return self

    def alive(self) -> bool:
        return self.km is not None and self.km.is_alive()

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def shutdown(self, now: bool = False) -> None:
        """End the kernel (``now``: kill it instead of asking it to exit); safe to call twice."""
        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
            self.kc = None
        if self.km is not None:
            try:
                self.km.shutdown_kernel(now=now)
            except Exception:
                log.debug("shutting down kernel %s", self.kernel_id, exc_info=True)
            self.km = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def stop(self, now: bool = False) -> list[str]:
        """Shut the kernel down, then make sure the pool holds nothing for it; returns what had to
        be ended."""
        from jupyter_gpu.headless.pool import release_kernel_leases

        self.shutdown(now=now)
        self.leftovers = release_kernel_leases(self.pool, self.kernel_id) if self.pool else []
        return self.leftovers

    def __enter__(self) -> "GpuKernel":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ cells
    def execute(
        self,
        code: str,
        timeout: float | None = None,
        allow_error: bool = False,
        record: bool = True,
    ) -> CellResult:
        """Run ``code`` as a notebook cell; raise :class:`KernelCellError` if it raises (unless
        ``allow_error``).

                Past ``timeout`` (default ``default_timeout``) the kernel is interrupted, as a cell
                timeout does: the magic stops the remote work, and the result is ``timed_out``.
        """
        result = self.collect(self.submit(code), timeout, interrupt=True, record=record)
        if result.status == "error" and not allow_error:
            raise KernelCellError(result)
        return result

    def run(
        self,
        code: str,
        timeout: float | None = None,
        *,
        interrupt: bool = False,
        record: bool = True,
    ) -> CellResult:
        """Run ``code`` and return its result whatever it did: a cell's error is ``result.error``.

        A cell still running after ``timeout`` raises :class:`TimeoutError` (or, with
        ``interrupt``, is interrupted as in :meth:`execute`). ``record=False`` skips
        building outputs: the cheapest way to time a cell (``elapsed``).
        """
        return self.collect(self.submit(code), timeout, interrupt=interrupt, record=record)

    def submit(self, code: str) -> str:
        """Send ``code`` to run without waiting (interrupt tests); returns its id for
        :meth:`collect`."""
        sent = time.perf_counter()
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        self._sent[msg_id] = (code, sent)
        return msg_id

    def collect(
        self,
        msg_id: str,
        timeout: float | None = None,
        *,
        interrupt: bool = False,
        record: bool = True,
    ) -> CellResult:
        """The outputs of the cell ``msg_id`` from here until the kernel is idle again, and its
        reply.

                What :meth:`wait_for_output` already read is not repeated. Past ``timeout`` (default
                ``default_timeout``): :class:`TimeoutError`, or with ``interrupt`` the kernel is
                interrupted and the result marked ``timed_out`` (:class:`TimeoutError` only if the
                cell does not stop then either).
        """
        from jupyter_gpu.common import config

        code, sent = self._sent.pop(msg_id, ("", time.perf_counter()))
        timeout = self.default_timeout if timeout is None else timeout
        result = CellResult(code=code)
        recorder = _Recorder(result) if record else None
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            wait = 0.5 if deadline is None else max(0.05, min(0.5, deadline - time.monotonic()))
            try:
                msg = self.kc.get_iopub_msg(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    if not interrupt:
                        raise TimeoutError(
                            f"the cell still ran after {timeout:g} s\n--- code ---\n{code}\n"
                            f"--- its stdout so far ---\n{result.stdout[-2000:]}"
                        ) from None
                    if result.timed_out:
                        raise TimeoutError(
                            f"the kernel did not stop within {timeout:g} s, nor after an interrupt"
                        ) from None
                    self.km.interrupt_kernel()
                    result.timed_out = True
                    deadline = time.monotonic() + config.get_seconds("interrupt-grace") + 15
                if not self.km.is_alive():
                    raise RuntimeError("the kernel died while running the code") from None
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status":
                if msg["content"].get("execution_state") == "idle":
                    break
            elif recorder is not None:
                recorder.add(msg)
        result.elapsed = time.perf_counter() - sent
        content = self._reply(msg_id).get("content", {})
        result.status = content.get("status", "error")
        result.execution_count = content.get("execution_count")
        if result.status == "error":
            result.ename, result.evalue = content.get("ename"), content.get("evalue")
            result.traceback = strip_ansi("\n".join(content.get("traceback", [])))
        return result

    def wait_for_output(self, msg_id: str, needle: str, timeout: float = 120.0) -> CellResult:
        """Read the running cell ``msg_id``'s outputs until ``needle`` appears in its stdout;
        returns them. The default ``timeout`` leaves room for a first cell that starts a session
        on a loaded machine (30 s did not, with a CPU hog per core).

                Raises :class:`TimeoutError` if it does not appear in time, :class:`RuntimeError` if
                the cell ends first. :meth:`collect` then returns what the cell sends after this
                point.
        """
        code, sent = self._sent.get(msg_id, ("", time.perf_counter()))
        result = CellResult(code=code, status="running")
        recorder = _Recorder(result)
        deadline = time.monotonic() + timeout
        while needle not in result.stdout:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{needle!r} did not appear in the cell's stdout within {timeout:g} s\n"
                    f"--- code ---\n{code}\n--- its stdout so far ---\n{result.stdout[-2000:]}"
                )
            try:
                msg = self.kc.get_iopub_msg(timeout=min(0.5, left))
            except queue.Empty:
                if not self.km.is_alive():
                    raise RuntimeError("the kernel died while running the code") from None
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status":
                if msg["content"].get("execution_state") == "idle":
                    self._sent.pop(msg_id, None)
                    raise RuntimeError(
                        f"the cell ended before {needle!r} appeared in its stdout\n--- code ---\n"
                        f"{code}\n--- its stdout ---\n{result.stdout[-2000:]}\n--- error ---\n"
                        f"{result.error_text}"
                    )
                continue
            recorder.add(msg)
        result.elapsed = time.perf_counter() - sent
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
        return {
            "content": {"status": "error", "ename": "TimeoutError", "evalue": "no execute_reply"}
        }
