"""Right-sizing hints and the quota line of ``%gpu status``."""

from jupyter_gpu.common.rightsizing import right_size, suggest_bytes
from jupyter_gpu.kernelext.status_view import quota_text

GiB, MiB = 1 << 30, 1 << 20


def test_suggestion_is_a_readable_power_of_two_above_the_peak_with_headroom():
    assert suggest_bytes(0) == 256 * MiB
    assert suggest_bytes(300 * MiB) == 512 * MiB
    assert suggest_bytes(410 * MiB) == 1 * GiB  # 1.25 x 410 MiB > 512 MiB
    assert suggest_bytes(3 * GiB) == 4 * GiB


def test_hint_only_when_far_more_was_reserved_than_used():
    hint = right_size(300 * MiB, 8 * GiB)
    assert (
        hint is not None
        and hint.suggestion() == "512MiB"
        and abs(hint.used_share - 300 / 8192) < 1e-9
    )
    assert (
        "used at most 300.0 MiB of the 8.0 GiB it reserves: --memory 512MiB would do" in hint.hint()
    )
    assert right_size(3 * GiB, 8 * GiB) is None  # used more than a quarter
    assert right_size(None, 8 * GiB) is None  # nothing measured
    assert right_size(10 * MiB, 512 * MiB) is None  # too small a reservation to matter


def test_quota_line_names_the_team_its_standing_and_mine():
    assert "no quotas configured" in quota_text({"configured": False, "teams": []}, "ann")
    quotas = {
        "configured": True,
        "default_team": "default",
        "teams": [
            {"team": "ml", "guarantee": 1.0, "limit": 2.0, "held": 1.5},
            {"team": "default", "guarantee": 0.0, "limit": None, "held": 0.0},
        ],
        "users": [{"user": "ann", "team": "ml", "limit": 1.0, "held": 0.75}],
    }
    text = quota_text(quotas, "ann")
    assert text.startswith("Quota: team ml is guaranteed 1 GPU, limit 2; it holds 1.5 GPU now")
    assert "over its guarantee" in text and "You hold 0.75 GPU of your limit 1." in text
    assert (
        quota_text(quotas, "zed")
        == "Quota: team default is guaranteed 0 GPU, no limit; it holds 0 GPU now."
    )


def test_status_shows_my_sessions_peak_utilization_and_right_size():
    from jupyter_gpu.kernelext.status_view import StatusView

    lease = {
        "id": "L3",
        "user": "ann",
        "kernel": "k1",
        "state": "idle",
        "fraction": 0.5,
        "bytes": 8 * GiB,
        "bytes_on_gpu": 8 * GiB,
        "isolation": "torch-cap",
        "peak_bytes": 300 * MiB,
        "gpu_utilization": 37.0,
        "preemptible": True,
        "notebook": "a.ipynb",
    }
    snap = {
        "time": 100.0,
        "pool": {"embedded": False, "workers": 1, "virtual": False},
        "gpus": [
            {
                "name": "H100",
                "total_bytes": 16 * GiB,
                "leased_bytes": 8 * GiB,
                "utilization": 40,
                "leases": [lease],
            }
        ],
        "queue": [],
        "quotas": {"configured": False, "teams": []},
    }
    plain = StatusView(snap, "ann", "k1", {}, None, "tcp://pool:8786")._repr_mimebundle_()[
        "text/plain"
    ]
    assert "300.0 MiB of 8.0 GiB, 37% SM busy" in plain
    assert "ask --memory 512MiB" in plain and "idle (preemptible)" in plain
    assert "no quotas configured" in plain


def test_a_cell_over_its_share_is_told_what_to_ask():
    """``--memory`` is not enforced on a virtual GPU: a cell that goes over its share must hear of
    it there, or a notebook that passes in CI runs out of memory on a real GPU."""
    from jupyter_gpu.common.rightsizing import over_use

    assert over_use(100 << 20, 256 << 20) is None and over_use(None, 256 << 20) is None
    over = over_use(700 << 20, 256 << 20)
    assert over is not None and over.label == "Over its share"
    assert "700.0 MiB" in over.hint() and "256.0 MiB" in over.hint()
    assert "--memory 1GiB" in over.hint() and "run out of memory" in over.hint()
