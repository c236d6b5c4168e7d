"""The pool's TLS, in one place: Dask's ``Security`` for each role, listen addresses and comm
arguments.

Why one module: a pool makes comms in many processes (the scheduler, its workers, the session
processes the workers start, kernels, the CLI, the Jupyter server's panel, the headless runner).
If each of them built its own TLS settings, one forgotten ``rpc(address)`` would be the hole
through which an unauthenticated peer talks to the pool, or the place where a TLS pool stops
working. So every comm and every listener goes through here, and all of them read the same
source: Dask's own config (``distributed.comm.require-encryption`` and
``distributed.comm.tls.*``, from ``~/.config/dask/*.yaml`` or ``DASK_DISTRIBUTED__COMM__...``
variables), which is what ``distributed.security.Security()`` reads by itself, so a pool
configured for plain Dask is configured for jupyter-gpu too. The ``--tls-*`` options of
``jupyter-gpu pool up`` and ``jupyter-gpu worker`` override it for their process, like those of
``dask scheduler`` and ``dask worker``.

Roles (the certificate each process presents, as Dask names them):

- ``scheduler``: the pool's scheduler with the broker;
- ``worker``: the GPU workers and the session processes they start (a session serves the kernel's direct
  comm and calls the broker with its worker's certificate; :func:`security_env` hands it over);
- ``client``: kernels, the CLI, the Jupyter server's panel, the headless runner.

An embedded pool with no TLS configured makes its own CA and certificate and runs on mutual TLS
anyway (it listens on 127.0.0.1, which every local account reaches): :func:`client_security`
finds that certificate from the pool's address for the same account, so its clients need no
configuration, and other accounts cannot connect (``jupyter_gpu.common.pool_credentials``).

Dask's TLS is mutual: with a CA file and a certificate configured, each side requires the other
to present a certificate signed by that CA, so only holders of the pool's certificates can
connect to any of its parts.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any, Literal

from distributed.security import Security

from jupyter_gpu.errors import GpuPoolError

Role = Literal["client", "scheduler", "worker"]
ROLES: tuple[Role, ...] = ("client", "scheduler", "worker")

# Security attribute -> the Dask config key it is read from (see distributed/distributed.yaml)
_CONFIG_KEYS: dict[str, str] = {
    "require_encryption": "distributed.comm.require-encryption",
    "tls_ca_file": "distributed.comm.tls.ca-file",
    "tls_ciphers": "distributed.comm.tls.ciphers",
    "tls_min_version": "distributed.comm.tls.min-version",
    "tls_max_version": "distributed.comm.tls.max-version",
    **{
        f"tls_{role}_{part}": f"distributed.comm.tls.{role}.{part}"
        for role in ROLES
        for part in ("cert", "key")
    },
}


class TlsConfigError(GpuPoolError):
    """The TLS settings of this process do not fit the pool it talks to; the message names the
    settings."""


def env_name(config_key: str) -> str:
    """The environment variable that sets a Dask config key (``distributed.comm.tls.ca-file`` ->
    ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``), for messages that tell the user what to set."""
    return "DASK_" + config_key.upper().replace(".", "__").replace("-", "_")


def pool_security(
    ca_file: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    roles: Iterable[Role] = ("client",),
) -> Security:
    """The pool's ``Security``: Dask config, with a CA file and a certificate/key given on a command
    line.

        ``cert``/``key`` are used for each of ``roles`` (``jupyter-gpu pool up`` passes
        ``scheduler``, ``jupyter-gpu worker`` passes ``worker``; an embedded pool, one program on
        one machine, uses the same certificate for all three). As with ``dask scheduler --tls-*``,
        giving any of them requires encryption unless ``distributed.comm.require-encryption`` says
        otherwise. Built anew on each call, so a ``dask.config.set`` in a kernel before ``%gpu
        connect`` is honoured.
    """
    overrides: dict[str, Any] = {}
    if ca_file:
        overrides["tls_ca_file"] = ca_file
    for role in roles:
        if cert:
            overrides[f"tls_{role}_cert"] = cert
        if key:
            overrides[f"tls_{role}_key"] = key
    return Security(**overrides)


def client_security(address: str | None = None) -> Security:
    """The ``Security`` of a client (kernel, CLI, panel, headless runner, tests) of the pool at
    ``address``.

        In order: Dask's ``distributed.client.security-loader`` when one is configured (the hook
        Dask's own ``Client`` calls for deployments that hand out credentials per cluster); the
        credentials of this account's own embedded pool at ``address`` (:func:`embedded_security`:
        an exact match, so it comes before the general config, which may hold the certificate of a
        shared pool), which is how every client of an embedded pool speaks its private TLS with
        nothing configured; else Dask config (the administrator's TLS, plain TCP, or a TLS pool this
        process has no certificate for, which
    :func:`check_address` then reports by name).
    """
    import dask.config

    loader = dask.config.get("distributed.client.security-loader", None)
    if loader and address:
        from distributed.utils import import_term

        found = import_term(loader)({"address": address})
        if isinstance(found, Security):
            return found
    return embedded_security(address) or pool_security()


def embedded_security(address: str | None, roles: Iterable[Role] = ("client",)) -> Security | None:
    """The ``Security`` that presents, in ``roles``, the certificate of this account's embedded pool
    at ``address``; None when ``address`` is not such a pool (another account's, a shared pool,
    plain TCP). See ``jupyter_gpu.common.pool_credentials``."""
    from jupyter_gpu.common.pool_credentials import credentials_for

    creds = credentials_for(address)
    return creds.security(roles) if creds is not None else None


def has_certificate(security: Security, role: Role) -> bool:
    """Whether ``role`` has what Dask needs to build a TLS context: a CA file and its
    certificate."""
    # Dask's Security sets its tls_* fields with setattr: mypy does not see them
    ca_file = security.tls_ca_file  # type: ignore[attr-defined]
    return bool(ca_file and getattr(security, f"tls_{role}_cert"))


def uses_tls(security: Security, role: Role) -> bool:
    """Whether a process in ``role`` listens on ``tls://``: encryption is required, or it has a
    certificate (as ``dask scheduler --tls-cert ...`` listens on tls:// without being told the
    protocol)."""
    return bool(security.require_encryption) or has_certificate(security, role)


def require_certificate(security: Security, role: Role, why: str) -> None:
    """Raise :class:`TlsConfigError` naming the missing settings (and their environment variables)
    when ``role`` has no certificate; ``why`` says what needed one."""
    if has_certificate(security, role):
        return
    missing = [
        k
        for k in (
            "distributed.comm.tls.ca-file",
            f"distributed.comm.tls.{role}.cert",
            f"distributed.comm.tls.{role}.key",
        )
        if not getattr(security, _attr_for(k))
    ]
    settings = [f"{k} ({env_name(k)})" for k in missing]
    raise TlsConfigError(
        f"{why}, but this process has no TLS certificate for the {role} role. Set "
        + (", ".join(settings[:-1]) + " and " if len(settings) > 1 else "")
        + settings[-1]
        + " in its Dask config (the key may instead be appended to the certificate file); see the "
        "Security section of docs/administration.md."
    )


def _attr_for(config_key: str) -> str:
    return next(attr for attr, key in _CONFIG_KEYS.items() if key == config_key)


def scheme_of(address: str | None) -> str | None:
    """``tls`` for ``tls://host:port``; None for an address without a scheme."""
    if address and "://" in address:
        return address.split("://", 1)[0]
    return None


