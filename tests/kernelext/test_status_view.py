"""``%gpu status`` / ``%gpu queue`` and the badge read the estimated start with what it rests on."""

from __future__ import annotations

from jupyter_gpu.kernelext.status_view import QueueView, StatusView, estimated_start

NOW = 1000.0


def _snapshot() -> dict:
    return {
        "time": NOW,
        "pool": {"embedded": True, "workers": 1, "virtual": True},
        "gpus": [
            {
                "name": "Virtual GPU 0",
                "total_bytes": 16 << 30,
                "leased_bytes": 8 << 30,
                "leases": [
                    {
                        "id": "L1",
                        "user": "alice",
                        "kernel": "k1",
                        "bytes": 8 << 30,
                        "state": "running",
                        "fraction": 0.5,
                    }
                ],
            }
        ],
        "queue": [
            {
                "position": 1,
                "id": "R2",
                "user": "bob",
                "request": "0.5 GPU",
                "since": 990.0,
                "reason": "waiting: no GPU has 8.0 GiB free",
                "eta": 1040.0,
                "eta_basis": "user-cells",
                "eta_note": "median of alice's last 12 cells: 45 s",
            },
            {
                "position": 2,
                "id": "R3",
                "user": "carol",
                "request": "0.5 GPU",
                "since": 995.0,
                "reason": "waiting: no GPU has 8.0 GiB free",
                "eta": None,
                "eta_basis": "unknown",
                "eta_note": "the requests ahead take what comes free",
            },
        ],
    }


def test_the_estimate_says_what_it_rests_on_and_why_it_is_unknown():
    queue = _snapshot()["queue"]
    assert estimated_start(queue[0], NOW) == "in 40 s (median of alice's last 12 cells: 45 s)"
    assert estimated_start(queue[1], NOW) == "unknown (the requests ahead take what comes free)"
    assert estimated_start({"eta": None}, NOW) == "unknown"


def test_queue_and_status_show_it():
    plain = QueueView(_snapshot(), "bob")._repr_mimebundle_()["text/plain"]
    assert "in 40 s (median of alice's last 12 cells: 45 s)" in plain
    assert "unknown (the requests ahead take what comes free)" in plain
    status = StatusView(_snapshot(), "bob", "k2", {}, None, "tcp://x")._repr_mimebundle_()
    assert "My queued requests:" in status["text/plain"] and "R2" in status["text/plain"]
    assert "<h4>My queued requests</h4>" in status["text/html"]
    assert "My sessions (bob):\nnone" in status["text/plain"]
