"""``jupyter-gpu``: run the pool's services, look at the pool, and rerun notebooks headlessly."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from jupyter_gpu import __version__

# the CLI imports Dask lazily: `jupyter-gpu run` and `--version` should start fast
if TYPE_CHECKING:
    from distributed.security import Security

    from jupyter_gpu.common.security import Role


def _security(args: argparse.Namespace, roles: tuple[Role, ...]) -> Security:
    """The ``Security`` of a service: Dask config, overridden by
    ``--tls-ca-file/--tls-cert/--tls-key`` (for ``roles``: the certificate a service presents
    depends on what it is, as with ``dask scheduler``)."""
    from jupyter_gpu.common.security import pool_security

    return pool_security(args.tls_ca_file, args.tls_cert, args.tls_key, roles=roles)


def _service_settings(args: argparse.Namespace) -> None:
    """What the command line of ``pool up`` or ``worker`` leaves out comes from Dask config
    (``jupyter-gpu.scheduler.host/port``, ``jupyter-gpu.worker.scheduler/host``), so that the
    shipped service units run them with no arguments and every setting is in
    ``/etc/dask/jupyter-gpu.yaml``."""
    from jupyter_gpu.common import config

    if args.command == "pool":
        if getattr(args, "embedded", False):  # one user's pool: never the service's address
            args.host = args.host or "127.0.0.1"
            return
        args.host = args.host or config.get("scheduler.host") or "127.0.0.1"
        args.port = int(args.port or config.get("scheduler.port") or 8786)
        return
    args.address = args.address or config.get("worker.scheduler")
    if not args.address:
        raise SystemExit(
            "jupyter-gpu worker: no scheduler to join. Give its address (jupyter-gpu worker "
            "tcp://HOST:8786), or set jupyter-gpu.worker.scheduler in the Dask config "
            "(/etc/dask/jupyter-gpu.yaml for the service unit)."
        )
    args.address = str(args.address)
    args.host = args.host or config.get("worker.host")


def _cmd_pool(args: argparse.Namespace) -> int:
    _service_settings(args)
    if args.action == "up" and not args.embedded and os.geteuid() == 0:
        # first, before Dask: the grant-signing key as root, then root given up
        # (pool/privileges.py)
        from jupyter_gpu.pool.privileges import PrivilegeError, pool_up_as_service

        try:
            key = pool_up_as_service(args.port)
        except PrivilegeError as exc:
            print(f"jupyter-gpu pool up: {exc}", file=sys.stderr)
            return 1
        from jupyter_gpu.broker import grant_signer

        grant_signer.install(key)
    from jupyter_gpu.broker.settings import PoolConfigError
    from jupyter_gpu.common.security import TlsConfigError
    from jupyter_gpu.pool.cluster_manager import ClusterManagerError

    try:
        return _pool_up(args)
    except (TlsConfigError, PoolConfigError, ClusterManagerError) as exc:
        print(f"jupyter-gpu pool up: {exc}", file=sys.stderr)
        return 1


def _http_option(args: argparse.Namespace) -> None:
    """``--http``: serve Dask's HTTP routes (``jupyter-gpu.http``; the nannies hand the setting on
    to their workers)."""
    if args.http:
        import dask.config

        dask.config.set({"jupyter-gpu.http": True})


def _pool_up(args: argparse.Namespace) -> int:
    if args.action == "down":
        return _pool_down()
    if args.action != "up":
        print(
            "usage: jupyter-gpu pool up [--host HOST] [--port PORT] [--embedded] [--http] [--tls-*]",
            file=sys.stderr,
        )
        return 2
    _http_option(args)
    if args.embedded:
        from jupyter_gpu.pool.discovery import runtime_file
        from jupyter_gpu.pool.embedded import run_pool

        # one machine, one program: the same certificate serves the scheduler, its workers and its
        # own client
        sec = _security(args, ("scheduler", "worker", "client"))
        asyncio.run(run_pool(runtime_file(), keep=True, host=args.host, security=sec))
        return 0
    from jupyter_gpu.pool.services import run_scheduler

    asyncio.run(run_scheduler(args.host, args.port, security=_security(args, ("scheduler",))))
    return 0


def _pool_down() -> int:
    """``jupyter-gpu pool down``: stop this user's embedded pool (the one ``jupyter-gpu lab``, a
    kernel or ``pool up --embedded`` started here), its workers and sessions with it."""
    from jupyter_gpu.pool.discovery import runtime_file
    from jupyter_gpu.pool.launcher import stop_embedded_pool

    path = runtime_file()
    if stop_embedded_pool(path):
        print(f"jupyter-gpu: stopped the embedded pool ({path})", file=sys.stderr)
        return 0
    print(
        f"jupyter-gpu: no embedded pool is running for you here ({path}); a pool started with "
        "`pool up` "
        "(without --embedded) stops with its process.",
        file=sys.stderr,
    )
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    _service_settings(args)
    if args.protocol and "://" not in args.address:
        args.address = f"{args.protocol.replace('://', '')}://{args.address}"
    launcher = None
    if os.geteuid() == 0:
        # first, before threads and Dask: the launcher forked, then root given up
        # (pool/privileges.py)
        from jupyter_gpu.pool.privileges import PrivilegeError, worker_as_service

        try:
            launcher = worker_as_service(args.address)
        except PrivilegeError as exc:
            print(f"jupyter-gpu worker: {exc}", file=sys.stderr)
            return 1
    from jupyter_gpu.common.security import TlsConfigError
    from jupyter_gpu.errors import NoGpuAvailable
    from jupyter_gpu.pool.services import run_workers

    _http_option(args)
    host = args.host
    try:
        if host is None and args.interface:
            from distributed.utils import get_ip_interface

            host = get_ip_interface(args.interface)
        virtual = args.virtual_gpus or os.environ.get("JUPYTER_GPU_VIRTUAL_GPUS")
        death_timeout = _seconds(args.death_timeout) if args.death_timeout else None
        return asyncio.run(
            run_workers(
                args.address,
                host,
                virtual,
                security=_security(args, ("worker",)),
                name=args.name,
                death_timeout=death_timeout,
                local_directory=args.local_directory,
                launcher=launcher,
            )
        )
    except (TlsConfigError, NoGpuAvailable, ValueError) as exc:
        print(f"jupyter-gpu worker: {exc}", file=sys.stderr)
        return 1


def _seconds(text: str) -> float:
    from dask.utils import parse_timedelta

    return float(parse_timedelta(text, default="s"))


def _cmd_status(args: argparse.Namespace) -> int:
    from jupyter_gpu.kernelext.status_view import StatusView
    from jupyter_gpu.pool.discovery import pool_address, user_name

    address = args.pool or pool_address()
    if not address:
        print(
            "No pool is running for you on this machine and JUPYTER_GPU_SCHEDULER is not set. "
            "Start one with "
            "`jupyter-gpu pool up`, or run a %%gpu cell (it starts the embedded pool).",
            file=sys.stderr,
        )
        return 1

    from jupyter_gpu.common.security import pool_rpc

    async def fetch() -> dict[str, Any]:
        async with pool_rpc(address) as r:  # the pool's TLS, client role (Dask config)
            snap: dict[str, Any] = await asyncio.wait_for(r.gpu_snapshot(), 10)
        return snap

    try:
        snap = asyncio.run(fetch())
    except Exception as exc:  # noqa: BLE001 - any failure to reach or read the pool is said in one line
        print(f"Could not read the pool at {address}: {exc}", file=sys.stderr)
        return 1
    view = StatusView(snap, user_name(), kernel="", jobs={}, session=None, address=address)
    print(view._repr_mimebundle_()["text/plain"])
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    """``jupyter-gpu token create USER``: issue a token (printed once; the token file keeps its
    hash)."""
    from jupyter_gpu.broker.identity import TokenStore
    from jupyter_gpu.common import config

    path = args.file or config.get("token-file")
    if not path:
        print(
            "No token file is configured: pass --file PATH or set jupyter-gpu.token-file in the "
            "Dask config "
            "of the pool's scheduler (/etc/dask/jupyter-gpu.yaml).",
            file=sys.stderr,
        )
        return 1
    token = TokenStore(str(path)).create(args.user)
    print(token)
    print(
        f"token for {args.user} stored (hashed) in {path}; give it to the user as JUPYTER_GPU_TOKEN",
        file=sys.stderr,
    )
    return 0


def _cmd_usage(args: argparse.Namespace) -> int:
    """``jupyter-gpu usage [--since 7d]``: GPU-hours per team and user, from the audit store or the
    pool."""
    import time

    from dask.utils import parse_timedelta

    from jupyter_gpu.broker.audit import AuditStore, format_usage
    from jupyter_gpu.common import config
    from jupyter_gpu.common.protocol import UsageReport

    since = 0.0
    if args.since:
        try:
            since = time.time() - float(parse_timedelta(args.since, default="s"))
        except (ValueError, KeyError, TypeError):
            try:
                from datetime import datetime

                since = datetime.fromisoformat(args.since).timestamp()
            except ValueError:
                print(
                    f"--since {args.since!r}: give a duration (7d, 12h) or a date (2026-01-31)",
                    file=sys.stderr,
                )
                return 2
    db = args.db or config.get("audit-db")
    if db and not args.pool:
        store = AuditStore(str(db))
        try:
            usage = store.usage(since=since)
        finally:
            store.close()
    else:
        from jupyter_gpu.pool.discovery import pool_address

        address = args.pool or pool_address()
        if not address:
            print(
                "No audit database (--db or jupyter-gpu.audit-db) and no pool to ask (--pool or "
                "JUPYTER_GPU_SCHEDULER).",
                file=sys.stderr,
            )
            return 1

        from jupyter_gpu.common.security import pool_rpc
        from jupyter_gpu.pool.discovery import pool_token, user_name

        # behind JupyterHub, an admin's token shows every user's rows (others see their own)
        token = pool_token(embedded=not (args.pool or os.environ.get("JUPYTER_GPU_SCHEDULER")))
        who = {"user": user_name(), **({"token": token} if token else {})}

        async def fetch() -> UsageReport:
            async with pool_rpc(address) as r:
                report: UsageReport = await asyncio.wait_for(r.gpu_usage(since=since, **who), 10)
            return report

        try:
            usage = asyncio.run(fetch())
        except Exception as exc:  # noqa: BLE001 - any failure to reach or read the pool is said in one line
            print(f"Could not read usage from the pool at {address}: {exc}", file=sys.stderr)
            return 1
    print(format_usage(usage))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from jupyter_gpu.headless.runner import run_notebook

    params = [(name, value) for name, value in (args.parameter or [])]
    return run_notebook(
        args.notebook, output=args.output, parameters=params, timeout=args.timeout, pool=args.pool
    )


def _cmd_lab(args: argparse.Namespace, extra: list[str]) -> int:
    from jupyter_gpu.pool.lab import run_lab

    return run_lab(extra)


def _tls_options(parser: argparse.ArgumentParser, whose: str) -> None:
    """``--tls-ca-file/--tls-cert/--tls-key``, as ``dask scheduler`` and ``dask worker`` have them;
    without them Dask config (distributed.comm.tls.*) applies. Any of them makes the service require
    TLS."""
    parser.add_argument(
        "--tls-ca-file",
        default=None,
        metavar="PEM",
        help="CA certificate(s) that peers' certificates must be signed by",
    )
    parser.add_argument("--tls-cert", default=None, metavar="PEM", help=f"{whose} certificate")
    parser.add_argument(
        "--tls-key",
        default=None,
        metavar="PEM",
        help=f"{whose} private key (may instead be appended to the certificate file)",
    )


def _http_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--http",
        action="store_true",
        help="also serve Dask's HTTP routes (health, metrics, info pages) on the same host; "
        "default: off (jupyter-gpu.http)",
    )


def _job_options(worker: argparse.ArgumentParser) -> None:
    """dask-worker's arguments, which a cluster manager's job passes (dask-jobqueue:
    worker_command "jupyter_gpu.cli worker"): a name, where to listen, how long to wait for the
    scheduler."""
    jobs = worker.add_argument_group("as a cluster manager's job (dask-worker's arguments)")
    jobs.add_argument(
        "--name", default=None, help="the worker's name (one GPU), or NAME-gpuN for each of several"
    )
    jobs.add_argument(
        "--interface", default=None, help="listen on this network interface's address"
    )
    jobs.add_argument(
        "--protocol", default=None, help="the scheduler address's scheme, when it has none"
    )
    jobs.add_argument(
        "--death-timeout",
        default=None,
        help="give up when the scheduler cannot be reached this long",
    )
    jobs.add_argument("--local-directory", default=None, help="the workers' scratch folder")
    jobs.add_argument(
        "--nthreads", default=None, help="accepted and ignored: a GPU worker runs one thread"
    )
    jobs.add_argument(
        "--memory-limit",
        default=None,
        help="accepted and ignored: sessions are limited by jupyter-gpu.session.host-memory-limit",
    )
    jobs.add_argument(
        "--nanny", action="store_true", help="accepted and ignored: GPU workers always have a nanny"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jupyter-gpu", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    pool = sub.add_parser(
        "pool", help="run the pool's scheduler and broker (up), or stop the embedded pool (down)"
    )
    pool.add_argument("action", choices=["up", "down"])
    pool.add_argument(
        "--host",
        default=None,
        help="the address the scheduler listens on (0.0.0.0: every interface); default: "
        "jupyter-gpu.scheduler.host (127.0.0.1)",
    )
    pool.add_argument(
        "--port", type=int, default=None, help="default: jupyter-gpu.scheduler.port (8786)"
    )
    pool.add_argument(
        "--embedded",
        action="store_true",
        help="also run one worker per local GPU in this process group (a one-machine pool)",
    )
    _http_flag(pool)
    _tls_options(pool, "the scheduler's (with --embedded: the whole pool's)")
    worker = sub.add_parser("worker", help="add this machine's GPUs to a pool")
    worker.add_argument(
        "address",
        nargs="?",
        default=None,
        help="the pool's scheduler (default: jupyter-gpu.worker.scheduler)",
    )
    worker.add_argument(
        "--host",
        default=None,
        help="the address its workers and sessions listen on (default: jupyter-gpu.worker.host, "
        "else the local address that reaches the scheduler)",
    )
    worker.add_argument(
        "--virtual-gpus",
        default=None,
        metavar="SPEC",
        help="offer virtual GPUs (2x16GiB) instead of this machine's; default: "
        "JUPYTER_GPU_VIRTUAL_GPUS",
    )
    _http_flag(worker)
    _tls_options(worker, "the workers' (their session processes use it too)")
    _job_options(worker)
    status = sub.add_parser("status", help="print the pool: GPUs, leases, queue")
    status.add_argument("--pool", default=None)
    run = sub.add_parser(
        "run", help="execute a notebook headlessly (exit code 1 on a failing cell)"
    )
    run.add_argument("notebook")
    run.add_argument("-o", "--output", default=None)
    run.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"))
    run.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    run.add_argument(
        "--pool", default=None, help="use this pool instead of starting an embedded one"
    )
    sub.add_parser(
        "lab", help="JupyterLab with the GPU panel and an embedded pool, stopped when Lab exits"
    )
    token = sub.add_parser("token", help="issue user tokens for a pool that requires them")
    token.add_argument("action", choices=["create"])
    token.add_argument("user")
    token.add_argument(
        "--file", default=None, help="the token file (default: jupyter-gpu.token-file)"
    )
    usage = sub.add_parser("usage", help="GPU-hours per team and user (from the audit store)")
    usage.add_argument("--since", default=None, help="a duration back from now (7d, 12h) or a date")
    usage.add_argument(
        "--db", default=None, help="the audit database (default: jupyter-gpu.audit-db)"
    )
    usage.add_argument(
        "--pool", default=None, help="ask this pool's scheduler instead of reading a database"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "lab":
        args = parser.parse_args(argv[:1])
        return _cmd_lab(args, argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING))
    return {
        "pool": _cmd_pool,
        "worker": _cmd_worker,
        "status": _cmd_status,
        "run": _cmd_run,
        "token": _cmd_token,
        "usage": _cmd_usage,
    }[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