def listen_scheme(role: Role, security: Security | None = None, like: str | None = None) -> str:
    """``tls`` or ``tcp``: the scheme a server of ``role`` listens on.

    ``like``: an address whose scheme to follow when it is tls or tcp. A session process follows
    its worker's, so that a kernel that can reach the worker's pool can reach its session,
    whatever certificates happen to be lying in the config of a pool that does not use them.
    """
    scheme = scheme_of(like)
    if scheme in ("tls", "tcp"):
        return scheme
    return "tls" if uses_tls(security or pool_security(), role) else "tcp"


def listen_address(
    host: str, role: Role, port: int = 0, security: Security | None = None, like: str | None = None
) -> str:
    """``tls://host:port`` or ``tcp://host:port`` for a server of ``role`` (see
    :func:`listen_scheme`)."""
    return f"{listen_scheme(role, security, like)}://{host}:{port}"


def listen_args(
    role: Role, security: Security | None = None, address: str | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``Server.listen``/``distributed.comm.listen`` of a server in ``role``
    (``Security.get_listen_args``), checked so that a missing certificate is reported by name rather
    than as Dask's "TLS expects a ssl_context argument"."""
    sec = security or pool_security()
    if scheme_of(address) == "tls" or (address is None and sec.require_encryption):
        require_certificate(
            sec, role, f"A {role} is to listen on TLS ({address or 'encryption is required'})"
        )
    args: dict[str, Any] = sec.get_listen_args(role)
    return args


def connection_args(role: Role = "client", security: Security | None = None) -> dict[str, Any]:
    """``connection_args`` for ``rpc``/``ConnectionPool`` (and ``**`` for
    ``distributed.comm.connect``) of a process in ``role``: ``Security.get_connection_args``.
    Harmless on a pool without TLS (no context)."""
    args: dict[str, Any] = (security or pool_security()).get_connection_args(role)
    return args


def check_address(address: str, role: Role = "client", security: Security | None = None) -> None:
    """Fail early, with the settings to change, when ``address`` and this process's TLS do not fit:
    a ``tls://`` pool and no certificate here, or a ``tcp://`` pool while this process requires
    encryption. (Dask's own errors say neither which setting nor which role.)"""
    sec = security or pool_security()
    scheme = scheme_of(address)
    if scheme == "tls":
        require_certificate(sec, role, f"The pool at {address} uses TLS")
    elif scheme in (None, "tcp") and sec.require_encryption:
        raise TlsConfigError(
            "This process requires encrypted comms (distributed.comm.require-encryption), so it "
            "will not "
            f"talk to {address} over plain TCP. If the pool uses TLS, write its address as "
            f"tls://{address.split('://', 1)[-1]}; if it does not, unset "
            "distributed.comm.require-encryption "
            f"({env_name('distributed.comm.require-encryption')})."
        )


def pool_rpc(
    address: str, role: Role = "client", security: Security | None = None, **kwargs: Any
) -> Any:
    """A Dask ``rpc`` to ``address`` that speaks the pool's TLS (``connection_args`` of
    ``role``)."""
    from distributed.core import rpc

    sec = security or (client_security(address) if role == "client" else pool_security())
    check_address(address, role, sec)
    return rpc(address, connection_args=connection_args(role, sec), **kwargs)


def security_env(security: Security) -> dict[str, str]:
    """Environment variables that give a child process (a session process) this ``Security`` through
    Dask config, so it presents its worker's certificate even when the worker got it from
    ``--tls-*`` options.

        Values are Python literals (``'/etc/pool/ca.pem'``, ``True``, ``1.2``), which Dask's config
        reads with ``ast.literal_eval``: a path or an in-memory PEM text comes back exactly.
        ``extra_conn_args`` cannot travel this way and is not passed on.
    """
    env: dict[str, str] = {}
    for attr, key in _CONFIG_KEYS.items():
        value = getattr(security, attr, None)
        if value is None:
            continue
        if isinstance(value, ssl.TLSVersion):
            value = {ssl.TLSVersion.TLSv1_2: 1.2, ssl.TLSVersion.TLSv1_3: 1.3}.get(value)
            if value is None:
                continue
        env[env_name(key)] = repr(value)
    return env


def describe(security: Security, role: Role) -> str:
    """One line for a service's banner: whether its comms are encrypted and authenticated."""
    if not uses_tls(security, role):
        return "TLS: off (plain TCP: anyone who can reach this port can use the pool; see docs/administration.md)"
    what = "required" if security.require_encryption else "on"
    ca_file = security.tls_ca_file  # type: ignore[attr-defined]  # set with setattr
    return f"TLS: {what}; peers must present a certificate signed by {_short(ca_file)}"


def _short(value: Any) -> str:
    text = str(value)
    return "the in-memory CA" if "\n" in text else text
