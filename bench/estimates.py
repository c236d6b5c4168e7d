"""The queue's estimated start on a replay: predicted against actual start, for cells that never
report progress.

Drives the broker's own ``Ledger`` and ``FairSharePolicy`` (so ``broker/estimates.py`` as the
broker runs it) with a reproducible notebook workload on simulated time: users whose cells run for a
length typical of the user (each user's median drawn between 5 s and 2 min; each cell lognormal
around it) with think times between cells (mostly 15 s, sometimes 3 min); a session holds its lease
for its notebook's life (about 20 cells, then it is released and its user is away for about 10
minutes) and is moved to host memory when idle ``suspend-idle-after`` seconds while someone waits;
a user whose session was moved asks again at their next cell, and waits. No cell calls
``report()``.

For every request that waited, the estimate is sampled when it joins the queue and every few
seconds while it waits, and compared with when it really started. Two estimators read the same
run: the broker's (``estimates.py``: the user's or the pool's recent cell lengths, holding still)
and, as the anchor, the one it replaced (the median of recent *lease* lengths; a lease past it was
expected to last as long again as its age). Printed: how often the first estimate is unknown, the
absolute error of the first and of all estimates (p50, p90; ratio to the anchor), how often an
estimate rose while its request waited (later by more than 5 s or a tenth of the wait left), and
how many of those rises said why (the broker's note starts with "ran past the ... expected" or
"later than before: ...").

    python bench/estimates.py            # 8 simulated hours, 4 seeds (about a minute)
    python bench/estimates.py --quick    # 2 hours, 1 seed (seconds)
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import random
import statistics
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._common import header, percentile, table
from jupyter_gpu.broker.estimates import RAISE_SLACK, LeaseEnd, estimate_start
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import GpuSlot, Request
from jupyter_gpu.broker.preemption import suspend_plan
from jupyter_gpu.broker.quotas import PoolQuotas
from jupyter_gpu.common.protocol import RequestSpec

GiB = 2**30
SAMPLE_EVERY = 5.0  # seconds between two readings of a waiting request's estimate


@dataclass
class User:
    name: str
    median: float  # this user's typical cell length, seconds
    lease: str | None = None
    running_until: float | None = None
    next_cell: float = 0.0
    request: Request | None = None
    cells_left: int = 0  # in this notebook; then its session is released and the user is away


@dataclass
class Waited:
    """One request that waited: its estimates as read while it waited, and when it started."""

    submitted: float
    new: list[tuple[float, float | None, str, str]] = field(
        default_factory=list
    )  # t, eta, basis, note
    old: list[tuple[float, float | None]] = field(default_factory=list)
    started: float | None = None


class Replay:
    def __init__(self, users: int, gpus: int, suspend_after: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.policy = FairSharePolicy(PoolQuotas(suspend_idle_after=suspend_after))
        self.policy.clock = lambda: self.now
        self._ids = 0
        self.ledger = Ledger(
            self.policy, clock=lambda: self.now, new_id=self._new_id, sessions_start_idle=True
        )
        slots = [
            GpuSlot(worker="w0", index=i, uuid=f"G{i}", name="g", total_bytes=16 * GiB)
            for i in range(gpus)
        ]
        self.ledger.set_worker_gpus("w0", slots)
        self.users = [
            User(f"u{i}", math.exp(self.rng.uniform(math.log(5.0), math.log(120.0))))
            for i in range(users)
        ]
        for u in self.users:
            u.next_cell = self.rng.uniform(0.0, 600.0)
            u.cells_left = self.notebook_cells()
        self.waited: dict[str, Waited] = {}
        self.lease_lengths: collections.deque[float] = collections.deque(maxlen=200)
        self.owner: dict[str, User] = {}

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids}"

    def cell_length(self, u: User) -> float:
        return max(0.5, self.rng.lognormvariate(math.log(u.median), 0.6))

    def think_time(self) -> float:
        """Mostly a quick look at the output, sometimes a read or an edit of a few minutes."""
        return self.rng.expovariate(1 / (15.0 if self.rng.random() < 0.8 else 180.0))

    def notebook_cells(self) -> int:
        return 1 + int(self.rng.expovariate(1 / 20.0))

    def release(self, u: User) -> None:
        """The notebook is done: its session is released, its user away for a while."""
        assert u.lease is not None
        lease = self.ledger.end(u.lease, "released", now=self.now)
        if lease is not None:
            self.lease_lengths.append(self.now - lease.started)
        self.owner.pop(u.lease, None)
        u.lease, u.cells_left = None, self.notebook_cells()
        u.next_cell = self.now + self.rng.expovariate(1 / 600.0)

    def start_cell(self, u: User) -> None:
        assert u.lease is not None
        self.policy.lease_state(u.lease, "running", now=self.now)
        u.running_until = self.now + self.cell_length(u)

    def _preempt(self, lease_id: str, reason: str, req: Request) -> None:
        lease = self.ledger.end(lease_id, reason, now=self.now)
        if lease is not None:
            self.lease_lengths.append(self.now - lease.started)
            self.owner.pop(lease_id).lease = None  # its next cell asks for a GPU again

    def step(self, sample: bool) -> None:
        for u in self.users:
            if u.running_until is not None and u.running_until <= self.now:
                assert u.lease is not None
                self.policy.lease_state(u.lease, "idle", now=self.now)
                u.running_until = None
                u.cells_left -= 1
                if u.cells_left <= 0:
                    self.release(u)
                else:
                    u.next_cell = self.now + self.think_time()
            elif u.running_until is None and u.request is None and u.next_cell <= self.now:
                if u.lease is not None:
                    self.start_cell(u)
                else:
                    u.request = Request(
                        id=self._new_id("R"),
                        user=u.name,
                        kernel=u.name,
                        client=None,
                        spec=RequestSpec(fraction=0.5),
                        submitted=self.now,
                    )
                    self.ledger.submit(u.request)
        for req, leases in self.ledger.schedule(self._preempt, now=self.now):
            u = next(x for x in self.users if x.request is req)
            u.request, u.lease = None, leases[0].id
            self.owner[u.lease] = u
            if req.id in self.waited:
                self.waited[req.id].started = self.now
            self.start_cell(u)
        self.ledger.view.refresh(self.now, force=True)  # what a kernel would read now
        for req in self.ledger.queue:
            record = self.waited.setdefault(req.id, Waited(req.submitted))
            if sample or not record.new:
                record.new.append((self.now, req.eta, req.eta_basis or "", req.eta_note or ""))
                record.old.append((self.now, self.old_estimate(req)))

    def old_estimate(self, req: Request) -> float | None:
        """The estimator ``estimates.py`` replaced: leases end after the median of recent lease
        lengths, or as long again as their age once past it; idle sessions moving out as today."""
        gpus = list(self.ledger.gpus.values())
        eta: float | None = None
        if self.lease_lengths:
            typical = statistics.median(self.lease_lengths)
            ends: dict[str, list[LeaseEnd]] = collections.defaultdict(list)
            for rec in self.policy.leases.values():
                age = self.now - rec.started
                at = rec.started + typical if age < typical else self.now + age
                for gpu_id, nbytes in rec.allocs.items():
                    ends[gpu_id].append(LeaseEnd(at, nbytes, "unknown", ""))
            eta = estimate_start(req.spec, gpus, ends, self.now)[0]
        later = suspend_plan(self.policy, req, self.ledger.gpus, self.now, after=0.0)
        after = self.policy.quotas.suspend_idle_after
        if later and after is not None:
            idle = [self.policy.leases[lid].idle_since or self.now for lid, _ in later]
            at = max(max(idle) + after, self.now)
            eta = at if eta is None else min(eta, at)
        return eta

    def run(self, hours: float) -> list[Waited]:
        next_sample = 0.0
        while self.now < hours * 3600:
            sample = self.now >= next_sample
            if sample:
                next_sample = self.now + SAMPLE_EVERY
            self.step(sample)
            self.now += 1.0
        return [w for w in self.waited.values() if w.started is not None]


def errors(waited: list[Waited], which: str) -> dict:
    """First and all estimates' absolute errors, unknowns, and rises while waiting."""
    first, every, unknown_first, unknown_all, rises, explained = [], [], 0, 0, 0, 0
    for w in waited:
        assert w.started is not None
        readings = w.new if which == "new" else [(t, eta, "", "") for t, eta in w.old]
        for i, (_t, eta, basis, note) in enumerate(readings):
            if eta is None:
                unknown_all += 1
                unknown_first += i == 0
                continue
            (first if i == 0 else every).append(abs(eta - w.started))
        known = [(t, eta, note) for t, eta, _b, note in readings if eta is not None]
        for (t, a, _), (_, b, note) in zip(known, known[1:]):
            if b > a + max(RAISE_SLACK, 0.1 * (a - t)):  # later by more than the noise
                rises += 1
                explained += note.startswith(("ran past", "later than before"))
    every += first
    n = sum(len(w.new) for w in waited)
    return {
        "unknown_first": unknown_first / max(1, len(waited)),
        "unknown_all": unknown_all / max(1, n),
        "first": first,
        "all": every,
        "rises": rises,
        "explained": explained,
    }


