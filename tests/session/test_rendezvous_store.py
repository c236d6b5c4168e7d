"""A ``--workers`` run's rendezvous store (issue 20, rank traffic): rank 0 serves it on the socket
its session bound when the kernel asked for a port (the ranks' address only), and answers only
connections that prove they know the run's secret (``session/rendezvous_store.py``). Before, it was
torch's ``TCPStore``, which serves ``list_keys()`` to anyone who connects.

Real stores and a real gloo process group in this process; the live attack is
tests/system/security/test_least_privilege.py.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time

import pytest

torch_dist = pytest.importorskip("torch.distributed")

from jupyter_gpu.session import rendezvous_store
from jupyter_gpu.session.distributed_rank import DistributedRun
from jupyter_gpu.session.rendezvous_store import RunStore, StoreServer

TIMEOUT = datetime.timedelta(seconds=30)
SECRET = b"the-runs-secret"
HANDSHAKE_S = 1.0  # the time a connection has to prove the secret (5 s in a run)


@pytest.fixture
def served():
    """A store served on a socket bound as ``server.free_port`` binds it; closed after."""
    listen = socket.create_server(("127.0.0.1", 0), backlog=16)
    server = StoreServer(listen, SECRET, handshake_s=HANDSHAKE_S)
    clients: list[RunStore] = []

    def client(secret: bytes = SECRET, timeout: datetime.timedelta = TIMEOUT) -> RunStore:
        store = RunStore("127.0.0.1", server.address[1], secret, timeout)
        clients.append(store)
        return store

    yield server, client
    for store in clients:
        store.close()
    server.close()
    assert listen.fileno() == -1  # the server closed the socket it was given


def test_the_runs_ranks_share_keys_with_the_semantics_of_torchs_stores(served):
    _, client = served
    rank0, rank1 = client(), client()
    rank0.set("rank0/address", b"10.0.0.1:29500")
    assert rank1.get("rank0/address") == b"10.0.0.1:29500"
    assert (rank0.add("arrived", 1), rank1.add("arrived", 1), rank0.add("arrived", 0)) == (1, 2, 2)
    assert rank1.check(["rank0/address", "arrived"]) and not rank1.check(["missing"])
    assert rank0.compare_set("c", b"", b"1") == b"1"  # missing and expected empty: set
    assert rank0.compare_set("c", b"0", b"2") == b"1"  # not what was expected: unchanged
    assert rank0.compare_set("c", b"1", b"3") == b"3"
    assert rank1.compare_set("new", b"x", b"y") == b"x"  # missing, expected not empty
    assert rank0.num_keys() == 3 and rank1.delete_key("c") and not rank1.delete_key("c")
    # get and wait block until another rank sets the key
    threading.Timer(0.3, lambda: rank0.set("late", "x")).start()
    rank1.wait(["late"])
    assert rank1.get("late") == b"x"
    # ... or until the store's timeout, with torch's error
    rank1.set_timeout(datetime.timedelta(seconds=0.3))
    with pytest.raises(RuntimeError, match="'never' not set within"):
        rank1.get("never")
    with pytest.raises(RuntimeError, match="not set in time"):
        rank1.wait(["never"], datetime.timedelta(seconds=0.2))
    # gloo's rendezvous runs over it (as init_process_group does, with a one-rank group here)
    group = torch_dist.ProcessGroupGloo(torch_dist.PrefixStore("pg/", rank0), 0, 1, TIMEOUT)
    assert group.size() == 1


def test_ranks_adding_at_once_while_others_wait_all_count(served):
    """Before: ``add`` read the count, then waited for the store's lock to write it; with ranks
    waiting on keys (torch's barrier, the teardown's counts) the lock had waiters, so two adds read
    the same count and one was lost (66 of 320 counted)."""
    _, client = served
    adders, waiters = [client() for _ in range(8)], [client() for _ in range(8)]

    def wait_for_ticks(store: RunStore) -> None:
        for i in range(40):
            store.wait([f"tick{i}"])

    def add(store: RunStore, first: bool) -> None:
        for i in range(40):
            store.add("arrived", 1)
            if first:
                store.set(f"tick{i}", b"x")

    threads = [threading.Thread(target=wait_for_ticks, args=(w,)) for w in waiters] + [
        threading.Thread(target=add, args=(a, n == 0)) for n, a in enumerate(adders)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert adders[0].add("arrived", 0) == 8 * 40


def test_a_stranger_who_connects_reads_and_writes_nothing(served):
    server, client = served
    rank0 = client()
    rank0.set("rank0/address", b"10.0.0.1:29500")
    # the wrong secret: refused before any op (it tries again for its timeout, then says why)
    with pytest.raises(RuntimeError, match="could not join this run's rendezvous store"):
        client(secret=b"a-guess", timeout=datetime.timedelta(seconds=1))
    # torch's own client (what read every key of the old store): it cannot even connect
    with pytest.raises(RuntimeError):
        torch_dist.TCPStore(
            "127.0.0.1", server.address[1], is_master=False, timeout=datetime.timedelta(seconds=1)
        )
    # raw bytes in place of the proof: the connection is closed, nothing answered
    with socket.create_connection(server.address, timeout=10) as raw:
        nonce = raw.recv(64)
        assert len(nonce) == 32
        raw.sendall(b"\x00" * 64)
        assert raw.recv(64) == b""
    assert server.refused >= 3
    # the run's keys are as its ranks left them
    assert client().get("rank0/address") == b"10.0.0.1:29500"
    assert rank0.num_keys() == 1


def test_silent_strangers_are_let_go_and_cannot_keep_the_ranks_out(served):
    server, client = served
    silent = [socket.create_connection(server.address, timeout=10) for _ in range(20)]
    try:
        rank1 = client()  # served at once beside the strangers who say nothing
        rank1.set("k", b"v")
        # and the strangers are let go after the handshake's time limit
        for sock in silent:
            sock.settimeout(HANDSHAKE_S * 10)
            sock.recv(32)  # the server's challenge
            assert sock.recv(32) == b""
    finally:
        for sock in silent:
            sock.close()


def test_a_flood_of_connections_that_say_nothing_does_not_keep_a_rank_out():
    """A stranger who keeps opening connections (more than the server holds unproven at once)
    while a rank joins: each new one pushes out the oldest unproven one, and a rank pushed out
    tries again, so it gets in (the strangers' connections wait for ever otherwise)."""
    import resource

    keep = rendezvous_store.MAX_CONNECTIONS + 100  # more than the server would ever hold
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 3 * keep:  # both ends of each connection are in this process
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * keep), hard))
    listen = socket.create_server(("127.0.0.1", 0), backlog=256)
    server = StoreServer(listen, SECRET, handshake_s=600)
    stop, opened = threading.Event(), []

    def flood() -> None:
        while not stop.is_set():
            try:
                opened.append(socket.create_connection(server.address, timeout=5))
            except OSError:
                time.sleep(0.01)
            if len(opened) > keep:  # hold the first ones for ever, churn the newest
                opened.pop().close()

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        deadline = time.monotonic() + 60
        while len(opened) <= rendezvous_store.MAX_CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(5):
            store = RunStore("127.0.0.1", server.address[1], SECRET, TIMEOUT)
            store.add("joined", 1)
            store.close()
        assert len(opened) > rendezvous_store.MAX_CONNECTIONS, "the flood did not flood"
    finally:
        stop.set()
        flooder.join(10)
        for sock in opened:
            sock.close()
        server.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def rank(listen: socket.socket | None, port: int, index: int, key: str) -> DistributedRun:
    dist = {
        "rank": index,
        "world_size": 2,
        "master_addr": "127.0.0.1",
        "master_port": port,
        "store_key": key,
    }
    return DistributedRun(dist, [], link=None, listen=listen)  # type: ignore[arg-type]


