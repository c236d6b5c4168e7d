"""Fixtures: a real embedded pool with two virtual 16 GiB GPUs, started once per test session; and the
tier markers (``unit`` for a test that declares none, ``system`` for everything under tests/system)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# jupyter-gpu's Dask config defaults must exist before ``distributed.utils_test`` snapshots the config
# that ``gen_cluster`` resets to before every in-process test
import jupyter_gpu.common.config  # noqa: F401

os.environ.setdefault("JUPYTER_GPU_VIRTUAL_GPUS", "2x16GiB")

TIERS = ("unit", "inprocess", "integration", "system")
SYSTEM = Path(__file__).parent / "system"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test has exactly one tier: what it declares, ``system`` under tests/system, else ``unit``."""
    for item in items:
        if SYSTEM in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.system)
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if "system" in tiers:
            tiers = {"system"}
        if not tiers:
            item.add_marker(pytest.mark.unit)
        elif len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid} has more than one tier marker: {sorted(tiers)}")


def _start_pool(path: str) -> str:
    from jupyter_gpu.pool.launcher import ensure_embedded_pool

    return ensure_embedded_pool(keep=True, path=path, timeout=120)


@pytest.fixture(scope="session")
def pool(tmp_path_factory) -> str:
    """The address of a private embedded pool (2 virtual GPUs), stopped at the end of the
    session."""
    from jupyter_gpu.pool.launcher import stop_embedded_pool

    path = str(tmp_path_factory.mktemp("pool") / "pool.json")
    address = _start_pool(path)
    yield address
    stop_embedded_pool(path)


@pytest.fixture()
def private_pool(tmp_path) -> str:
    """A pool of its own for a test that breaks things (kills workers)."""
    from jupyter_gpu.pool.launcher import stop_embedded_pool

    path = str(tmp_path / "pool.json")
    address = _start_pool(path)
    yield address
    stop_embedded_pool(path)


@pytest.fixture()
def kernel(pool):
    from tests.support.harness import Kernel

    k = Kernel(pool)
    yield k
    k.shutdown(now=True)
