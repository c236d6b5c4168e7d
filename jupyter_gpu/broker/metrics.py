"""The pool's Prometheus metrics, served with Dask's own on the scheduler's ``/metrics``.

Why here and this way: Dask's scheduler serves ``/metrics`` among its HTTP routes (on when
``jupyter-gpu.http`` is set: ``pool/listeners.py``), from collectors it registers with
``prometheus_client``'s registry (``distributed/http/scheduler/prometheus``). The broker adds one
more collector of the same kind (:class:`PoolCollector`, registered when the broker starts), so an
administrator's Prometheus scrapes one endpoint and finds Dask's figures and the pool's side by side,
under Dask's namespace (``dask_jupyter_gpu_*`` by default).

Two kinds of figures:

- what the pool *is* (GPU capacity, leased, busy, memory used; leases per user; the queue per team)
  is read from the broker's ``Ledger`` and samples when Prometheus scrapes, so it is never stale;
- what *happened* (leases granted, suspensions, restores, session starts and how long they took,
  queue waits, GPU-seconds) cannot be read back from the ledger, which keeps only recent history,
  so the broker tells :class:`PoolMetrics` as it happens and it keeps counters and histograms.
  Counters start at zero when the scheduler starts, as Prometheus expects (``rate()`` and
  ``increase()`` handle the reset); GPU-seconds count time since then only.

``prometheus_client`` is optional (as for Dask): without it nothing is registered and the broker
still counts.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import GpuSlot, Lease, Request
from jupyter_gpu.broker.sampling import GpuSamples
from jupyter_gpu.common.protocol import Sample

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

# seconds a request waited in the queue for its GPU: a warm cell waits none, a reclaim tens of
# seconds, a busy pool minutes
WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# seconds a session process took to start: a fork of the zygote is tens of ms, a cold interpreter
# that imports torch seconds, a restore of parked variables with it more
START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Observations counted per upper bound, and their sum (Prometheus's histogram, without the
    client library)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        value = max(0.0, float(value))
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, observations <= le)`` pairs, ending with ``+Inf``, as a histogram family takes
        them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip([*self.bounds, math.inf], self.counts):
            running += n
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), float(running)))
        return out


class PoolMetrics:
    """What the broker tells as it happens (see the module docstring); one per broker."""

    def __init__(self, ledger: Ledger, clock: Callable[[], float] = time.time):
        self.ledger = ledger
        self.clock = clock
        self.since = clock()  # GPU-seconds are counted from here
        # (user, team) -> count
        self.granted: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.suspensions: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.restores: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.gpu_seconds_ended: defaultdict[tuple[str, str], float] = defaultdict(float)
        # (team, outcome) -> count; team -> histogram
        self.session_starts: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.start_seconds: dict[str, Histogram] = {}
        self.queue_wait: dict[str, Histogram] = {}

    def team(self, user: str, team: str | None) -> str:
        return team or self.ledger.policy.quotas.team_of(user)

    # ------------------------------------------------------------------ what the broker tells
    def granted_leases(self, req: Request, leases: Iterable[Lease]) -> None:
        """A request left the queue with ``leases`` (one per rank): its wait and its grants."""
        team = self.team(req.user, req.team)
        self.queue_wait.setdefault(team, Histogram(WAIT_BUCKETS)).observe(
            self.clock() - req.submitted
        )
        for _ in leases:
            self.granted[req.user, team] += 1

    def suspended(self, lease: Lease) -> None:
        """An idle session is being moved to host memory (its GPU memory given to others)."""
        self.suspensions[lease.user, self.team(lease.user, lease.team)] += 1

    def session_started(self, lease: Lease, seconds: float, ok: bool, restored: bool) -> None:
        """A worker answered a session start (``restored``: with an earlier session's
        variables)."""
        team = self.team(lease.user, lease.team)
        self.session_starts[team, "started" if ok else "failed"] += 1
        if ok:
            self.start_seconds.setdefault(team, Histogram(START_BUCKETS)).observe(seconds)
            if restored:
                self.restores[lease.user, team] += 1

    def lease_ended(self, lease: Lease) -> None:
        """A lease ended: its GPU-seconds from now on are in the counter, not in the live
        part."""
        end = lease.ended if lease.ended is not None else self.clock()
        self.gpu_seconds_ended[lease.user, self.team(lease.user, lease.team)] += self._gpu_seconds(
            lease, end
        )

    # ------------------------------------------------------------------ read when scraped
    def _gpu_seconds(self, lease: Lease, until: float) -> float:
        """GPUs held x seconds, since this broker started (an adopted lease's time before the
        restart was counted by the scheduler before)."""
        return lease.fraction * max(0.0, until - max(lease.started, self.since))

    def gpu_seconds(self) -> dict[tuple[str, str], float]:
        """Per (user, team): ended leases' GPU-seconds plus the live leases' so far."""
        now = self.clock()
        totals = defaultdict(float, self.gpu_seconds_ended)
        for lease in self.ledger.leases.values():
            totals[lease.user, self.team(lease.user, lease.team)] += self._gpu_seconds(lease, now)
        return dict(totals)

    def families(
        self, samples: Mapping[str, Iterable[Sample]], name: Callable[[str], str]
    ) -> Iterator[Metric]:
        """Every metric family, named through ``name`` (Dask's namespace and our subsystem)."""
        yield from self._gpu_families(samples, name)
        yield from self._lease_families(name)
        yield from self._queue_families(name)
        yield from self._counter_families(name)

    def _gpu_families(
        self, samples: Mapping[str, Iterable[Sample]], name: Callable[[str], str]
    ) -> Iterator[Metric]:
        """Per GPU: capacity, leased, busy, memory used, utilization."""
        from prometheus_client.core import GaugeMetricFamily

        ledger = self.ledger
        gpu_labels = ["gpu", "worker", "index", "name", "virtual"]
        per_gpu = {
            "capacity_bytes": "memory of the GPU",
            "leased_bytes": "memory of the GPU leased to sessions",
            "busy_bytes": "memory of the GPU leased to sessions that are running a cell",
            "memory_used_bytes": "memory in use on the GPU (NVML; a virtual GPU: its leased memory)",
            "utilization_percent": "the GPU's utilization (NVML; a virtual GPU: its busy share)",
        }
        gauges = {
            k: GaugeMetricFamily(name(k), f"{doc} (jupyter-gpu)", labels=gpu_labels)
            for k, doc in per_gpu.items()
        }
        for gpu in ledger.gpus.values():
            labels = _gpu_labels(gpu)
            last = _last(samples.get(gpu.id, ()))
            busy = sum(
                a.bytes
                for lid in gpu.leases
                if lid in ledger.leases and ledger.leases[lid].state == "running"
                for a in ledger.leases[lid].allocations
                if a.gpu == gpu.id
            )
            gauges["capacity_bytes"].add_metric(labels, gpu.total_bytes)
            gauges["leased_bytes"].add_metric(labels, gpu.leased_bytes)
            gauges["busy_bytes"].add_metric(labels, busy)
            used, utilization = last.get("memory_used_bytes"), last.get("utilization")
            if used is not None:
                gauges["memory_used_bytes"].add_metric(labels, float(used))
            if utilization is not None:
                gauges["utilization_percent"].add_metric(labels, float(utilization))
        yield from gauges.values()

    def _lease_families(self, name: Callable[[str], str]) -> Iterator[Metric]:
        """Live leases and leased memory per user and team."""
        from prometheus_client.core import GaugeMetricFamily

        ledger = self.ledger
        leases = GaugeMetricFamily(
            name("leases"),
            "live leases (sessions) per user, team and state (jupyter-gpu)",
            labels=["user", "team", "state"],
        )
        leased = GaugeMetricFamily(
            name("user_leased_bytes"),
            "GPU memory leased per user and team (jupyter-gpu)",
            labels=["user", "team"],
        )
        count: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        held: defaultdict[tuple[str, str], int] = defaultdict(int)
        for lease in ledger.leases.values():
            team = self.team(lease.user, lease.team)
            count[lease.user, team, lease.state] += 1
            held[lease.user, team] += lease.bytes
        for labels3, n in sorted(count.items()):
            leases.add_metric(list(labels3), n)
        for labels2, b in sorted(held.items()):
            leased.add_metric(list(labels2), b)
        yield leases
        yield leased

    def _queue_families(self, name: Callable[[str], str]) -> Iterator[Metric]:
        """The queue per team: its length, its oldest wait, and the waits and starts so far."""
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        ledger = self.ledger
        queue = GaugeMetricFamily(
            name("queue_length"),
            "requests waiting for a GPU per team (jupyter-gpu)",
            labels=["team"],
        )
        oldest = GaugeMetricFamily(
            name("queue_oldest_wait_seconds"),
            "how long the oldest waiting request of each team has waited (jupyter-gpu)",
            labels=["team"],
        )
        waiting: defaultdict[str, list[float]] = defaultdict(list)
        for req in ledger.queued():
            waiting[self.team(req.user, req.team)].append(req.submitted)
        now = self.clock()
        for team in sorted(set(waiting) | set(self.queue_wait)):
            queue.add_metric([team], len(waiting.get(team, ())))
            if waiting.get(team):
                oldest.add_metric([team], now - min(waiting[team]))
        yield queue
        yield oldest

        yield _histogram(
            HistogramMetricFamily,
            name("queue_wait_seconds"),
            "how long granted requests waited in the queue, per team (jupyter-gpu)",
            self.queue_wait,
        )
        yield _histogram(
            HistogramMetricFamily,
            name("session_start_seconds"),
            "how long starting a session process took on its worker, per team (jupyter-gpu)",
            self.start_seconds,
        )

    def _counter_families(self, name: Callable[[str], str]) -> Iterator[Metric]:
        """Counters: leases granted, suspensions, restores, session starts, GPU-seconds."""
        from prometheus_client.core import CounterMetricFamily

        counters: list[tuple[str, str, list[str], Mapping[Any, float]]] = [
            ("leases_granted", "leases granted", ["user", "team"], self.granted),
            (
                "suspensions",
                "idle sessions moved to host memory to free their GPU memory",
                ["user", "team"],
                self.suspensions,
            ),
            (
                "restores",
                "sessions started with an earlier session's variables from host memory",
                ["user", "team"],
                self.restores,
            ),
            (
                "session_starts",
                "session process starts, by outcome",
                ["team", "outcome"],
                self.session_starts,
            ),
            ("gpu_seconds", "GPUs held x seconds", ["user", "team"], self.gpu_seconds()),
        ]
        for key, doc, labels, values in counters:
            family = CounterMetricFamily(name(key), f"{doc} (jupyter-gpu)", labels=labels)
            for label_values, value in sorted(values.items()):
                family.add_metric(list(label_values), value)
            yield family


def _gpu_labels(gpu: GpuSlot) -> list[str]:
    return [gpu.id, gpu.worker, str(gpu.index), gpu.name, "true" if gpu.virtual else "false"]


def _last(samples: Iterable[Sample]) -> Sample:
    kept = list(samples)
    return kept[-1] if kept else {}


def _histogram(family: Any, metric: str, doc: str, per_team: Mapping[str, Histogram]) -> Metric:
    out = family(metric, doc, labels=["team"])
    for team, hist in sorted(per_team.items()):
        out.add_metric([team], hist.cumulative(), sum_value=hist.total)
    return out  # type: ignore[no-any-return]  # a prometheus_client metric family


# ---------------------------------------------------------------------- Dask's registry
class Broker(Protocol):
    """What the collector reads of the broker (``plugin.GpuBroker``)."""

    @property
    def metrics(self) -> PoolMetrics: ...

    @property
    def samples(self) -> GpuSamples: ...

    @property
    def scheduler(self) -> Any: ...


_collector: Any = None  # the one PoolCollector of this process, once registered


def install(broker: Broker) -> None:
    """Serve ``broker``'s metrics on ``/metrics``: register :class:`PoolCollector` with the
    registry Dask's handler serves (once per process; a later broker takes it over, as Dask's
    collectors follow the latest scheduler)."""
    global _collector
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        log.debug("prometheus_client is not installed: no /metrics of the pool")
        return
    if _collector is None:
        _collector = _make_collector(broker)
        REGISTRY.register(_collector)
    _collector.broker = broker


def uninstall(broker: Broker) -> None:
    """``broker`` stopped: its figures leave ``/metrics`` (the families stay, empty)."""
    if _collector is not None and _collector.broker is broker:
        _collector.broker = None


def _make_collector(broker: Broker) -> Any:
    from distributed.http.prometheus import PrometheusCollector

    class PoolCollector(PrometheusCollector):
        """A Dask Prometheus collector (``distributed/http/scheduler/prometheus``) for the pool:
        its names are ``<Dask's namespace>_jupyter_gpu_<metric>``."""

        def __init__(self, server: Any):
            super().__init__(server)  # type: ignore[no-untyped-call]  # Dask's is unannotated
            self.subsystem = "jupyter_gpu"
            self.broker: Broker | None = None

        def collect(self) -> Iterator[Metric]:
            current = self.broker
            metrics = current.metrics if current is not None else PoolMetrics(_EMPTY)
            samples = current.samples.by_gpu if current is not None else {}
            yield from metrics.families(samples, self.build_name)

    return PoolCollector(broker.scheduler)


def _empty_ledger() -> Ledger:
    from jupyter_gpu.broker.fair_share import FairSharePolicy

    return Ledger(FairSharePolicy())


_EMPTY = _empty_ledger()
