"""``launcher/server.py``, the one process of a GPU machine that keeps root, as a real process
(forked by ``fork_launcher`` as ``jupyter-gpu worker`` forks it): it answers only the pool's
service account, and starts nothing without a grant the broker signed for this worker and lease,
used once, before it expires, for a user who is neither root nor the service account. A worker
connection acts only on the sessions it started.

The service account here is root itself (the test's own account), so that the test may connect;
what another account gets is tested by a child that gives root up first. The full path (a grant
that starts a session as its user) runs in ``tests/system/security`` with real accounts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jupyter_gpu.common import grants

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="the launcher runs as root (CI runs this as root)"
    ),
]

WORKER = "tcp://127.0.0.1:4242"
RUN = """
import os, sys
from jupyter_gpu.launcher.server import Settings, fork_launcher
settings = Settings(service_uid=0, service_gid=0, public_key=sys.argv[1], host_memory_limit=None,
                    pids_limit=64, fork_server=False)
pid, path = fork_launcher(settings)
print(path, flush=True)
sys.stdin.read()  # until the test is done
os.kill(pid, 15)
os.waitpid(pid, 0)
"""


@pytest.fixture
def launcher(tmp_path):
    os.chmod(tmp_path, 0o700)
    key = grants.ensure_private_key(str(tmp_path / "grant.key"))
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, str(tmp_path / "grant.key.pub")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        path = proc.stdout.readline().strip()
        assert path.endswith("socket"), path
        yield path, key
    finally:
        proc.stdin.close()
        proc.wait(30)
    assert not os.path.exists(path)


class Link:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.sock.settimeout(30)
        self.n = 0

    def call(self, op: str, fds: list[int] | None = None, **fields) -> dict:
        self.n += 1
        socket.send_fds(
            self.sock, [json.dumps({"op": op, "id": self.n, **fields}).encode()], fds or []
        )
        data, got, _, _ = socket.recv_fds(self.sock, 65536, 3)
        for fd in got:
            os.close(fd)
        return json.loads(data)

    def start(self, lease: str, grant: str) -> dict:
        pipes = [os.pipe() for _ in range(3)]
        try:
            return self.call(
                "start", [w for _, w in pipes], lease=lease, grant=grant, host="127.0.0.1", env={}
            )
        finally:
            for r, w in pipes:
                os.close(r)
                os.close(w)


def test_only_the_service_account_is_answered(launcher):
    path, _ = launcher
    pid = os.fork()
    if pid == 0:  # another account: the connection is closed unanswered
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(path)
            except PermissionError:
                code = 0  # the socket's folder keeps it out already
            else:
                s.settimeout(30)
                s.send(json.dumps({"op": "hello", "id": 1, "worker": WORKER}).encode())
                code = 0 if s.recv(65536) == b"" else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    link = Link(path)
    assert link.call("hello", worker=WORKER) == {"id": 1}


def test_nothing_starts_without_a_fresh_grant_the_broker_signed_for_this_worker(launcher):
    path, key = launcher
    link = Link(path)
    nobody = "jgpu-no-such-account"

    def signed(user="jgpu-x", lease="L1", worker=WORKER, **kw) -> str:
        return grants.sign(grants.new_grant(user, lease, worker, [0], 2**20, **kw), key)

    assert "say hello first" in link.call("signal", lease="L1", signal="kill")["error"]
    assert "error" not in link.call("hello", worker=WORKER)
    assert "already" in link.call("hello", worker="tcp://6.6.6.6:1")["error"]
    refused = {
        "no grant": link.start("L1", "made-up"),
        "another key": link.start(
            "L1",
            grants.sign(
                grants.new_grant("jgpu-x", "L1", WORKER, [0], 1), Ed25519PrivateKey.generate()
            ),
        ),
        "expired": link.start("L1", signed(now=time.time() - 3 * grants.LIFETIME)),
        "another worker": link.start("L1", signed(worker="tcp://6.6.6.6:1")),
        "another lease": link.start("L2", signed()),
        "root": link.start("L1", signed(user="root")),
    }
    assert "not a signed grant" in refused["no grant"]["error"]
    assert "signature is not the broker's" in refused["another key"]["error"]
    assert "expired" in refused["expired"]["error"]
    assert "another worker or lease" in refused["another worker"]["error"]
    assert "another worker or lease" in refused["another lease"]["error"]
    assert "administrator's or the pool's own account" in refused["root"]["error"]
    once = signed(user=nobody, lease="L3")
    assert "has no account" in link.start("L3", once)["error"]
    assert "used already" in link.start("L3", once)["error"]
    # a grant in place of a grant's payload, a field it does not know: refused as malformed
    assert "error" in link.call("start", lease="L1", grant=once, host="h", env={}, user="root")


def test_a_connection_acts_only_on_sessions_it_started(launcher):
    path, _ = launcher
    link = Link(path)
    link.call("hello", worker=WORKER)
    for op, fields in (
        ("signal", {"signal": "kill"}),
        ("open_copy", {"to_lease": "L9"}),
        ("create_copy", {"to_lease": "L9"}),
        ("move_copy", {"to_lease": "L9"}),
    ):
        reply = link.call(op, lease="L-not-mine", **fields)
        assert "was started by this worker" in reply["error"], (op, reply)
    # ending or forgetting what it never started does nothing
    assert link.call("end", lease="L-not-mine", keep_folder=False) == {"id": link.n}
    assert link.call("forget_copy", lease="L-not-mine") == {"id": link.n}


def test_a_session_gets_the_host_memory_and_cores_its_signed_grant_booked(launcher):
    """Issue 24: the launcher gave every session the machine's ``session.host-memory-limit``
    whatever its lease booked; now the limits are the grant's (the broker's signature: a worker
    cannot raise them), ``memory.high`` below ``memory.max`` so that it slows before it is killed,
    and ``cpu.max`` for its cores."""
    import secrets

    from tests.support.service_account import service_account

    path, key = launcher
    link = Link(path)
    link.call("hello", worker=WORKER)
    with service_account("j5a" + secrets.token_hex(3)) as user:
        booked = grants.new_grant(
            user.pw_name, "L7", WORKER, [0], 2**20, host_memory=256 * 2**20, cpu_milli=250
        )
        unbooked = grants.new_grant(user.pw_name, "L8", WORKER, [0], 2**20)  # its machine: none
        replies = [link.start("L7", grants.sign(booked, key))]
        replies.append(link.start("L8", grants.sign(unbooked, key)))
        try:
            assert all("error" not in r for r in replies), replies
            if not replies[0]["containment"].startswith("cgroup"):
                assert not os.access("/sys/fs/cgroup", os.W_OK), replies  # none to be had here
                return
            assert replies[0]["host_memory_limit"] == 256 * 2**20
            assert replies[0]["cpu_quota"] in (25_000, None)  # None: no cpu controller here
            assert replies[1]["host_memory_limit"] is None and replies[1]["cpu_quota"] is None
        finally:
            for lease in ("L7", "L8"):
                link.call("end", lease=lease, keep_folder=False)
