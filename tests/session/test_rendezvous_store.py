"""A ``--workers`` run's rendezvous store (issue 20, rank traffic): rank 0's torch ``TCPStore``
serves on the socket its session bound when the kernel asked for a port (the ranks' address only,
never every interface, and from before the port was handed out), and every key of the run is under
a prefix only the run's ranks know, so a guessed prefix reads nothing. Before, the store listened
on all interfaces. The prefix does not make the store private (torch serves ``list_keys()`` to any
client): that hole is tests/system/security/test_least_privilege.py's strict xfail.

Real torch stores in this process (what ``session/distributed_rank.py`` builds), no process group.
"""

from __future__ import annotations

import datetime
import socket

import pytest

from jupyter_gpu.session.distributed_rank import DistributedRun

torch_dist = pytest.importorskip("torch.distributed")

TIMEOUT = datetime.timedelta(seconds=30)


def rank(listen: socket.socket | None, port: int, index: int, key: str) -> DistributedRun:
    dist = {
        "rank": index,
        "world_size": 2,
        "master_addr": "127.0.0.1",
        "master_port": port,
        "store_key": key,
    }
    return DistributedRun(dist, [], link=None, listen=listen)  # type: ignore[arg-type]


def test_the_store_serves_on_the_sessions_socket_and_only_under_the_runs_secret_prefix():
    listen = socket.create_server(("127.0.0.1", 0), backlog=16)  # what free_port binds
    port = listen.getsockname()[1]
    assert listen.getsockname()[0] == "127.0.0.1"
    rank0 = rank(listen, port, 0, "the-runs-secret")
    store0 = rank0._store(TIMEOUT)
    assert rank0.listen is None  # the store owns the socket now
    store0.set("rank0/address", "10.0.0.1:29500")
    # a rank of the run names the same keys
    store1 = rank(None, port, 1, "the-runs-secret")._store(TIMEOUT)
    assert store1.get("rank0/address") == b"10.0.0.1:29500"
    # anyone else who connects to the port: no key of the run is one they can name
    stranger = torch_dist.TCPStore(
        "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=1)
    )
    for guess in ("rank0/address", "jupyter-gpu//rank0/address", "default_pg/rank0/address"):
        assert not stranger.check([guess]), guess
    with pytest.raises(RuntimeError):
        stranger.get("rank0/address")
    guessed = torch_dist.PrefixStore("jupyter-gpu/a-guess/", stranger)
    assert not guessed.check(["rank0/address"])
    # what the stranger writes under names it can make is not what the run reads
    stranger.set("rank0/address", "6.6.6.6:1")
    assert store1.get("rank0/address") == b"10.0.0.1:29500"


def test_a_run_that_never_reached_its_store_closes_the_socket():
    listen = socket.create_server(("127.0.0.1", 0), backlog=16)
    run = rank(listen, listen.getsockname()[1], 0, "k")
    run.stop()
    assert listen.fileno() == -1
