"""The pool's Prometheus metrics (``broker/metrics.py``): the counters on their own, and a scrape of
``/metrics`` from a real pool checked against what ``%gpu status`` and the snapshot say."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.metrics import Histogram, PoolMetrics
from jupyter_gpu.broker.model import GpuSlot, Request
from jupyter_gpu.common.protocol import RequestSpec

GiB = 2**30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scrape(metrics: PoolMetrics, samples: dict | None = None) -> dict[str, list]:
    """Metric name -> its samples, as Prometheus would read them."""
    out: dict[str, list] = {}
    for family in metrics.families(samples or {}, lambda n: f"dask_jupyter_gpu_{n}"):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: list, **labels: str) -> float:
    found = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (labels, samples)
    return found[0]


def pool(clock: Clock) -> tuple[Ledger, PoolMetrics]:
    ledger = Ledger(FairSharePolicy(), clock=clock)
    ledger.set_worker_gpus(
        "w0",
        [
            GpuSlot(worker="w0", index=i, uuid=f"G{i}", name="g", total_bytes=16 * GiB)
            for i in range(2)
        ],
    )
    return ledger, PoolMetrics(ledger, clock=clock)


def ask(ledger: Ledger, rid: str, user: str, fraction: float, submitted: float) -> Request:
    req = Request(
        id=rid,
        user=user,
        kernel=f"k-{user}",
        client=None,
        spec=RequestSpec(fraction=fraction),
        submitted=submitted,
    )
    ledger.submit(req)
    return req


def test_the_counters_follow_what_the_broker_tells():
    clock = Clock()
    ledger, metrics = pool(clock)
    ask(ledger, "R1", "alice", 0.5, submitted=clock.now - 3.0)
    for req, leases in ledger.schedule(None):
        metrics.granted_leases(req, leases)
        for lease in leases:
            metrics.session_started(lease, 0.2, ok=True, restored=False)
    (lease,) = ledger.leases.values()
    clock.now += 100.0
    got = scrape(metrics)
    assert value(got["dask_jupyter_gpu_leases_granted_total"], user="alice") == 1
    assert value(got["dask_jupyter_gpu_leases"], user="alice", state=lease.state) == 1
    assert value(got["dask_jupyter_gpu_user_leased_bytes"], user="alice") == 8 * GiB
    assert value(got["dask_jupyter_gpu_leased_bytes"], gpu=lease.allocations[0].gpu) == 8 * GiB
    assert value(got["dask_jupyter_gpu_capacity_bytes"], gpu="w0#1") == 16 * GiB
    # 0.5 GPU held for 100 s, counted while it is live ...
    assert value(got["dask_jupyter_gpu_gpu_seconds_total"], user="alice") == pytest.approx(50.0)
    assert value(got["dask_jupyter_gpu_queue_wait_seconds_count"], team="default") == 1
    assert value(got["dask_jupyter_gpu_queue_wait_seconds_sum"], team="default") == 3.0
    assert value(got["dask_jupyter_gpu_queue_wait_seconds_bucket"], le="2.5") == 0
    assert value(got["dask_jupyter_gpu_queue_wait_seconds_bucket"], le="5.0") == 1
    assert value(got["dask_jupyter_gpu_session_start_seconds_sum"], team="default") == 0.2

    # ... and after it ended, without a jump back (a counter never goes down)
    metrics.suspended(lease)
    clock.now += 20.0
    ledger.end(lease.id, "suspended")
    metrics.lease_ended(lease)
    clock.now += 500.0
    got = scrape(metrics)
    assert value(got["dask_jupyter_gpu_gpu_seconds_total"], user="alice") == pytest.approx(60.0)
    assert value(got["dask_jupyter_gpu_suspensions_total"], user="alice") == 1
    assert "dask_jupyter_gpu_leases" not in got  # no live lease

    req = ask(ledger, "R2", "alice", 0.25, submitted=clock.now)
    (_, (again,)), *_ = ledger.schedule(None)
    metrics.granted_leases(req, [again])
    metrics.session_started(again, 1.5, ok=True, restored=True)
    metrics.session_started(again, 0.0, ok=False, restored=False)
    got = scrape(metrics)
    assert value(got["dask_jupyter_gpu_restores_total"], user="alice") == 1
    assert value(got["dask_jupyter_gpu_session_starts_total"], outcome="started") == 2
    assert value(got["dask_jupyter_gpu_session_starts_total"], outcome="failed") == 1
    assert value(got["dask_jupyter_gpu_leases_granted_total"], user="alice") == 2


def test_the_queue_per_team_and_a_gpus_samples():
    clock = Clock()
    ledger, metrics = pool(clock)
    ask(ledger, "R1", "alice", 1.0, clock.now)
    ask(ledger, "R2", "bob", 1.0, clock.now)
    ledger.schedule(None)
    ask(ledger, "R3", "carol", 1.0, clock.now - 7.0)
    ledger.schedule(None)
    running = next(iter(ledger.leases.values()))
    ledger.set_state(running.id, "running")
    samples = {"w0#0": [{"t": 1.0, "utilization": 40.0, "memory_used_bytes": 5 * GiB}]}
    got = scrape(metrics, samples)
    assert value(got["dask_jupyter_gpu_queue_length"], team="default") == 1
    assert value(got["dask_jupyter_gpu_queue_oldest_wait_seconds"], team="default") == 7.0
    assert value(got["dask_jupyter_gpu_busy_bytes"], gpu=running.allocations[0].gpu) == 16 * GiB
    assert value(got["dask_jupyter_gpu_utilization_percent"], gpu="w0#0") == 40.0
    assert value(got["dask_jupyter_gpu_memory_used_bytes"], gpu="w0#0") == 5 * GiB


def test_a_histogram_is_cumulative_and_ends_at_infinity():
    hist = Histogram((1.0, 10.0))
    for v in (0.5, 1.0, 5.0, 50.0, -1.0):
        hist.observe(v)
    assert hist.cumulative() == [("1.0", 3.0), ("10.0", 4.0), ("+Inf", 5.0)]
    assert hist.count == 5 and hist.total == 56.5


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_scrape_of_a_real_pool_agrees_with_gpu_status(tmp_path):
    """``jupyter-gpu.http`` on: ``/metrics`` on the scheduler's HTTP port (a real request) carries
    Dask's own metrics and the pool's, and the pool's say what ``%gpu status`` says."""
    from tests.support.harness import Kernel, snapshot
    from tests.support.services import PoolServices

    with PoolServices(tmp_path, env={"DASK_JUPYTER_GPU__HTTP": "true"}) as services:
        alice = Kernel(services.address, user="alice")
        try:
            assert alice.run("%%gpu --gpus 0.5\nx = 1").error is None
            status = "".join(alice.run("%gpu status").data())
            snap = snapshot(services.address)
            found = re.search(
                r"dashboard at:\s+http://([\d.]+):(\d+)/", services.full_log("scheduler")
            )
            assert found, services.log("scheduler")
            url = f"http://{found.group(1)}:{found.group(2)}/metrics"
            with urllib.request.urlopen(url, timeout=30) as reply:
                text = reply.read().decode()
        finally:
            alice.shutdown(now=True)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "dask_scheduler_workers" in families  # Dask's own collectors are there too

    def samples(name: str) -> list:
        return families[f"dask_jupyter_gpu_{name}"].samples

    gpus = {g["id"]: g for g in snap["gpus"]}
    assert f"{len(gpus)} GPU(s)" in status
    capacity = {s.labels["gpu"]: s.value for s in samples("capacity_bytes")}
    assert capacity == {i: g["total_bytes"] for i, g in gpus.items()}
    leased = {s.labels["gpu"]: s.value for s in samples("leased_bytes")}
    assert leased == {i: g["leased_bytes"] for i, g in gpus.items()}
    (lease,) = [ls for g in snap["gpus"] for ls in g["leases"]]
    assert lease["user"] == "alice" and lease["id"] in status
    assert value(samples("leases"), user="alice", state=lease["state"]) == 1
    assert value(samples("user_leased_bytes"), user="alice") == lease["bytes"] == 8 * GiB
    assert value(samples("leases_granted"), user="alice") == 1
    assert value(samples("session_starts"), outcome="started") == 1
    assert value(samples("gpu_seconds"), user="alice") > 0


def test_the_shipped_grafana_dashboard_asks_only_for_metrics_the_pool_exports():
    """jupyter-config/grafana/jupyter-gpu.json: valid JSON, and every metric its queries name is one
    the collector exports (a renamed metric would leave a panel silently empty)."""
    import json
    from pathlib import Path

    dashboard = Path(__file__).parents[2] / "jupyter-config" / "grafana" / "jupyter-gpu.json"
    board = json.loads(dashboard.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs.append(board["templating"]["list"][1]["definition"])
    asked = {m for e in exprs for m in re.findall(r"dask_jupyter_gpu_\w+", e)}
    _, metrics = pool(Clock())
    exported = set()
    for family in metrics.families({}, lambda n: f"dask_jupyter_gpu_{n}"):
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
        }.get(family.type, [""])
        exported |= {family.name + s for s in suffixes}
    assert asked and asked <= exported, asked - exported
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"] if "targets" in p)
