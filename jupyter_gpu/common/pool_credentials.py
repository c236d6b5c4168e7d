"""The embedded pool's own TLS credentials: made when it starts, found by its address, removed
when it stops.

Why: an embedded pool listens on 127.0.0.1, which every account of the machine can reach, and a
Dask peer that reaches a pool can run code in its processes (as the pool's user). Unless the
administrator configured TLS in Dask config, each embedded pool therefore makes, on start, a CA
of its own and one certificate signed by it, and runs all its comms on ``tls://`` with mutual
TLS: only holders of that certificate get in. The files sit in a folder next to the pool's
runtime file, mode 0700, files 0600, owned by the user, so no other account can read them; the
CA's private key is never written (nothing else will ever be signed with it).

Clients know a pool only by its address (``JUPYTER_GPU_SCHEDULER``, the runtime file), so each
pool also writes an index entry, ``~/.local/share/jupyter-gpu-tls/<host>-<port>.json``, pointing
at its folder.
:func:`credentials_for` reads it: every kernel, CLI command, panel and test of the same account finds the
certificate of any of its embedded pools with no configuration, and another account's lookup
finds nothing (its home is its own, and it could not read these files anyway). The home is the
account's in the password database, not ``$HOME`` or ``JUPYTER_RUNTIME_DIR``: tools and test
harnesses change those for the processes they start (pytest-jupyter does), and a Jupyter server
started so must still reach the pool its user started; an account without a home it can write
uses its Jupyter runtime dir. An entry whose pool is gone (its process died, or it runs on
another machine sharing the home) is ignored, and swept at the next start.

The folder and index are checked before use (owned by this account, closed to others): a folder
someone else made is never trusted.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
import ssl
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jupyter_gpu.common.processes import pid_alive

if TYPE_CHECKING:
    from collections.abc import Iterable

    from cryptography import x509
    from distributed.security import Security

log = logging.getLogger(__name__)

CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "pool.crt", "pool.key"
INDEX_DIR = "jupyter-gpu-tls"
# the credentials die with their pool, so no expiry should end a long-lived one (`--keep`,
# `jupyter-gpu lab`)
VALID_DAYS = 3650


@dataclass(frozen=True)
class PoolCredentials:
    """Where one embedded pool's CA and certificate are; one certificate serves every role."""

    directory: str

    @property
    def ca_file(self) -> str:
        return os.path.join(self.directory, CA_FILE)

    @property
    def cert_file(self) -> str:
        return os.path.join(self.directory, CERT_FILE)

    @property
    def key_file(self) -> str:
        return os.path.join(self.directory, KEY_FILE)

    def security(self, roles: Iterable[str] = ("client",)) -> Security:
        """A ``Security`` that requires TLS 1.3 and presents the pool's certificate in ``roles``
        (the pool itself: all three; its clients: ``client``)."""
        from distributed.security import Security

        files = {
            f"tls_{role}_{part}": path
            for role in roles
            for part, path in (("cert", self.cert_file), ("key", self.key_file))
        }
        return Security(
            require_encryption=True,
            tls_ca_file=self.ca_file,
            tls_min_version=ssl.TLSVersion.TLSv1_3,
            **files,
        )


def credentials_dir(runtime_file: str) -> str:
    """The credentials folder of the pool advertised at ``runtime_file``: next to it,
    ``<name>-tls``."""
    base = runtime_file[: -len(".json")] if runtime_file.endswith(".json") else runtime_file
    return base + "-tls"