def test_a_runs_ranks_reach_the_store_rank_0_serves_on_its_sessions_socket():
    listen = socket.create_server(("127.0.0.1", 0), backlog=16)  # what free_port binds
    port = listen.getsockname()[1]
    rank0, rank1 = rank(listen, port, 0, "k1"), rank(None, port, 1, "k1")
    store0 = rank0._store(TIMEOUT)
    assert rank0.listen is None  # the store owns the socket now
    store0.set("rank0/address", "10.0.0.1:29500")
    assert rank1._store(TIMEOUT).get("rank0/address") == b"10.0.0.1:29500"
    # a rank of another attempt (another secret) is not let in
    with pytest.raises(RuntimeError, match="not of this attempt"):
        rank(None, port, 1, "k2")._store(datetime.timedelta(seconds=1))
    rank1.stop()
    rank0.stop()
    assert listen.fileno() == -1


def test_a_run_that_never_reached_its_store_closes_the_socket():
    listen = socket.create_server(("127.0.0.1", 0), backlog=16)
    run = rank(listen, listen.getsockname()[1], 0, "k")
    run.stop()
    assert listen.fileno() == -1


def test_a_rank_whose_store_went_silent_gets_torchs_error_not_a_hang(monkeypatch):
    """Rank 0's machine lost without a word (no FIN): a rank's call ends after the store's timeout
    and a grace, with torch's store error, instead of blocking the rank for ever."""
    import os

    monkeypatch.setattr(rendezvous_store, "REPLY_GRACE_S", 0.5)
    listen = socket.create_server(("127.0.0.1", 0), backlog=4)
    held: list[socket.socket] = []

    def silent_rank0() -> None:  # proves the secret, then answers nothing
        conn, _ = listen.accept()
        held.append(conn)
        server_nonce = os.urandom(32)
        conn.sendall(server_nonce)
        data = b""
        while len(data) < 64:
            data += conn.recv(64 - len(data))
        client_nonce = data[:32]
        conn.sendall(rendezvous_store._proof(SECRET, b"server", client_nonce, server_nonce))

    threading.Thread(target=silent_rank0, daemon=True).start()
    try:
        store = RunStore(
            "127.0.0.1", listen.getsockname()[1], SECRET, datetime.timedelta(seconds=0.5)
        )
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="no answer to add in time"):
            store.add("arrived", 1)
        assert time.monotonic() - started < 30
    finally:
        for conn in held:
            conn.close()
        listen.close()
