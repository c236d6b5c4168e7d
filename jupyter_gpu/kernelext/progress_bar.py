"""The live progress of a ``%%gpu`` cell, from what it reports with ``jupyter_gpu.report`` (or
tqdm).

What a data scientist expects from a training loop: a bar with the share done, the rate and the time
left when a ``total`` is known, the last metrics, and a loss curve. In JupyterLab (a widget
frontend) it is an ipywidgets bar updated in place through the widgets' comms (its text and HTML
version, written at the end, is what a saved notebook keeps); in the headless runs that this project
starts (``jupyter-gpu run``, the pytest plugin, ``GpuKernel``: no widget frontend) it is that text
and HTML, updated in place.

Counting: steps per second comes from the reported step numbers, not from how often ``report`` is
called (a loop that reports every 10th step runs ten times faster than its calls). A loop that
reports ``step=0`` first counts from zero, so its last step ``total - 1`` is shown as
``total/total`` done. tqdm bars (the session turns them into reports, ``session/tqdm_bridge.py``)
report how many iterations are done.
"""

from __future__ import annotations

import html
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from IPython.display import DisplayHandle

log = logging.getLogger(__name__)

MAX_POINTS = 400  # a loss curve keeps at most this many points, thinned evenly however long the run
# : ``text`` in a kernel's environment: show progress as text, updated in place (headless runs set it:
# : ``headless/kernel.py``); otherwise a kernel with comms shows ipywidgets
PROGRESS_ENV = "JUPYTER_GPU_PROGRESS"


class Series:
    """A bounded, evenly thinned series: every ``stride``-th value, the stride doubling when it
    is full.

        Why: a run may report a million times; the curve must keep its whole shape in a fixed size."""

    def __init__(self, limit: int = MAX_POINTS):
        self.limit = limit
        self.values: list[float] = []
        self.stride = 1
        self._seen = 0

    def add(self, value: float) -> None:
        if self._seen % self.stride == 0:
            self.values.append(value)
            if len(self.values) > self.limit:
                self.values = self.values[::2]
                self.stride *= 2
        self._seen += 1


