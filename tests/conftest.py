"""Fixtures: a real embedded pool with two virtual 16 GiB GPUs, started once per test session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

os.environ.setdefault("JUPYTER_GPU_VIRTUAL_GPUS", "2x16GiB")


def _start_pool(path: str) -> str:
    from jupyter_gpu.pool.embedded import ensure_embedded_pool

    return ensure_embedded_pool(keep=True, path=path, timeout=120)


@pytest.fixture(scope="session")
def pool(tmp_path_factory) -> str:
    """The address of a private embedded pool (2 virtual GPUs), stopped at the end of the
    session."""
    from jupyter_gpu.pool.embedded import stop_embedded_pool

    path = str(tmp_path_factory.mktemp("pool") / "pool.json")
    address = _start_pool(path)
    yield address
    stop_embedded_pool(path)


@pytest.fixture()
def private_pool(tmp_path) -> str:
    """A pool of its own for a test that breaks things (kills workers)."""
    from jupyter_gpu.pool.embedded import stop_embedded_pool

    path = str(tmp_path / "pool.json")
    address = _start_pool(path)
    yield address
    stop_embedded_pool(path)


@pytest.fixture()
def kernel(pool):
    from harness import Kernel

    k = Kernel(pool)
    yield k
    k.shutdown(now=True)
