"""The ``--workers`` runs the broker keeps for the panel: how each stands, and its ranks' metrics.

Why the broker keeps them: a run's ranks live on several workers and report through them
(``gpu_run_metrics``), and its kernel says how the run stands (``gpu_run_update``); the panel of
any user shows the latest runs live, and replays their curves when it opens. Only the latest
``RUNS_KEPT`` runs and each rank's last 1000 reports are kept; what is kept is plain JSON (NaN and
infinities as text: one would break the panel's parse for everyone).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

from jupyter_gpu.broker.model import Lease
from jupyter_gpu.common.protocol import MetricsItem, RunUpdate, RunView
from jupyter_gpu.common.refusals import NotYours

RUNS_KEPT = 50  # the latest runs' streams, for the panel's replay
POINTS_KEPT = 1000  # per rank


class RunBook:
    """Run id -> ``RunView``, oldest first."""

    def __init__(self) -> None:
        self.runs: dict[str, RunView] = {}

    def _record(self, run: str) -> RunView:
        return self.runs.setdefault(run, {"id": run, "ranks": {}, "started": time.time()})

    def update(self, run: str, update: RunUpdate) -> None:
        """What a kernel says of its run (its fields, checked: ``gpu_run_update``); a run that ends
        (done, failed, stopped) gets its end time."""
        record = self._record(run)
        given = {k: v for k, v in update.items() if v is not None}
        if record.get("user") is not None:
            given.pop("user", None)  # a run stays its first reporter's
        record.update(cast(RunView, given))
        state = update.get("state")
        if state is not None:
            record["ended"] = time.time() if state != "running" else None
        # keep the latest runs' streams for replay, not every run forever
        while len(self.runs) > RUNS_KEPT:
            self.runs.pop(next(iter(self.runs)))

    def owner(self, run: str) -> str | None:
        """Who reported the run first (None: nobody yet, or a run kept from before names)."""
        known = self.runs.get(run)
        return known.get("user") if known is not None else None

    def check_reporter(
        self, run: str, user: str | None, leases: Iterable[str], live: Mapping[str, Lease]
    ) -> None:
        """In a shared pool, a run is its first reporter's, and it names only that user's leases
        (``NotYours`` otherwise: a run forged under another's name, or posing as his ranks)."""
        owner = self.owner(run)
        if owner is not None and owner != user:
            raise NotYours(f"run {run} belongs to another user; you can report only your own")
        for lease in leases:
            ls = live.get(lease)
            if ls is not None and ls.user != user:
                raise NotYours(f"{lease} belongs to another user; a run names only your leases")

    def may_report(self, run: str, rank: int, lease: Lease | None) -> bool:
        """Only a live lease of the run (as its kernel declared it) may add to it, as its own
        rank."""
        if lease is None or lease.rank != rank:
            return False
        known = self.runs.get(run)
        return known is None or lease.id in (known.get("leases") or ())

    def add_metrics(self, run: str, rank: int, items: Iterable[MetricsItem]) -> None:
        stream = self._record(run).setdefault("ranks", {}).setdefault(str(rank), [])
        stream.extend(
            {**item, "metrics": plain_metrics(item.get("metrics") or {})} for item in items
        )
        del stream[:-POINTS_KEPT]

    def views(self) -> list[RunView]:
        return list(self.runs.values())


def plain_metrics(metrics: dict[Any, Any]) -> dict[str, Any]:
    """What the panel can show as JSON: numbers, text, true/false and null; NaN and infinities as
    text (JSON has no NaN: one would break the panel's parse for everyone), anything else by its
    repr, cut short."""
    plain: dict[str, Any] = {}
    for key, value in list(metrics.items())[:64]:
        if isinstance(value, float) and not math.isfinite(value):
            value = repr(value)
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            value = repr(value)
        plain[str(key)[:64]] = value[:200] if isinstance(value, str) else value
    return plain