def by_basis(waited: list[Waited]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = collections.defaultdict(list)
    for w in waited:
        for _t, eta, basis, _note in w.new:
            if eta is not None and w.started is not None:
                out[basis].append(abs(eta - w.started))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 simulated hours, one seed")
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--gpus", type=int, default=2, help="16 GiB GPUs; every session asks 0.5")
    parser.add_argument("--suspend-after", type=float, default=60.0, help="suspend-idle-after, s")
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args(argv)
    hours = 2.0 if args.quick else 8.0
    seeds = args.seeds or (1 if args.quick else 4)
    header("estimates", args.quick)
    print(
        f"{args.users} users, {args.gpus} GPUs (sessions of 0.5 GPU), suspend-idle-after "
        f"{args.suspend_after:g} s, {hours:g} simulated hours x {seeds} seed(s); no cell reports "
        "progress"
    )
    waited: list[Waited] = []
    for seed in range(seeds):
        waited += Replay(args.users, args.gpus, args.suspend_after, seed).run(hours)
    old, new = errors(waited, "old"), errors(waited, "new")

    def pct(values: list[float], q: float) -> str:
        return f"{percentile(values, q):.0f} s" if values else "-"

    def ratio(a: list[float], b: list[float], q: float) -> str:
        if not a or not b or percentile(b, q) == 0:
            return "-"
        return f"{percentile(a, q) / percentile(b, q):.2f}"

    rows = []
    for name, e in (("lease lengths (before; anchor)", old), ("cell lengths (estimates.py)", new)):
        rows.append(
            [
                name,
                f"{e['unknown_first']:.0%}",
                f"{pct(e['first'], 50)} / {pct(e['first'], 90)}",
                f"{pct(e['all'], 50)} / {pct(e['all'], 90)}",
                ratio(e["all"], old["all"], 50),
                f"{e['rises'] / max(1, len(waited)):.2f}",
                f"{e['explained']} of {e['rises']}",
            ]
        )
    table(
        f"Estimated start vs actual start, {len(waited)} requests that waited "
        f"(readings every {SAMPLE_EVERY:g} s while waiting)",
        [
            "estimator",
            "first unknown",
            "first: |error| p50 / p90",
            "all: |error| p50 / p90",
            "p50 ratio to anchor",
            "rises per request",
            "rises that say why",
        ],
        rows,
    )
    basis_rows = [
        [basis, len(v), f"{pct(v, 50)} / {pct(v, 90)}"]
        for basis, v in sorted(by_basis(waited).items(), key=lambda kv: -len(kv[1]))
    ]
    basis_rows.append(["unknown (no number shown)", f"{new['unknown_all']:.0%} of readings", "-"])
    table(
        "The broker's estimates by what they rest on",
        ["basis", "readings", "|error| p50 / p90"],
        basis_rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
