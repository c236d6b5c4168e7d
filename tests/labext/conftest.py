"""Fixtures for the panel's server-extension tests: a real Jupyter server (pytest-jupyter) and a real
embedded pool of virtual GPUs.

pytest-jupyter's fixtures and its async-test hooks are imported here, not registered in the top-level
conftest, so that its autouse server cleanup applies to these tests only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

import pytest
from pytest_jupyter.jupyter_server import *  # noqa: F403 - fixtures and async-test hooks of pytest-jupyter

log = logging.getLogger(__name__)

TEST_USER = "panel-tester"
VIRTUAL_GPUS = "2x16GiB"


@pytest.fixture
def jp_server_config():
    """Enable the extension (as jupyter-config/ does for installed wheels) with a fast update rate."""
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_gpu.labext": True}},
        "GpuPanelConfig": {"update_interval": 0.2},
    }


@pytest.fixture(autouse=True)
def _pool_env(monkeypatch):
    """Each test decides its own pool: no inherited scheduler address, a known user name."""
    monkeypatch.delenv("JUPYTER_GPU_SCHEDULER", raising=False)
    monkeypatch.setenv("JUPYTER_GPU_USER", TEST_USER)


def stop_pool(record_path: str) -> None:
    """Stop an embedded pool by the pid in its runtime record (SIGTERM, then SIGKILL), and wait for it."""
    from jupyter_gpu.cluster.discovery import pid_alive, read_record

    record = read_record(record_path)
    if record is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record.pid, signal.SIGTERM)  # the pool runs in its own session: take its workers too
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(record.pid, os.WNOHANG)  # reap it if this process started it (POST api/pool does)
        if not pid_alive(record.pid):
            break
        time.sleep(0.1)
    if pid_alive(record.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def virtual_pool(tmp_path_factory):
    """A real embedded pool with two virtual 16 GiB GPUs, shared by one test module; yields its address."""
    from jupyter_gpu.cluster.embedded import ensure_embedded_pool

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
