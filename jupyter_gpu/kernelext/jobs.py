"""``%%gpu --async``: a handle for a cell that runs while the notebook goes on.

The cell's output is collected into one display in the cell that started it (updated live, whichever
cell runs now); the values it assigns land in the namespace when it finishes; ``job.result()``
blocks, ``await job`` awaits, and showing ``job`` later renders its state and output.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import html
import threading
import time
from collections.abc import Generator
from typing import Any

from IPython.display import DisplayHandle


class AsyncJob:
    """The handle an ``%%gpu --async`` cell returns."""

    def __init__(self, job_id: str, label: str):
        self.id, self.label = job_id, label
        self.state = "queued"
        self.detail = ""
        self.started = time.time()
        self.finished: float | None = None
        self.outputs: dict[str, Any] = {}
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._parts: list[tuple[str, Any]] = []  # ("stream", text) | ("bundle", data)
        self._lock = threading.Lock()
        self._handle = DisplayHandle()
        self._shown = False
        self._shown_in: int | None = None  # the execution count of the cell that shows it live
        self._last_render = 0.0
        self.cancel_requested = threading.Event()

    # ------------------------------------------------------------------ user API
    def result(self, timeout: float | None = None) -> Any:
        """The cell's last value once it finishes (raises the cell's error, if it failed)."""
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        """Stop the job: withdraw it from the queue or interrupt it (then kill after the grace
        period)."""
        self.cancel_requested.set()

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self._future).__await__()

    # ------------------------------------------------------------------ driven by the runner thread
    def set_state(self, state: str, detail: str = "") -> None:
        self.state, self.detail = state, detail
        self.render(force=True)

    def handle(self, msg: dict) -> None:
        op = msg.get("op")
        with self._lock:
            if op == "stream":
                self._parts.append(("stream", msg["text"]))
            elif op == "display":
                self._parts.append(("bundle", dict(msg["data"])))
            elif op == "clear":
                self._parts.clear()
            elif op == "metrics":
                self.detail = ", ".join(f"{k}={v}" for k, v in (msg.get("metrics") or {}).items())
        self.render()

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self.finished = time.time()
        if error is not None:
            self.state, self.detail = "failed", f"{type(error).__name__}: {error}"
            self._future.set_exception(error)
        else:
            self.state = "done"
            self._future.set_result(value)
        self.render(force=True)

    def show(self) -> None:
        self._handle.display(self._bundle(), raw=True)
        self._shown = True
        self._shown_in = _execution_count()

    def render(self, force: bool = False) -> None:
        if not self._shown or (not force and time.monotonic() - self._last_render < 0.2):
            return
        self._last_render = time.monotonic()
        self._handle.update(self._bundle(), raw=True)

    # ------------------------------------------------------------------ display
    def _status(self) -> str:
        end = self.finished or time.time()
        text = (
            f"%%gpu --async job {self.id} ({self.label}): {self.state}, {end - self.started:.1f} s"
        )
        return text + (f" — {self.detail}" if self.detail else "")

    def _bundle(self) -> dict:
        with self._lock:
            parts = list(self._parts)
        plain = [self._status()]
        rich = [f"<div class='jupyter-gpu-job'><b>{html.escape(self._status())}</b>"]
        for kind, item in parts:
            if kind == "stream":
                plain.append(item.rstrip("\n"))
                rich.append(f"<pre>{html.escape(item)}</pre>")
            elif "image/png" in item:
                png = item["image/png"]
                png = png if isinstance(png, str) else base64.b64encode(png).decode()
                rich.append(f"<img src='data:image/png;base64,{png}'/>")
                plain.append(item.get("text/plain", "<image>"))
            elif "text/html" in item:
                rich.append(item["text/html"])
                plain.append(item.get("text/plain", ""))
            else:
                plain.append(item.get("text/plain", ""))
                rich.append(f"<pre>{html.escape(str(item.get('text/plain', '')))}</pre>")
        rich.append("</div>")
        return {"text/plain": "\n".join(plain), "text/html": "".join(rich)}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return self._bundle()

    def _ipython_display_(self) -> None:
        """The handle as a cell's value: in the cell that started the job, nothing more (its live
        display is there already; the value shown as ``Out[n]`` kept the state of the moment the
        cell ended, so the cell read "running" above and "queued" below, for good); later, the job
        as it is then."""
        if self._shown and self._shown_in == _execution_count():
            return
        from IPython.display import display

        display(self._bundle(), raw=True)


def _execution_count() -> int | None:
    """The running cell's execution count (None outside IPython)."""
    from IPython import get_ipython

    shell = get_ipython()
    return None if shell is None else int(shell.execution_count)
