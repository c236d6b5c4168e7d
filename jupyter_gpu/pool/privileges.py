"""Who the pool's services run as: started as root, they give root up before Dask starts.

Why: a Dask scheduler, nanny or worker answers anyone who reaches its port, and everything it does
it does as its account. ``jupyter-gpu pool up`` and ``jupyter-gpu worker`` are started as root (by
hand or from the shipped unit) because some of their work needs root: reading the grant-signing key,
and giving a session its user's account. That work is done first, or handed to the launcher, and the
process then drops to the pool's service account (``jupyter-gpu.service-account``, ``jupyter-gpu``
by default) before it imports Dask's network code or starts a thread:

- ``pool up``: reads (or makes) the grant-signing key (``common/grants.py``) as root, then drops; the
  scheduler and the broker run as the service account, and the key lives only in its memory, which
  other processes of that account cannot read (a process that changed its credentials is not
  dumpable: no ``ptrace``, no ``/proc/<pid>/mem``);
- ``worker``: forks the privileged launcher (``launcher/``), then drops; its nannies and Dask
  workers run as the service account and ask the launcher for sessions.

Dropping is ``setgroups``, ``setgid``, ``setuid`` (checked: root cannot be taken back), the
account's environment (its home and names; Jupyter's folders are its own, not root's), a private
umask, ``/`` or its home as working folder, and nothing another account can write on ``sys.path``
(``common/safe_python.py``). Started as another account, the services run as that account and
nothing changes (no launcher: sessions run as that account too, and users are not isolated).
"""

from __future__ import annotations

import logging
import os
import pwd
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_ACCOUNT = "jupyter-gpu"
# an environment's pointers to root's own folders, which the service account must not use
ROOTS_FOLDERS = (
    "JUPYTER_RUNTIME_DIR",
    "JUPYTER_DATA_DIR",
    "JUPYTER_CONFIG_DIR",
    "XDG_RUNTIME_DIR",
    "XDG_DATA_HOME",
    "XDG_CONFIG_HOME",
    "XDG_CACHE_HOME",
)


class PrivilegeError(RuntimeError):
    """The service cannot give root up as configured; the message names the fix."""


def started_as_root() -> bool:
    return os.geteuid() == 0


def service_account(command: str) -> pwd.struct_passwd:
    """The pool's service account (Dask config ``jupyter-gpu.service-account``), checked."""
    from jupyter_gpu.common import config

    name = str(config.get("service-account") or DEFAULT_ACCOUNT)
    fix = (
        f"Create it (`useradd --system --create-home --home-dir /var/lib/{name} {name}`) and "
        f"give it the pool's files (`chown {name}` the token file, quota file and audit store), "
        "or name another account in Dask config jupyter-gpu.service-account"
    )
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(
            f"`jupyter-gpu {command}` was started as root: it runs Dask as the pool's service "
            f"account {name!r}, which does not exist on this machine. {fix}."
        ) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise PrivilegeError(
            f"the pool's service account {name!r} is root's (uid or gid 0): no Dask process of "
            f"the pool runs as root. {fix}."
        )
    home = entry.pw_dir
    try:
        st = os.stat(home)
    except OSError:
        raise PrivilegeError(
            f"the pool's service account {name!r} has no home folder ({home}): its runtime files "
            f"(the pool key) live there. {fix}."
        ) from None
    if st.st_uid != entry.pw_uid:
        raise PrivilegeError(
            f"the home folder of the pool's service account {name!r} ({home}) is not its own. "
            f"`chown {name} {home}`."
        )
    return entry


def drop_to(entry: pwd.struct_passwd) -> None:
    """Give root up for ``entry`` (see the module docstring); irreversible."""
    from jupyter_gpu.common.safe_python import drop_unsafe_entries

    os.setgroups(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)) - {0}))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.geteuid() != entry.pw_uid or os.getegid() != entry.pw_gid:
        raise PrivilegeError(f"still uid {os.geteuid()} after setuid({entry.pw_uid})")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("root could be taken back after dropping it")
    for name in ROOTS_FOLDERS:
        os.environ.pop(name, None)
    os.environ.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    os.umask(0o077)
    os.chdir(entry.pw_dir)
    gone = drop_unsafe_entries()
    log.info(
        "running as %s (uid %d)%s",
        entry.pw_name,
        entry.pw_uid,
        f"; left off the module path: {gone}" if gone else "",
    )


def pool_up_as_service(port: int) -> Any:
    """``pool up`` started as root: the grant-signing key read (or made), then root given up.
    Returns the key, for the broker (``broker/grant_signer.py``)."""
    from jupyter_gpu.common import grants

    entry = service_account("pool up")
    key = grants.ensure_private_key(grants.private_key_path(f"tcp://:{port}"))
    drop_to(entry)
    return key


def worker_as_service(address: str) -> int:
    """``worker`` started as root: the launcher forked (with its settings, read here as root),
    then root given up. Returns the launcher's pid (its socket's path is in the environment, for
    the worker processes)."""
    import psutil

    from jupyter_gpu.common import config, grants
    from jupyter_gpu.launcher.cgroups import host_memory_limit
    from jupyter_gpu.launcher.server import SOCKET_ENV, Settings, fork_launcher

    entry = service_account("worker")
    try:
        memory = host_memory_limit(
            config.get("session.host-memory-limit"), psutil.virtual_memory().total
        )
    except (TypeError, ValueError) as exc:
        log.error("jupyter-gpu.session.host-memory-limit is not a size (%s): no limit", exc)
        memory = None
    settings = Settings(
        service_uid=entry.pw_uid,
        service_gid=entry.pw_gid,
        public_key=grants.public_key_path(address),
        host_memory_limit=memory,
        pids_limit=int(config.get("session.pids-limit") or 4096),
        preload=[str(m) for m in config.get("session.preload-modules") or []],
        fork_server=bool(config.get("session.fork-server")),
        min_cpu_milli=int(float(config.get("session.min-cpus") or 0) * 1000),
    )
    pid, path = fork_launcher(settings)
    log.info("the launcher (pid %d) listens at %s", pid, path)
    drop_to(entry)
    os.environ[SOCKET_ENV] = path
    return pid
