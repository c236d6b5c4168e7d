"""jupyter_gpu.common.pool_credentials without a pool: the files it makes, what it trusts, and how a
client finds them from an address (client_security)."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys

import pytest

from jupyter_gpu.common import pool_credentials as pc
from jupyter_gpu.common.security import ROLES, client_security, has_certificate


@pytest.fixture
def index(tmp_path, monkeypatch):
    """The index folder of this test: in a home of its own (the account's real home is not
    touched)."""
    monkeypatch.setattr(pc, "_account_home", lambda: str(tmp_path / "home"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    return tmp_path / "home" / ".local" / "share" / "jupyter-gpu-tls"


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bool:
    """Whether a TLS handshake between the two contexts succeeds (and the server accepts the
    client's first bytes: TLS 1.3 reports a refused client certificate only then)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    done = {"server": False, "client": False}
    try:
        for _ in range(20):
            for name, end in (("client", client), ("server", server)):
                if not done[name]:
                    try:
                        end.do_handshake()
                        done[name] = True
                    except ssl.SSLWantReadError:
                        pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if all(done.values()):
                client.write(b"ping")
                s_in.write(c_out.read())
                return server.read(4) == b"ping"
    except ssl.SSLError:
        return False
    return False


def test_credentials_are_made_private_and_replace_what_was_there(tmp_path):
    folder = tmp_path / "pool-tls"
    folder.mkdir(mode=0o777)
    (folder / "stale").write_text("old")
    old_umask = os.umask(0)  # the folder and files are private whatever the umask
    try:
        creds = pc.create_credentials(str(folder))
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(folder)) == ["ca.pem", "pool.crt", "pool.key"]
    assert _mode(folder) == 0o700 and all(_mode(folder / f) == 0o600 for f in os.listdir(folder))
    assert pc.load_credentials(str(folder)) == creds
    sec = creds.security(ROLES)
    assert sec.require_encryption and all(has_certificate(sec, role) for role in ROLES)
    # mutual TLS works with them (a handshake in memory: Dask's own contexts for both ends) ...
    server = sec.get_listen_args("scheduler")["ssl_context"]
    assert _handshake(server, sec.get_connection_args("client")["ssl_context"])
    # ... and a peer with a certificate of another CA, or none, is refused
    other = pc.create_credentials(str(tmp_path / "other-tls")).security(ROLES)
    assert not _handshake(server, other.get_connection_args("client")["ssl_context"])
    no_cert = ssl.create_default_context()
    no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
    assert not _handshake(server, no_cert)
    assert pc.credentials_dir("/r/jupyter-gpu-pool-ann.json") == "/r/jupyter-gpu-pool-ann-tls"


@pytest.mark.parametrize("spoil", ["group-readable", "link", "key-readable"])
def test_credentials_others_could_touch_are_not_used(tmp_path, spoil):
    creds = pc.create_credentials(str(tmp_path / "pool-tls"))
    if spoil == "group-readable":
        os.chmod(creds.directory, 0o750)
        assert pc.load_credentials(creds.directory) is None
    elif spoil == "key-readable":
        os.chmod(creds.key_file, 0o644)
        assert pc.load_credentials(creds.directory) is None
    else:
        link = tmp_path / "link-tls"
        link.symlink_to(creds.directory)
        assert pc.load_credentials(str(link)) is None


def test_a_client_finds_the_certificate_of_its_own_live_pool_by_address(
    tmp_path, index, monkeypatch
):
    creds = pc.create_credentials(str(tmp_path / "pool-tls"))
    address = "tls://127.0.0.1:41234"
    pc.register(address, creds)  # this process plays the pool
    assert _mode(index) == 0o700
    (entry,) = index.iterdir()
    assert entry.name == "127.0.0.1-41234.json" and _mode(entry) == 0o600
    # found whatever the environment says: tools and test harnesses change HOME and
    # JUPYTER_RUNTIME_DIR
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "elsewhere"))
    assert pc.credentials_for(address) == creds
    sec = client_security(address)
    assert (
        sec.tls_client_cert == creds.cert_file
        and sec.tls_ca_file == creds.ca_file
        and sec.require_encryption
    )
    # other addresses, plain TCP, and no address at all get nothing from it
    for other in ("tls://127.0.0.1:41235", "tcp://127.0.0.1:41234", "127.0.0.1:41234", None):
        assert pc.credentials_for(other) is None
        assert not has_certificate(client_security(other), "client")
    pc.unregister(address)
    assert pc.credentials_for(address) is None


def test_an_entry_of_a_dead_pool_or_of_another_machine_is_ignored_and_swept(tmp_path, index):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    old = pc.create_credentials(str(tmp_path / "old-tls"))
    pc.register("tls://127.0.0.1:5000", old, pid=int(dead))
    assert pc.credentials_for("tls://127.0.0.1:5000") is None  # its pool is gone
    new = pc.create_credentials(str(tmp_path / "new-tls"))
    # the next pool to start sweeps the dead one's entry and folder
    pc.register("tls://127.0.0.1:6000", new)
    assert not os.path.exists(old.directory)
    assert [p.name for p in index.iterdir()] == ["127.0.0.1-6000.json"]
    # a home shared by several machines: an entry written on another one is not this machine's pool
    entry = index / "127.0.0.1-6000.json"
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "host": "another-machine"}))
    assert pc.credentials_for("tls://127.0.0.1:6000") is None


def test_an_account_without_a_usable_home_indexes_in_its_runtime_dir(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("a file, not a folder")
    monkeypatch.setattr(pc, "_account_home", lambda: str(tmp_path / "home"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    creds = pc.create_credentials(str(tmp_path / "pool-tls"))
    path = pc.register("tls://127.0.0.1:8000", creds)
    assert path == str(tmp_path / "runtime" / "jupyter-gpu-tls" / "127.0.0.1-8000.json")
    assert pc.credentials_for("tls://127.0.0.1:8000") == creds
    pc.unregister("tls://127.0.0.1:8000")
    assert pc.entry_path("tls://127.0.0.1:8000") is None


def test_an_index_others_can_write_to_is_not_trusted(tmp_path, index):
    creds = pc.create_credentials(str(tmp_path / "pool-tls"))
    pc.register("tls://127.0.0.1:7000", creds)
    os.chmod(index, 0o777)
    assert pc.credentials_for("tls://127.0.0.1:7000") is None
    os.chmod(index, 0o700)
    entry = index / "127.0.0.1-7000.json"
    data = json.loads(entry.read_text())
    data["address"] = "tls://127.0.0.1:7001"  # an entry must name the address it is filed under
    entry.write_text(json.dumps(data))
    assert pc.credentials_for("tls://127.0.0.1:7000") is None
