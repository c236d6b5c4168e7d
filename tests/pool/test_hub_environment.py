"""What a kernel or Jupyter server started by JupyterHub shows the pool: the Hub's user and token
take the place of JUPYTER_GPU_USER and JUPYTER_GPU_TOKEN (DESIGN 2b), and only where they should."""

from __future__ import annotations

import pytest

from jupyter_gpu.pool.discovery import pool_token, user_name


@pytest.fixture
def hub_env(monkeypatch):
    for name in ("JUPYTER_GPU_USER", "JUPYTER_GPU_TOKEN", "JUPYTER_GPU_SCHEDULER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "hub-token-of-alice")
    return monkeypatch


def test_a_hub_server_acts_for_the_hubs_user_with_the_hubs_token(hub_env):
    hub_env.setenv("JUPYTER_GPU_SCHEDULER", "tcp://10.0.0.5:8786")
    assert user_name() == "alice" and pool_token() == "hub-token-of-alice"
    # the pool's own variables win
    hub_env.setenv("JUPYTER_GPU_TOKEN", "pool-token")
    assert pool_token() == "pool-token"


def test_the_hubs_token_goes_to_no_embedded_pool_and_with_no_other_name(hub_env):
    assert pool_token() is None  # no JUPYTER_GPU_SCHEDULER: the embedded pool
    assert pool_token(embedded=False) == "hub-token-of-alice"  # %gpu connect ADDRESS
    hub_env.setenv("JUPYTER_GPU_SCHEDULER", "tcp://10.0.0.5:8786")
    assert pool_token(embedded=True) is None
    hub_env.setenv("JUPYTER_GPU_USER", "bob")
    assert user_name() == "bob" and pool_token() is None