def create_credentials(directory: str, hostnames: Iterable[str] = ()) -> PoolCredentials:
    """A fresh CA and certificate in ``directory`` (replaced if it exists: a pool's secret is its
    own).

        The folder is made 0700 and each file 0600 from the start (never readable by others, not
        even for a moment); the certificate names 127.0.0.1, localhost, this host and ``hostnames``,
        though Dask checks only the CA.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if os.path.lexists(directory):
        remove_credentials(directory)
    os.mkdir(directory, 0o700)
    os.chmod(directory, 0o700)  # whatever the umask
    _check_private(directory)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"jupyter-gpu embedded pool CA {os.getpid()}")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("jupyter-gpu embedded pool"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_alt_names(hostnames)), critical=False)
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
    creds = PoolCredentials(directory)
    _write_private(creds.ca_file, ca.public_bytes(serialization.Encoding.PEM))
    _write_private(creds.cert_file, cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        creds.key_file,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return creds


def _alt_names(hostnames: Iterable[str]) -> list[x509.GeneralName]:
    import ipaddress

    from cryptography import x509

    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    for host in (socket.gethostname(), *hostnames):
        entry: x509.GeneralName | None
        try:
            entry = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host) if host else None
        if entry is not None and entry not in names:
            names.append(entry)
    return names


def _write_private(path: str, data: bytes) -> None:
    """Write a new 0600 file (never through a link someone left there)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _check_private(path: str) -> None:
    """Raise PermissionError unless ``path`` (not a link) is this account's and closed to group and
    others."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"{path} is not private to this account (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o}): refusing to use it for the pool's TLS credentials"
        )


def load_credentials(directory: str) -> PoolCredentials | None:
    """The credentials in ``directory`` if it and its files are this account's and private, else
    None."""
    creds = PoolCredentials(directory)
    try:
        for path in (directory, creds.ca_file, creds.cert_file, creds.key_file):
            _check_private(path)
    except OSError as exc:
        log.debug("no usable embedded-pool credentials in %s: %s", directory, exc)
        return None
    return creds


def remove_credentials(directory: str) -> None:
    """Remove a pool's credentials folder (a link is unlinked, never followed)."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.islink(directory) or not os.path.isdir(directory):
            os.unlink(directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------- the index: address -> folder
def index_dirs() -> list[str]:
    """Where this account's index may be, in order: in its home (see the module docstring), then in
    its Jupyter runtime dir."""
    from jupyter_core.paths import jupyter_runtime_dir

    home = _account_home()
    dirs = [os.path.join(home, ".local", "share", INDEX_DIR)] if home else []
    return [*dirs, os.path.join(jupyter_runtime_dir(), INDEX_DIR)]


def _account_home() -> str | None:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_dir or None
    except KeyError:  # a uid with no entry (some containers)
        return None


def _entry_name(address: str) -> str:
    location = address.split("://", 1)[-1]
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in location) + ".json"


def entry_path(address: str) -> str | None:
    """The index entry filed for ``address``, if there is one (whatever its state)."""
    for folder in index_dirs():
        path = os.path.join(folder, _entry_name(address))
        if os.path.lexists(path):
            return path
    return None


def register(address: str, creds: PoolCredentials, pid: int | None = None) -> str:
    """Tell this account's clients that the pool at ``address`` (run by ``pid``) uses ``creds``;
    returns the index entry's path. Raises OSError when no index folder can be written (the pool's
    clients could not find its certificate)."""
    error: OSError | None = None
    for folder in index_dirs():
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            _check_private(folder)
            _sweep(folder, keep=creds.directory)
            path = os.path.join(folder, _entry_name(address))
            tmp = f"{path}.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            _write_private(
                tmp,
                json.dumps(
                    {
                        "address": address,
                        "credentials": creds.directory,
                        "pid": pid or os.getpid(),
                        "host": socket.gethostname(),
                    }
                ).encode(),
            )
            os.replace(tmp, path)
            return path
        except OSError as exc:
            log.warning("cannot index the pool's TLS credentials in %s: %s", folder, exc)
            error = exc
    raise error or OSError("no folder for the index of the pool's TLS credentials")


def unregister(address: str) -> None:
    """Withdraw the index entry of the pool at ``address`` (the pool stopped)."""
    for folder in index_dirs():
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, _entry_name(address)))


def credentials_for(address: str | None) -> PoolCredentials | None:
    """The credentials of this account's embedded pool at ``address``, or None (not ours, not TLS,
    gone)."""
    if not address or not address.startswith("tls://"):
        return None
    for folder in index_dirs():
        path = os.path.join(folder, _entry_name(address))
        try:
            _check_private(folder)
            _check_private(path)
            with open(path) as f:
                entry = json.load(f)
        except (OSError, ValueError) as exc:
            log.debug("no embedded-pool credentials indexed for %s in %s: %s", address, folder, exc)
            continue
        if _current(entry) and entry.get("address") == address:
            creds = load_credentials(str(entry.get("credentials")))
            if creds is not None:
                return creds
    return None


def _current(entry: object) -> bool:
    """Whether an index entry is of a pool running on this machine now."""
    return (
        isinstance(entry, dict)
        and entry.get("host", socket.gethostname()) == socket.gethostname()
        and pid_alive(entry.get("pid"))
    )


def _sweep(folder: str, keep: str) -> None:
    """Remove index entries of pools whose process is gone, and their folders (except ``keep``: a
    new pool may have made its own in the folder a dead one used)."""
    for name in os.listdir(folder):
        if not name.endswith(".json"):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                entry = json.load(f)
        except (OSError, ValueError):
            continue
        if (
            not isinstance(entry, dict)
            or _current(entry)
            or entry.get("host") not in (None, socket.gethostname())
        ):
            # alive, or another machine's (a home shared between machines): not ours to judge
            continue
        directory = entry.get("credentials")
        if (
            isinstance(directory, str)
            and directory != keep
            and load_credentials(directory) is not None
        ):
            remove_credentials(directory)
        with contextlib.suppress(OSError):
            os.unlink(path)
