"""Fixtures of the pool across machines: hosts made of namespaces (``hosts.py``) and a pool on them
(``hostpool.py``). Everything is removed at the end even when a test fails, and leftovers of killed
runs are swept first."""

from __future__ import annotations

import pytest

from tests.system.multihost.hostpool import HostPool
from tests.system.multihost.hosts import Hosts, missing_tools, sweep_stale

# suspension in seconds (a test suspends an idle session on one host and restores it on another); no
# teams
QUOTAS = "suspend-idle-after: 2s\nmin-run-time: 0s\n"
WORKERS = {"w1": "1x4GiB", "w2": "1x4GiB", "w3": "1x4GiB"}


@pytest.fixture(scope="module")
def hosts():
    why = missing_tools()
    if why:
        pytest.skip(why)
    sweep_stale()
    with Hosts(["pool", *WORKERS, "desk"]) as made:
        yield made


@pytest.fixture(scope="module")
def hpool(hosts):
    quotas = hosts["pool"].folder / "quotas.yaml"
    quotas.write_text(QUOTAS)
    pool = HostPool(
        hosts,
        scheduler="pool",
        workers=WORKERS,
        client="desk",
        pool_files=[quotas],
        # a worker whose host is cut off is given up after 10 s without a heartbeat (the default, 5
        # minutes, would keep its GPUs booked that long): docs/administration.md
        scheduler_env={
            "DASK_JUPYTER_GPU__POOL_CONFIG": str(quotas),
            "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "10s",
        },
    )
    try:
        yield pool.start()
    finally:
        pool.stop()
