"""Showing what a remote cell produced as ordinary outputs of the local cell.

Streams become stream outputs, remote ``display()`` calls become display_data (updates and
``clear_output`` included), metrics from ``jupyter_gpu.report`` drive a live progress display, and remote
exceptions are rebuilt as real exceptions whose traceback shows the cell's own lines.
"""

from __future__ import annotations

import html
import linecache
import pickle
import sys
import time
from typing import Any

from IPython.display import DisplayHandle, clear_output, publish_display_data

from jupyter_gpu.errors import RemoteError


class CellRenderer:
    """Renders one cell's message stream in the kernel (main thread, or a job's display for --async)."""

    def __init__(self) -> None:
        self.progress: ProgressDisplay | None = None

    def handle(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "stream":
            stream = sys.stdout if msg.get("name") == "stdout" else sys.stderr
            stream.write(msg["text"])
            stream.flush()
        elif op == "display":
            publish_display_data(dict(msg["data"]), dict(msg.get("metadata") or {}),
                                 transient=dict(msg.get("transient") or {}), update=bool(msg.get("update")))
        elif op == "clear":
            clear_output(wait=bool(msg.get("wait")))
        elif op == "metrics":
            if self.progress is None:
                self.progress = ProgressDisplay()
            self.progress.add(msg)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.render(final=True)


class ProgressDisplay:
    """A live, throttled progress line (steps, loss sparkline, rate per rank) for ``jupyter_gpu.report``."""

    def __init__(self, min_interval: float = 0.25):
        self.handle = DisplayHandle()
        self.shown = False
        self.history: dict[int, list[dict]] = {}
        self.min_interval = min_interval
        self.last_render = 0.0

    def add(self, msg: dict) -> None:
        self.history.setdefault(int(msg.get("rank") or 0), []).append(msg)
        if time.monotonic() - self.last_render >= self.min_interval:
            self.render()

    def bundle(self) -> dict:
        lines, rows = [], []
        for rank, items in sorted(self.history.items()):
            last = items[-1]
            metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in (last.get("metrics") or {}).items())
            rate = _rate(items)
            step = last.get("step")
            text = f"rank {rank}: step {step if step is not None else len(items)}" + (f", {metrics}" if metrics else "")
            samples = (last.get("metrics") or {}).get("samples")
            if rate and isinstance(samples, (int, float)):
                text += f", {rate * samples:.0f} samples/s"  # report(samples=batch size) gives throughput
            elif rate:
                text += f", {rate:.1f} steps/s"
            lines.append(text)
            losses = [m["metrics"].get("loss") for m in items if isinstance((m.get("metrics") or {}).get("loss"), (int, float))]
            rows.append(f"<tr><td>rank {rank}</td><td>{html.escape(text.split(': ', 1)[1])}</td>"
                        f"<td>{_sparkline(losses)}</td></tr>")
        return {"text/plain": "\n".join(lines),
                "text/html": "<table class='jupyter-gpu-progress'>" + "".join(rows) + "</table>"}

    def render(self, final: bool = False) -> None:
        self.last_render = time.monotonic()
        if not self.shown:
            self.handle.display(self.bundle(), raw=True)
            self.shown = True
        else:
            self.handle.update(self.bundle(), raw=True)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _rate(items: list[dict]) -> float | None:
    if len(items) < 2:
        return None
    span = items[-1]["time"] - items[0]["time"]
    return (len(items) - 1) / span if span > 0 else None


def _sparkline(values: list[float], width: int = 160, height: int = 28) -> str:
    if len(values) < 2:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    pts = " ".join(f"{i * width / (len(values) - 1):.1f},{height - (v - lo) / span * height:.1f}"
                   for i, v in enumerate(values[-200:]))
    return (f"<svg width='{width}' height='{height}'><polyline fill='none' stroke='currentColor' "
            f"points='{pts}'/></svg>")


def register_cell_source(cell_name: str, code: str) -> None:
    """Make the remote cell's file name resolve to its source in this kernel, for tracebacks."""
    lines = code.splitlines(keepends=True)
    linecache.cache[cell_name] = (len(code), None, lines, cell_name)


def rebuild_exception(error: dict) -> BaseException:
    """The remote exception as a real exception (original type where importable) with the remote
    traceback attached, so the kernel's traceback shows the cell's own lines."""
    exc: BaseException | None = None
    if error.get("pickled"):
        try:
            exc = pickle.loads(error["pickled"])
        except Exception:
            exc = None
    if exc is None:
        if error.get("type") == "jupyter_gpu.errors.GpuPoolError":
            from jupyter_gpu.errors import GpuPoolError

            exc = GpuPoolError(error.get("message", ""))
        elif error.get("type") == "builtins.KeyboardInterrupt":
            exc = KeyboardInterrupt()
        else:
            exc = RemoteError(error.get("type", "Exception"), error.get("message", ""))
    tb_dict = error.get("traceback")
    if tb_dict:
        try:
            from tblib import Traceback

            exc = exc.with_traceback(Traceback.from_dict(_lists(tb_dict)).as_traceback())
        except Exception:
            pass
    return exc


def _lists(obj: Any) -> Any:
    """msgpack gives tuples; tblib wants its dicts as it made them."""
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_lists(v) for v in obj]
    return obj
