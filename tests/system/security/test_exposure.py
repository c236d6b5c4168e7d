"""Network exposure (issue 12, item 7): `jupyter-gpu pool up --host H` and `jupyter-gpu worker`
listen only where asked, and serve no HTTP unless it is configured; the embedded pool listens on
127.0.0.1 only.

The services run as real processes (tests/services.py); every listening socket of them and of
everything they start (nannies, worker processes, session processes) is read with psutil, and each
is asked for HTTP.
"""

from __future__ import annotations

import os
import socket

import psutil
import pytest

from tests.support.services import PoolServices
from tests.system.security.listening import (
    answers_http,
    listeners,
    sessions_on_every_gpu,
    wait_for_sessions,
)

pytestmark = pytest.mark.system

GPUS = 2


def _lan_ip() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


HOSTS = [
    "127.0.0.1",
    pytest.param(
        _lan_ip(),
        marks=pytest.mark.skipif(_lan_ip() is None, reason="no non-loopback IPv4 address"),
    ),
]


@pytest.mark.parametrize("host", HOSTS, ids=["loopback", "lan"])
def test_pool_up_and_worker_listen_only_on_the_asked_host_and_serve_no_http(tmp_path, host):
    """`pool up --host H` and `worker tcp://H:P` (no --host: it listens where it reaches its
    scheduler)."""
    env = {k: v for k, v in os.environ.items() if k != "DASK_JUPYTER_GPU__HTTP"}
    with (
        PoolServices(tmp_path, virtual=f"{GPUS}x8GiB", host=host, env=env) as services,
        sessions_on_every_gpu(services.address, GPUS),
    ):
        pids = (services.scheduler.pid, services.worker.pid)
        wait_for_sessions(GPUS, services.worker.pid)  # the sessions are checked too
        found = listeners(*pids)
        report = "\n".join(map(str, found))
        # the scheduler, two nannies, two workers, two sessions: one comm port each, nothing else
        assert len(found) >= 1 + 3 * GPUS, report
        assert {s.ip for s in found} == {host}, report
        assert any(s.port == services.port for s in found), report
        answering = [
            f"{s}: {answers_http(s.ip, s.port)!r}" for s in found if answers_http(s.ip, s.port)
        ]
        assert not answering, "\n".join(answering)


def test_http_routes_answer_only_when_configured_and_on_the_asked_host(tmp_path):
    """`jupyter-gpu.http` (here by environment; `--http` on the command line) turns Dask's routes
    on: the scheduler's and each worker's, on the services' host only."""
    with PoolServices(
        tmp_path, virtual=f"{GPUS}x8GiB", env={"DASK_JUPYTER_GPU__HTTP": "True"}
    ) as services:
        pids = (services.scheduler.pid, services.worker.pid)
        found = listeners(*pids)
        assert {s.ip for s in found} == {"127.0.0.1"}, "\n".join(map(str, found))
        http = [s for s in found if answers_http(s.ip, s.port)]
        assert {s.pid for s in http} >= {services.scheduler.pid}, "\n".join(map(str, found))
        # the scheduler and each worker process
        assert len(http) == 1 + GPUS, "\n".join(map(str, http))


def test_the_embedded_pool_listens_on_loopback_only_with_tls_and_no_http(tmp_path, monkeypatch):
    from jupyter_gpu.pool.discovery import read_record
    from jupyter_gpu.pool.launcher import ensure_embedded_pool, stop_embedded_pool

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_GPU_VIRTUAL_GPUS", f"{GPUS}x8GiB")
    path = str(tmp_path / "pool.json")
    try:
        address = ensure_embedded_pool(path=path, keep=True, timeout=120)
        pid = read_record(path).pid
        with sessions_on_every_gpu(address, GPUS):
            wait_for_sessions(GPUS, pid)
            found = listeners(pid)
            report = "\n".join(map(str, found))
            assert address.startswith("tls://127.0.0.1:"), address
            assert len(found) >= 1 + 3 * GPUS and {s.ip for s in found} == {"127.0.0.1"}, report
            assert not [s for s in found if answers_http(s.ip, s.port)], report
            # every port speaks TLS: none opens with Dask's plain handshake, as a TCP comm server
            # would
            for s in found:
                with socket.create_connection((s.ip, s.port), timeout=3) as sock:
                    sock.settimeout(0.5)
                    with pytest.raises(socket.timeout):
                        sock.recv(1)
    finally:
        stop_embedded_pool(path)
