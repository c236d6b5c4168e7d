"""tqdm inside a ``%%gpu`` cell renders as the cell's own progress bar.

Why: in a session, ``tqdm.auto`` sees a plain IPython shell, not a notebook kernel, and falls back
to the text bar, written to stderr: the notebook shows a red, half-rewritten line instead of the
widget users expect. So the session turns every tqdm bar into ``jupyter_gpu.report(step=n,
total=total)`` calls (at tqdm's own refresh rate), which the kernel shows as the same progress bar
as ``report`` gives, with the rate and time left, and which the panel and the queue's estimates use.
tqdm's own output is not written.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)


class _Discard(io.TextIOBase):
    """Where tqdm writes its text bar in a session: nowhere (the kernel shows the bar)."""

    def write(self, text: str) -> int:
        return len(text)


_NOWHERE = _Discard()


def install() -> bool:
    """Patch tqdm's base class (``tqdm``, ``tqdm.auto`` and ``trange`` use it; ``tqdm.notebook`` too
    when it is loaded already); False when tqdm is not installed."""
    try:
        import tqdm.std as std
    except ImportError:
        return False
    cls: Any = std.tqdm  # patched below
    if getattr(cls, "_jupyter_gpu", False):
        return True
    original_init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("file") in (None, sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            kwargs["file"] = _NOWHERE
        original_init(self, *args, **kwargs)

    def display(self: Any, msg: str | None = None, pos: int | None = None) -> bool:
        report_bar(self)
        return True

    cls.__init__ = __init__
    cls.display = display
    cls._jupyter_gpu = True
    notebook: Any = sys.modules.get("tqdm.notebook")
    # tqdm.notebook draws ipywidgets for a kernel's frontend, which a session has not: the same bar
    # (not imported here: it imports ipywidgets, which would slow every session's start)
    if notebook is not None:
        notebook.tqdm = notebook.tqdm_notebook = cls
        notebook.trange = std.trange
    return True


def report_bar(bar: Any) -> None:
    """One tqdm bar's state as a ``jupyter_gpu.report``: done (``_done``: n counts finished
    iterations), the total, the bar's name (its description, or its position when nested) and its
    postfix values."""
    from jupyter_gpu.session import api

    try:
        info = bar.format_dict
    except Exception:  # noqa: BLE001 - a bar closed under us
        return
    pos = abs(getattr(bar, "pos", 0) or 0)
    name = (info.get("prefix") or "").rstrip(": ") or (None if pos == 0 else f"bar {pos + 1}")
    metrics: dict[str, Any] = {"_done": True}
    if name is not None:
        metrics["_bar"] = name
    if info.get("total"):
        metrics["total"] = info["total"]
    metrics.update(_postfix(info.get("postfix")))
    api.report(step=info.get("n", 0), **metrics)


def _postfix(text: Any) -> dict[str, Any]:
    """``set_postfix(loss=0.5)`` arrives as ``"loss=0.5"``: back to values."""
    values: dict[str, Any] = {}
    if not isinstance(text, str):
        return values
    for part in text.split(", "):
        key, sep, value = part.partition("=")
        if sep and key.strip().isidentifier() and not key.startswith("_"):
            try:
                values[key.strip()] = float(value)
            except ValueError:
                values[key.strip()] = value.strip()
    return values
