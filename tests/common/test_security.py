"""jupyter_gpu.common.security without a pool: which scheme a server listens on, the errors that
name the settings to change, and the hand-over of a worker's TLS settings to its session processes
through the environment."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys

import dask.config
import pytest
from distributed.security import Security

from jupyter_gpu.common import security


def test_no_tls_configured_means_tcp_and_harmless_connection_args():
    sec = Security(require_encryption=False)
    assert security.listen_scheme("scheduler", sec) == "tcp"
    assert security.listen_address("127.0.0.1", "worker", security=sec) == "tcp://127.0.0.1:0"
    assert security.connection_args("client", sec)["ssl_context"] is None
    security.check_address("tcp://10.0.0.1:8786", "client", sec)  # nothing to complain about
    assert security.describe(sec, "scheduler").startswith("TLS: off")


def test_certificates_or_required_encryption_mean_tls():
    with_cert = Security(require_encryption=False, tls_ca_file="ca.pem", tls_scheduler_cert="s.pem")
    assert security.listen_scheme("scheduler", with_cert) == "tls"
    assert security.listen_scheme("worker", with_cert) == "tcp"  # no worker certificate
    assert security.listen_scheme("worker", Security(require_encryption=True)) == "tls"
    # a session follows its worker's scheme, whatever lies in the config
    assert (
        security.listen_address("h", "worker", security=with_cert, like="tcp://h:1") == "tcp://h:0"
    )
    assert (
        security.listen_address(
            "h", "worker", security=Security(require_encryption=False), like="tls://h:1"
        )
        == "tls://h:0"
    )


def test_command_line_options_require_tls_for_their_roles():
    sec = security.pool_security("ca.pem", "cert.pem", "key.pem", roles=("scheduler", "worker"))
    assert sec.require_encryption
    assert (sec.tls_ca_file, sec.tls_scheduler_cert, sec.tls_worker_key) == (
        "ca.pem",
        "cert.pem",
        "key.pem",
    )
    assert sec.tls_client_cert is None


def test_mismatches_are_reported_with_the_settings_to_change():
    with pytest.raises(security.TlsConfigError) as err:
        security.check_address("tls://pool:8786", "client", Security(require_encryption=False))
    text = str(err.value)
    assert "tls://pool:8786 uses TLS" in text
    for name in (
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
        "distributed.comm.tls.client.key",
    ):
        assert name in text
    with pytest.raises(security.TlsConfigError, match="write its address as tls://pool:8786"):
        security.check_address("tcp://pool:8786", "client", Security(require_encryption=True))
    with pytest.raises(security.TlsConfigError, match="worker role"):
        security.listen_args("worker", Security(require_encryption=True), address="tls://h:0")


def test_security_env_gives_a_child_process_the_same_security(tmp_path):
    # a space, and a name that reads as a number
    ca, cert = tmp_path / "my ca.pem", tmp_path / "123"
    sec = Security(
        require_encryption=True,
        tls_ca_file=str(ca),
        tls_worker_cert=str(cert),
        tls_worker_key="-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n",
        tls_min_version=ssl.TLSVersion.TLSv1_3,
    )
    env = security.security_env(sec)
    assert "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT" not in env  # unset stays unset
    attrs = [
        "require_encryption",
        "tls_ca_file",
        "tls_worker_cert",
        "tls_worker_key",
        "tls_min_version",
    ]
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from distributed.security import Security; "
            f"s = Security(); print(repr([getattr(s, a) for a in {attrs!r}]))",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.stdout.strip() == repr([getattr(sec, a) for a in attrs]), child.stderr


def test_a_security_loader_is_honoured_for_clients():
    with dask.config.set({"distributed.client.security-loader": f"{__name__}._loader"}):
        sec = security.client_security("tls://somewhere:8786")
    assert sec.tls_ca_file == "loaded-for-tls://somewhere:8786"


def _loader(info: dict) -> Security:
    return Security(require_encryption=True, tls_ca_file=f"loaded-for-{info['address']}")
