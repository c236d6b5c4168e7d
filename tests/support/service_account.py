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
