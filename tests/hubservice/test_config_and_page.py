"""What the pool ships for a Hub administrator (jupyterhub_config.py pieces) and its service page,
the parts that need no Hub; the Hub running them is tests/system/hub."""

from __future__ import annotations

from traitlets.config import Config

from jupyter_gpu.hubservice.app import page
from jupyter_gpu.hubservice.config import configure


def test_configure_adds_the_service_roles_scopes_and_pool_address_keeping_what_was_there():
    c = Config()
    c.JupyterHub.services = [{"name": "other"}]
    c.Spawner.environment = {"KEEP": "1"}
    configure(c, "tcp://10.0.0.5:8786", api_token="secret", admin_groups=["gpu-admins"])
    services = {s["name"]: s for s in c.JupyterHub.services}
    assert set(services) == {"other", "jupyter-gpu"}
    pool = services["jupyter-gpu"]
    assert pool["api_token"] == "secret" and pool["url"] == "http://127.0.0.1:10101"
    assert pool["command"][-2:] == ["-m", "jupyter_gpu.hubservice"]
    assert pool["environment"] == {"JUPYTER_GPU_SCHEDULER": "tcp://10.0.0.5:8786"}
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert set(roles["jupyter-gpu-service"]["scopes"]) == {
        "list:users",
        "read:users",
        "list:groups",
        "read:groups",
    }
    assert roles["user"]["scopes"] == ["self", "access:services!service=jupyter-gpu"]
    assert roles["jupyter-gpu-admins"]["groups"] == ["gpu-admins"]
    assert "custom:jupyter-gpu:admin" in c.JupyterHub.custom_scopes
    assert "access:services!service=jupyter-gpu" in c.Spawner.server_token_scopes
    assert c.Spawner.environment == {"KEEP": "1", "JUPYTER_GPU_SCHEDULER": "tcp://10.0.0.5:8786"}


def test_an_external_service_has_no_command():
    c = Config()
    configure(c, "tcp://h:1", api_token="t", managed=False, url="http://10.0.0.5:10101")
    (entry,) = c.JupyterHub.services
    assert "command" not in entry and entry["url"] == "http://10.0.0.5:10101"


def test_the_page_escapes_what_users_name_and_says_who_is_admin():
    snap = {
        "time": 100.0,
        "gpus": [
            {
                "host": "h",
                "name": "GPU <0>",
                "virtual": True,
                "leased_bytes": 2**30,
                "total_bytes": 2**34,
                "leases": [{"user": "<script>", "fraction": 0.25, "state": "idle"}],
            }
        ],
        "queue": [{"position": 1, "user": "bob", "request": "0.5 GPU", "since": 90.0}],
        "quotas": {"teams": [{"team": "ml", "guarantee": 1.0, "held": 0.25, "members": ["a"]}]},
        "viewer": {"admin": True},
    }
    html = page(snap, "alice")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "administrator" in html and "10 s" in html and 'id="teams"' in html
    assert "administrator" not in page({**snap, "viewer": {"admin": False}}, "alice")


def test_the_zero_to_jupyterhub_values_say_what_configure_does():
    """The shipped values.yaml fragment and ``configure`` must not drift apart."""
    from pathlib import Path

    import yaml

    import jupyter_gpu.hubservice
    from jupyter_gpu.hubservice.config import roles, server_token_scopes

    values = yaml.safe_load(
        (Path(jupyter_gpu.hubservice.__file__).parent / "z2jh-values.yaml").read_text()
    )
    hub = values["hub"]
    for role in roles(admin_groups=["gpu-admins"]):
        shipped = hub["loadRoles"][role["name"]]
        assert shipped["scopes"] == role["scopes"], role["name"]
    assert hub["config"]["KubeSpawner"]["server_token_scopes"] == server_token_scopes()
    assert "custom:jupyter-gpu:admin" in hub["config"]["JupyterHub"]["custom_scopes"]
    assert "JUPYTER_GPU_SCHEDULER" in values["singleuser"]["extraEnv"]
