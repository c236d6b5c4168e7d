"""Which GPU work of a server's kernels counts as activity for JupyterHub's idle culler."""

from __future__ import annotations

from jupyter_gpu.labext.hub_activity import HubActivity, gpu_work_of

SNAPSHOT = {
    "gpus": [
        {
            "leases": [
                {"id": "L1", "kernel": "k-mine", "state": "running"},  # a cell runs (or --async)
                {"id": "L2", "kernel": "k-mine-2", "state": "idle"},  # an idle session: no activity
                {"id": "L3", "kernel": "k-other", "state": "running"},  # another server's kernel
            ]
        },
        {"leases": [{"id": "L4", "kernel": "k-mine-2", "state": "running"}]},  # a --workers rank
    ],
    "queue": [{"id": "R1", "kernel": "k-mine-2"}, {"id": "R2", "kernel": "k-other"}],
}


def test_running_cells_and_waiting_requests_of_this_servers_kernels_are_activity():
    assert gpu_work_of(SNAPSHOT, {"k-mine", "k-mine-2"}) == ["L1", "L4", "R1"]
    assert gpu_work_of(SNAPSHOT, {"k-idle"}) == []
    assert gpu_work_of({"gpus": [], "queue": []}, {"k-mine"}) == []


def test_only_a_server_the_hub_started_reports():
    def call(op):
        raise AssertionError("no pool call outside a Hub")

    outside = HubActivity(call, lambda: ["k"], 3, env={})
    assert not outside.behind_hub
    inside = HubActivity(
        call,
        lambda: ["k"],
        3,
        env={
            "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api/",
            "JUPYTERHUB_API_TOKEN": "t",
            "JUPYTERHUB_USER": "alice",
        },
    )
    assert inside.behind_hub and inside.api_url == "http://127.0.0.1:8081/hub/api"
    assert inside.server == ""
