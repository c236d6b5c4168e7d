"""The pool's service account, for tests that start ``jupyter-gpu pool up`` and ``jupyter-gpu
worker`` as root: started as root, both give root up for it (``pool/privileges.py``), and refuse to
start without it.

Each pool gets an account of its own (``jgpusvc<random>``: several test runs on one machine never
share one), with a home folder (its runtime files, the pool key, live there); both are removed at
the end, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator

PREFIX = "jgpusvc"
ENV = "DASK_JUPYTER_GPU__SERVICE_ACCOUNT"


@contextlib.contextmanager
def service_account(name: str | None = None) -> Iterator[pwd.struct_passwd]:
    """A fresh service account (with a home), removed at the end."""
    name = name or PREFIX + secrets.token_hex(3)
    subprocess.run(["userdel", "-r", "-f", name], capture_output=True)  # a killed run's leftover
    subprocess.run(["useradd", "-m", "-U", "-s", "/usr/sbin/nologin", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True)


def give(entry: pwd.struct_passwd, *paths: os.PathLike | str) -> None:
    """Make ``paths`` (files, or folders and what is in them) the service account's."""
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                for item in dirs + files:
                    os.chown(os.path.join(root, item), entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def services_env(*files: str) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """What a test adds to the environment of ``pool up``/``worker`` it starts itself, and where
    ``files`` (TLS keys...) are for them: run as root, a fresh service account (its name in the
    environment) and a copy of ``files`` it owns, in a folder of its own; otherwise nothing and the
    files as they are. Everything made is removed at the end."""
    if os.geteuid() != 0:
        yield {}, {f: f for f in files}
        return
    import shutil
    import tempfile

    with service_account() as entry:
        folder = tempfile.mkdtemp(prefix="jgpusvc-files-", dir="/var/tmp")
        try:
            copies = {}
            for f in files:
                copies[f] = shutil.copy(f, os.path.join(folder, os.path.basename(f)))
            give(entry, folder)
            yield {ENV: entry.pw_name}, copies
        finally:
            shutil.rmtree(folder, ignore_errors=True)