@dataclass
class Bar:
    """One progress line: a rank's reports (or one tqdm bar of a rank)."""

    rank: int
    name: str | None
    first_step: float | None = None
    first_time: float | None = None
    step: float | None = None
    time: float | None = None
    total: float | None = None
    count: int = 0
    counts_done: bool = False  # tqdm: the step is how many are done, not an index
    metrics: dict = field(default_factory=dict)
    loss: Series = field(default_factory=Series)

    def add(self, msg: dict) -> None:
        metrics = dict(msg.get("metrics") or {})
        step = msg.get("step")
        self.count += 1
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            step = self.count  # no step numbers: each report is a step
        at = msg.get("time")
        if not isinstance(at, (int, float)):
            at = time.time()
        if self.first_step is None:
            self.first_step, self.first_time = float(step), float(at)
        self.step, self.time = float(step), float(at)
        self.counts_done = self.counts_done or bool(metrics.pop("_done", False))
        metrics.pop("_bar", None)
        total = metrics.pop("total", None)
        if isinstance(total, (int, float)) and not isinstance(total, bool) and total > 0:
            self.total = float(total)
        self.metrics = {k: v for k, v in metrics.items() if not str(k).startswith("_")}
        loss = self.metrics.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self.loss.add(float(loss))

    finished: bool = False  # the cell has ended

    @property
    def done(self) -> float | None:
        """Steps done: the last step, plus one when the loop counts from zero (it reported step 0,
        or it ended at step ``total - 1``: a resumed loop's first step is not 0)."""
        if self.step is None:
            return None
        if self.counts_done:
            return self.step
        ended_at_last_index = (
            self.finished and self.total is not None and self.step == self.total - 1
        )
        return self.step + 1 if self.first_step == 0 or ended_at_last_index else self.step

    @property
    def rate(self) -> float | None:
        """Steps per second, from the step numbers reported (None until two reports apart in
        time)."""
        if (
            self.first_time is None
            or self.time is None
            or self.step is None
            or self.first_step is None
        ):
            return None
        span = self.time - self.first_time
        if span <= 0 or self.step <= self.first_step:
            return None
        return (self.step - self.first_step) / span

    @property
    def fraction(self) -> float | None:
        if self.total is None or self.done is None:
            return None
        return max(0.0, min(1.0, self.done / self.total))

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate, when a total is known."""
        rate, done = self.rate, self.done
        if self.total is None or rate is None or done is None:
            return None
        return max(0.0, (self.total - done) / rate)

    def label(self) -> str:
        """``rank 0`` (``rank 0 · epochs`` for a named tqdm bar)."""
        return f"rank {self.rank}" + (f" · {self.name}" if self.name else "")

    def text(self, finished: bool = False) -> str:
        """``45/120 steps (38%) · 14.2 steps/s · 5 s left · loss=0.0463``."""
        self.finished = self.finished or finished
        parts = []
        done = self.done
        if done is not None:
            shown = (
                f"{_count(done)}/{_count(self.total)} steps"
                if self.total
                else f"step {_count(self.step)}"
            )
            if self.fraction is not None:
                shown += f" ({self.fraction:.0%})"
            parts.append(shown)
        rate = self.rate
        samples = self.metrics.get("samples")
        if rate and isinstance(samples, (int, float)) and not isinstance(samples, bool):
            # report(samples=batch size): throughput
            parts.append(f"{_count(rate * samples)} samples/s")
        elif rate:
            parts.append(f"{_count(rate) if rate >= 100 else f'{rate:.3g}'} steps/s")
        eta = self.eta
        if eta is not None and not finished and (self.fraction or 0) < 1:
            parts.append(f"{duration(eta)} left")
        parts += [f"{k}={_fmt(v)}" for k, v in self.metrics.items() if k != "samples"]
        return " · ".join(parts)


class ProgressDisplay:
    """The cell's progress lines (one per rank, and per tqdm bar), live; see the module
    docstring."""

    def __init__(self, min_interval: float = 0.25, widgets: bool | None = None):
        self.handle = DisplayHandle()
        self.shown = False
        self.bars: dict[tuple[int, str | None], Bar] = {}
        self.min_interval = min_interval
        self.last_render = 0.0
        self.finished = False
        self.view = WidgetView.create() if widgets is None or widgets else None

    def add(self, msg: dict) -> None:
        rank = int(msg.get("rank") or 0)
        name = (msg.get("metrics") or {}).get("_bar")
        key = (rank, str(name) if name is not None else None)
        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = Bar(rank, key[1])
        bar.add(msg)
        if time.monotonic() - self.last_render >= self.min_interval:
            self.render()

    def ordered(self) -> list[Bar]:
        return [self.bars[k] for k in sorted(self.bars, key=lambda k: (k[0], k[1] or ""))]

    def summary(self, rank: int) -> str | None:
        """A rank's last line (for the ``--workers`` badge): its first bar's text."""
        bars = [b for b in self.ordered() if b.rank == rank]
        return bars[0].text(finished=True) if bars else None

    def bundle(self) -> dict:
        bars = self.ordered()
        rows = []
        for bar in bars:
            meter = (
                f"<progress max='1' value='{bar.fraction:.4f}'></progress> "
                if bar.fraction is not None
                else ""
            )
            rows.append(
                f"<tr><td>{html.escape(bar.label())}</td><td>{meter}"
                f"{html.escape(bar.text(self.finished))}</td><td>{sparkline(bar.loss.values)}</td></tr>"
            )
        return {
            "text/plain": "\n".join(f"{b.label()}: {b.text(self.finished)}" for b in bars),
            "text/html": "<table class='jupyter-gpu-progress'>" + "".join(rows) + "</table>",
        }

    def render(self, final: bool = False) -> None:
        """Show or refresh the display. With widgets, the bars move through their comms and the
        display itself is written only at first and at the end (its text is what a saved notebook
        keeps)."""
        self.last_render = time.monotonic()
        self.finished = self.finished or final
        bundle = self.bundle()
        if self.view is not None:
            self.view.update(self.ordered(), self.finished)
            bundle = {**bundle, **self.view.mime()}
            if self.shown and not final:
                return
        if not self.shown:
            self.handle.display(bundle, raw=True)
            self.shown = True
        else:
            self.handle.update(bundle, raw=True)


class WidgetView:
    """The ipywidgets form of the progress: per bar a label, a progress bar and a line of text, and
    the loss curve below. Created only in a kernel that can talk to a widget frontend (ipykernel
    with comms)."""

    def __init__(self, widgets: Any) -> None:
        self.w = widgets
        self.box = widgets.VBox(layout=widgets.Layout(width="100%"))
        self.rows: dict[tuple[int, str | None], tuple[Any, Any, Any]] = {}
        self.curve = widgets.HTML()

    @classmethod
    def create(cls) -> WidgetView | None:
        # a headless run: nobody draws widgets, the text is kept
        if os.environ.get(PROGRESS_ENV) == "text":
            return None
        try:
            from IPython import get_ipython

            shell = get_ipython()
            if shell is None or getattr(shell, "kernel", None) is None:
                return None  # a plain IPython (a test, a terminal): no comms, no widgets
            import ipywidgets

            return cls(ipywidgets)
        except Exception as exc:  # noqa: BLE001 - widgets are a nicety; text always works
            log.debug("no progress widgets: %s", exc)
            return None

    def update(self, bars: list[Bar], finished: bool) -> None:
        w = self.w
        for bar in bars:
            key = (bar.rank, bar.name)
            if key not in self.rows:
                label = w.Label(bar.label(), layout=w.Layout(width="auto", min_width="4.5em"))
                meter = w.FloatProgress(min=0.0, max=1.0, value=0.0, layout=w.Layout(width="35%"))
                meter.add_class("jupyter-gpu-progress-bar")
                text = w.HTML(layout=w.Layout(width="auto"))
                self.rows[key] = (label, meter, text)
                # by rank (then bar name), whichever reported first: rank 1's row above rank 0's
                # when rank 1 happened to report first read as out of order
                ordered = sorted(self.rows, key=lambda k: (k[0], k[1] or ""))
                self.box.children = (*[w.HBox(self.rows[k]) for k in ordered], self.curve)
            _, meter, text = self.rows[key]
            fraction = bar.fraction
            if fraction is not None:
                meter.value = fraction
                meter.bar_style = "success" if finished and fraction >= 1 else ""
            else:
                meter.layout.visibility = "hidden"
            text.value = (
                f"<span class='jupyter-gpu-progress-text'>{html.escape(bar.text(finished))}</span>"
            )
        losses = next((b.loss.values for b in bars if len(b.loss.values) > 1), [])
        self.curve.value = (
            f"<div class='jupyter-gpu-progress-curve'>{sparkline(losses, 320, 40)}</div>"
        )

    def mime(self) -> dict:
        return {
            "application/vnd.jupyter.widget-view+json": {
                "version_major": 2,
                "version_minor": 0,
                "model_id": self.box.model_id,
            }
        }


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``: how long, as people say it."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _count(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:.3g}"


def _fmt(value: Any) -> str:
    """A metric as shown: 4 significant digits; zero as 0 (a loss of -0.0 read ``loss=-0``)."""
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.4g}"
    return str(value)


def sparkline(values: list[float], width: int = 160, height: int = 28) -> str:
    """An SVG polyline of ``values`` (all of them, scaled to the box), or nothing for fewer than
    two."""
    if len(values) < 2:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    step = width / (len(values) - 1)
    pts = " ".join(
        f"{i * step:.1f},{height - (v - lo) / span * height:.1f}" for i, v in enumerate(values)
    )
    return (
        f"<svg width='{width}' height='{height}' class='jupyter-gpu-sparkline'><title>loss</title>"
        f"<polyline fill='none' stroke='currentColor' points='{pts}'/></svg>"
    )
