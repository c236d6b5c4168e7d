"""Dask TLS for the whole pool: a pool that requires encryption, real kernels running %%gpu cells
through it, and peers without the pool's certificates refused by the scheduler and by the session
processes.

Certificates are made here with ``cryptography``: one CA for the pool, a certificate per role
(scheduler, worker, client), and a rogue CA with a certificate of its own. Two pools: the embedded
pool configured by Dask config in its environment (``DASK_DISTRIBUTED__COMM__TLS__...``), and
``jupyter-gpu pool up`` plus ``jupyter-gpu worker`` configured by their ``--tls-*`` options only (so
the session processes can know the worker's certificate only from the worker itself).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import ssl
import subprocess
import sys
import time

import pytest

from tests.support.harness import Kernel, own_lease, wait_until
from tests.support.service_account import services_env

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------- certificates
def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_ca(directory, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, str(path)


def _make_cert(directory, ca, name: str) -> tuple[str, str]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = _make_ca(d, "pool-ca"), _make_ca(d, "rogue-ca")
    certs = {role: _make_cert(d, ca, role) for role in ("scheduler", "worker", "client")}
    return {"ca": ca[2], **certs, "rogue": _make_cert(d, rogue_ca, "rogue")}


def tls_env(pki: dict, roles: tuple[str, ...]) -> dict[str, str]:
    """Dask config, as environment variables, requiring TLS with the certificates of ``roles``."""
    env = {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": pki["ca"],
    }
    for role in roles:
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__CERT"] = pki[role][0]
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__KEY"] = pki[role][1]
    return env


def client_security(pki: dict, cert: str = "client"):
    from distributed.security import Security

    return Security(
        require_encryption=True,
        tls_ca_file=pki["ca"],
        tls_client_cert=pki[cert][0],
        tls_client_key=pki[cert][1],
    )


def call(address: str, op: str, security, **kwargs):
    """A scheduler handler, called the way a client of the pool calls it (through
    jupyter_gpu.common.security)."""
    from jupyter_gpu.common.security import pool_rpc

    async def go():
        async with pool_rpc(address, security=security, timeout=10) as r:
            return await getattr(r, op)(**kwargs)

    return asyncio.run(go())


def answers(address: str, **connection_args) -> bool:
    """Whether a comm server at ``address`` answers an ``identity`` request made with
    ``connection_args``."""
    from distributed.comm import connect

    async def go() -> bool:
        try:
            comm = await connect(address, timeout=5, **connection_args)
        except Exception:  # noqa: BLE001 - any failure to connect counts as not answering
            return False
        try:
            await comm.write({"op": "identity", "reply": True})
            reply = await asyncio.wait_for(comm.read(), 5)
            return isinstance(reply, dict) and "type" in reply
        except Exception:  # noqa: BLE001 - any failure to talk counts as not answering
            return False
        finally:
            comm.abort()

    return asyncio.run(go())


def assert_only_pool_certificates_are_accepted(address: str, pki: dict) -> None:
    """``address`` (a scheduler or a session) speaks TLS and refuses every peer without a pool
    certificate."""
    assert address.startswith("tls://"), address
    hostport = address.split("://", 1)[1]
    assert answers(address, **client_security(pki).get_connection_args("client"))
    assert not answers(f"tcp://{hostport}")  # plain TCP
    no_cert = ssl.create_default_context(cafile=pki["ca"])
    no_cert.check_hostname = False
    # TLS, trusting the pool's CA, but no client certificate
    assert not answers(address, ssl_context=no_cert)
    # another CA
    assert not answers(address, **client_security(pki, "rogue").get_connection_args("client"))


# ---------------------------------------------------------------------- the pools and a kernel
@pytest.fixture(scope="module")
def tls_pool(pki, tmp_path_factory):
    """The embedded pool (2 virtual GPUs) with TLS required by Dask config in its environment."""
    from jupyter_gpu.pool.launcher import ensure_embedded_pool, stop_embedded_pool

    path = str(tmp_path_factory.mktemp("tls-pool") / "pool.json")
    # the pool is also a client of its own scheduler
    env = tls_env(pki, ("scheduler", "worker", "client"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        address = ensure_embedded_pool(keep=True, path=path, timeout=120)
    finally:  # only the pool process sees these settings
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    yield address
    stop_embedded_pool(path)


@pytest.fixture(scope="module")
def tls_kernel(tls_pool, pki):
    """A kernel whose Dask config has the CA and the client certificate (nothing else)."""
    k = Kernel(tls_pool, user="tina", env=tls_env(pki, ("client",)))
    yield k
    k.shutdown(now=True)


def test_a_cell_runs_over_tls_and_its_session_speaks_tls(tls_pool, tls_kernel, pki):
    assert tls_pool.startswith("tls://")
    tls_kernel.run("import os\nLOCAL = os.getpid()")
    res = tls_kernel.run(
        "%%gpu --gpus 0.25\nimport os\nanswer = 6 * 7\nprint('remote:', os.getpid() != LOCAL)"
    )
    assert res.error is None, res.error_text
    assert res.stdout == "remote: True\n"
    assert tls_kernel.run("answer").result == "42"
    snap = call(tls_pool, "gpu_snapshot", client_security(pki))
    mine = [ls for gpu in snap["gpus"] for ls in gpu["leases"] if ls["user"] == "tina"]
    # where a session answers is its owner's business
    assert len(mine) == 1 and "address" not in mine[0], mine
    assert mine[0]["worker"].startswith("tls://")
    assert own_lease(tls_kernel)["address"].startswith("tls://")
    # the interrupt travels on its own TLS comm to the session: the cell stops, the session stays
    msg = tls_kernel.submit("%%gpu\nimport time\nprint('started', flush=True)\ntime.sleep(60)")
    tls_kernel.wait_for_output(msg, "started")
    t0 = time.monotonic()
    tls_kernel.interrupt()
    res = tls_kernel.collect(msg)
    assert res.error["ename"] == "KeyboardInterrupt" and "lost" not in res.error["evalue"], (
        res.error_text
    )
    assert time.monotonic() - t0 < 2.0
    assert tls_kernel.run("%%gpu\nprint(answer + 1)").stdout == "43\n"


def test_scheduler_and_session_refuse_peers_without_the_pools_certificate(
    tls_pool, tls_kernel, pki
):
    assert_only_pool_certificates_are_accepted(tls_pool, pki)
    tls_kernel.run("%%gpu\nx = 1")
    session = own_lease(tls_kernel)["address"]
    assert_only_pool_certificates_are_accepted(session, pki)


def test_a_kernel_without_the_certificate_is_told_what_to_set(tls_pool):
    k = Kernel(tls_pool, user="nocert")
    try:
        res = k.run("%%gpu\nx = 1")
        assert res.error is not None
        assert "uses TLS" in res.error["evalue"], res.error_text
        assert "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT" in res.error["evalue"]
    finally:
        k.shutdown(now=True)


def test_the_panel_and_the_cli_read_a_tls_pool_with_the_client_certificate(
    tls_pool, pki, monkeypatch
):
    import dask.config

    from jupyter_gpu.labext.pool_link import GpuPanelConfig, PoolLink

    monkeypatch.setenv("JUPYTER_GPU_SCHEDULER", tls_pool)

    async def panel_state() -> dict:
        link = PoolLink(GpuPanelConfig())
        try:
            return await link.snapshot()
        finally:
            await link.close()

    snap = asyncio.run(panel_state())
    # no certificate in this server
    assert snap["state"] == "unreachable" and "TLS" in snap["error"], snap
    with dask.config.set(
        {
            "distributed.comm.require-encryption": True,
            "distributed.comm.tls.ca-file": pki["ca"],
            "distributed.comm.tls.client.cert": pki["client"][0],
            "distributed.comm.tls.client.key": pki["client"][1],
        }
    ):
        snap = asyncio.run(panel_state())
    assert snap["state"] == "ok" and len(snap["gpus"]) == 2, snap

    cli = [sys.executable, "-m", "jupyter_gpu.cli", "status", "--pool", tls_pool]
    out = subprocess.run(
        cli,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **tls_env(pki, ("client",))},
    )
    assert out.returncode == 0 and "Virtual GPU 0" in out.stdout, out.stderr
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT" in out.stderr, (
        out.stderr
    )


def test_a_two_rank_run_over_tls(tls_kernel):
    """--workers 2: the rendezvous port is asked of rank 0's session, and metrics go to the broker, over TLS
    (the gloo traffic between the ranks itself is not Dask's, and not encrypted: see the
    docs)."""
    res = tls_kernel.run(
        "%%gpu --workers 2\nimport torch, torch.distributed as dist, jupyter_gpu\n"
        "t = torch.tensor([jupyter_gpu.rank() + 1.0])\ndist.all_reduce(t)\n"
        "jupyter_gpu.report(step=0, total=t.item())\ntotal = t.item()"
    )
    assert res.error is None, res.error_text
    assert tls_kernel.run("total").result == "3.0"


def test_pool_up_and_worker_with_tls_options(tls_kernel, pki):
    """`jupyter-gpu pool up --tls-*` and `jupyter-gpu worker tls://... --tls-*` with no TLS in Dask
    config: the session processes get the worker's certificate from the worker (run as root, both
    give root up for a service account, which owns the pool's certificates)."""
    files = [pki["ca"], *pki["scheduler"], *pki["worker"]]
    with services_env(*files) as (extra, copies):
        theirs = {
            "ca": copies[pki["ca"]],
            **{role: tuple(copies[f] for f in pki[role]) for role in ("scheduler", "worker")},
        }
        _tls_services(tls_kernel, pki, theirs, extra)


