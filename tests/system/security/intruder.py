"""What another local account tries against a user's embedded pool. Run by test_embedded_private.py
as that account: ``python intruder.py CONFIG`` (a JSON text); prints one JSON list, one entry per
attempt: ``{"name", "got_in", "detail"}``.

The config names what the intruder is told (more than it could find out by itself): the pool's
scheduler address, its workers' and a live session's addresses, and the paths of the runtime file,
the credentials folder and files, the index entry and the log. Two controls must succeed, so that a
refusal means the pool refused, not that this script cannot work as this account: a plain TCP
connect to the scheduler's port (it is reachable), and a TLS Dask server of the intruder's own
answering the intruder's own certificate.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable
from typing import Any

TIMEOUT = 10


def attempt(name: str, fn: Callable[[], Any]) -> dict:
    try:
        result = fn()
    except BaseException as exc:  # noqa: BLE001 - every way of failing is a refusal to record
        return {"name": name, "got_in": False, "detail": f"{type(exc).__name__}: {exc}"[:400]}
    return {"name": name, "got_in": True, "detail": repr(result)[:400]}


def read(path: str) -> Any:
    if os.path.isdir(path):
        return os.listdir(path)
    with open(path, "rb") as f:
        return f.read(64)


def own_certificate(directory: str) -> dict[str, str]:
    """A CA and a certificate of the intruder's own (it can make any certificate but the pool's)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("intruder CA"))
        .issuer_name(name("intruder CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("jupyter-gpu embedded pool"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": os.path.join(directory, "ca.pem"),
        "cert": os.path.join(directory, "c.pem"),
        "key": os.path.join(directory, "c.key"),
    }
    for path, data in (
        (paths["ca"], ca.public_bytes(serialization.Encoding.PEM)),
        (paths["cert"], cert.public_bytes(serialization.Encoding.PEM)),
        (
            paths["key"],
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
    ):
        with open(path, "wb") as f:
            f.write(data)
    return paths


def call(address: str, op: str, connection_args: dict | None = None, **kwargs: Any) -> Any:
    """One handler of a Dask server, through Dask's own rpc."""
    from distributed.core import rpc

    async def go() -> Any:
        async with rpc(address, connection_args=connection_args or {}, timeout=TIMEOUT) as r:
            return await asyncio.wait_for(getattr(r, op)(**kwargs), TIMEOUT)

    return asyncio.run(go())


def no_certificate() -> dict:
    """TLS that trusts any server and presents no certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return {"ssl_context": ctx}


def run_function() -> bytes:
    from distributed.protocol.pickle import dumps

    return dumps(os.getuid)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    address: str = cfg["address"]
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    mine = own_certificate(tempfile.mkdtemp())
    from distributed.security import Security

    own = Security(
        require_encryption=True,
        tls_ca_file=mine["ca"],
        tls_client_cert=mine["cert"],
        tls_client_key=mine["key"],
        tls_scheduler_cert=mine["cert"],
        tls_scheduler_key=mine["key"],
    )
    forged = {"ssl_context": own.get_connection_args("client")["ssl_context"]}
    results = [
        attempt(
            "control: the scheduler's port is reachable",
            lambda: socket.create_connection((host, int(port)), timeout=5).close(),
        ),
        attempt(
            "control: TLS with my own certificate works against my own server",
            lambda: _own_server(own),
        ),
    ]
    for path in cfg["secrets"]:
        results.append(attempt(f"read {path}", lambda path=path: read(path)))

    def transparent() -> Any:
        from jupyter_gpu.common.security import pool_rpc

        async def go() -> Any:
            async with pool_rpc(address, timeout=TIMEOUT) as r:
                return await asyncio.wait_for(r.gpu_snapshot(), TIMEOUT)

        return asyncio.run(go())

    results.append(attempt("jupyter_gpu's own client (client_security finds nothing)", transparent))

    def dask_client(security: Any = None) -> Any:
        from distributed import Client

        with Client(address, timeout=TIMEOUT, set_as_default=False, security=security) as client:
            return client.run_on_scheduler(os.getuid)

    results.append(attempt("a Dask Client (nothing configured) and run_on_scheduler", dask_client))
    results.append(
        attempt(
            "a Dask Client with a certificate of my own CA and run_on_scheduler",
            lambda: dask_client(own),
        )
    )
    results.append(
        attempt("gpu_snapshot over plain TCP", lambda: call(f"tcp://{host}:{port}", "gpu_snapshot"))
    )
    for label, args in (
        ("with no certificate", no_certificate()),
        ("with a certificate of my own CA", forged),
    ):
        results.append(
            attempt(f"gpu_snapshot {label}", lambda args=args: call(address, "gpu_snapshot", args))
        )
        results.append(
            attempt(
                f"run_function {label}",
                lambda args=args: call(address, "run_function", args, function=run_function()),
            )
        )
        for other in cfg["others"]:  # the workers and a session (they run code too)
            results.append(
                attempt(
                    f"identity of {other} {label}",
                    lambda other=other, args=args: call(other, "identity", args),
                )
            )
    print(json.dumps(results))


def _own_server(security: Any) -> Any:
    """A TLS Dask scheduler of the intruder's own, asked for its identity with the intruder's
    certificate."""
    from distributed import Scheduler

    async def call_in_loop(address: str, sec: Any) -> Any:
        from distributed.core import rpc

        async with rpc(
            address, connection_args=sec.get_connection_args("client"), timeout=TIMEOUT
        ) as r:
            return (await asyncio.wait_for(r.identity(), TIMEOUT))["type"]

    async def outer() -> Any:
        async with Scheduler(
            host="127.0.0.1",
            port=0,
            protocol="tls",
            security=security,
            dashboard=False,
            dashboard_address="127.0.0.1:0",
        ) as sched:
            return await call_in_loop(sched.address, security)

    return asyncio.run(outer())


if __name__ == "__main__":
    main()
