"""Fixtures for the panel's server-extension tests: a real Jupyter server (pytest-jupyter) and a
real embedded pool of virtual GPUs.

pytest-jupyter's fixtures and its async-test hooks are imported here, not registered in the
top-level conftest, so that its autouse server cleanup applies to these tests only.
"""

from __future__ import annotations

import logging
import time

import pytest
from pytest_jupyter.jupyter_server import *  # noqa: F403 - fixtures and async-test hooks of pytest-jupyter

log = logging.getLogger(__name__)

TEST_USER = "panel-tester"
VIRTUAL_GPUS = "2x16GiB"


@pytest.fixture
def jp_server_config():
    """Enable the extension (as jupyter-config/ does for installed wheels) with a fast update
    rate."""
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_gpu.labext": True}},
        "GpuPanelConfig": {"update_interval": 0.2, "snapshot_timeout": 2.0},
    }


@pytest.fixture(autouse=True)
def _pool_env(monkeypatch):
    """Each test decides its own pool: no inherited scheduler address, a known user name."""
    monkeypatch.delenv("JUPYTER_GPU_SCHEDULER", raising=False)
    monkeypatch.setenv("JUPYTER_GPU_USER", TEST_USER)


def stop_pool(record_path: str) -> None:
    """Stop an embedded pool started by a test (started with keep=True, it would outlive the
    test)."""
    from jupyter_gpu.pool.launcher import stop_embedded_pool

    if stop_embedded_pool(record_path):
        log.info("stopped the embedded pool advertised at %s", record_path)


@pytest.fixture(scope="module")
def virtual_pool(tmp_path_factory):
    """A real embedded pool with two virtual 16 GiB GPUs, shared by one test module; yields its
    address."""
    from jupyter_gpu.pool.launcher import ensure_embedded_pool

    path = str(tmp_path_factory.mktemp("pool-runtime") / f"jupyter-gpu-pool-{TEST_USER}.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_GPU_VIRTUAL_GPUS", VIRTUAL_GPUS)
        mp.setenv("JUPYTER_GPU_USER", TEST_USER)
        started = time.monotonic()
        address = ensure_embedded_pool(timeout=120, keep=True, path=path)
        log.info("virtual pool at %s started in %.1f s", address, time.monotonic() - started)
    try:
        yield address
    finally:
        stop_pool(path)


@pytest.fixture
def pool_address(virtual_pool, monkeypatch):
    """Point the server under test at the module's pool, as JUPYTER_GPU_SCHEDULER does for users."""
    monkeypatch.setenv("JUPYTER_GPU_SCHEDULER", virtual_pool)
    return virtual_pool