def _tls_services(tls_kernel, pki, theirs, extra) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tls://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_DISTRIBUTED__COMM__")}
    env.update(JUPYTER_GPU_VIRTUAL_GPUS="1x8GiB", **extra)

    def tls(role: str) -> list[str]:
        ca, (cert, key) = theirs["ca"], theirs[role]
        return ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]

    sched = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_gpu.cli",
            "pool",
            "up",
            "--port",
            str(port),
            *tls("scheduler"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    worker = None
    try:
        from jupyter_gpu.pool.discovery import address_reachable

        assert wait_until(lambda: address_reachable(address), timeout=60)
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_gpu.cli",
                "worker",
                address,
                "--host",
                "127.0.0.1",
                *tls("worker"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert wait_until(
            lambda: len(call(address, "gpu_snapshot", client_security(pki))["gpus"]) == 1,
            timeout=60,
        )
        res = tls_kernel.run(f"%gpu connect {address}")
        assert "Connected to the pool at tls://" in res.stdout, res.error_text
        res = tls_kernel.run("%%gpu --gpus 0.5\nimport os\nprint(os.environ['JUPYTER_GPU_LEASE'])")
        assert res.error is None and res.stdout.startswith("L"), res.error_text + res.stderr
        session = own_lease(tls_kernel)["address"]
        assert_only_pool_certificates_are_accepted(session, pki)
        sched.send_signal(signal.SIGTERM)
        banner = sched.communicate(timeout=30)[0]
        assert f"scheduler at {address}" in banner and "TLS: required" in banner, banner
    finally:
        for proc in (worker, sched):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
