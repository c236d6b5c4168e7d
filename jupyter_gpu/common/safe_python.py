"""Starting Python for the pool's own processes with nothing another account can write on its path.

Why: ``python -m module`` puts the current folder first on ``sys.path``, ``PYTHONPATH`` and the user's
site-packages are read from the environment, and Dask puts a worker's local directory on its path.
Any of these in a folder another account can write is code that account runs in the pool's process:
a user who made ``/tmp/dask-scratch-space`` first had her ``pynvml.py`` imported by root workers,
and the zygote was started with ``-m`` from the worker's working directory.

:func:`python_command` starts ``python -I`` (no environment, no user site, no current folder) and
puts back only the entries of this process's ``sys.path`` that are safe for ``uid``: absolute,
and neither they nor a folder above them writable by an account other than root and ``uid`` (a
sticky folder such as ``/tmp`` may be above, not be one). :func:`unsafe_entries` says which entries
were left out and why.
"""

from __future__ import annotations

import json
import os
import stat
import sys


def why_unsafe(path: str, uid: int) -> str | None:
    """Why ``path`` may not be on the path of a process of ``uid`` (None: it may)."""
    if not os.path.isabs(path):
        return "not an absolute path"
    last = os.path.normpath(path)
    parts = last.split(os.sep)
    shared_parent: str | None = None  # the folder above, if other accounts may add names to it
    for i in range(1, len(parts) + 1):
        here = os.sep.join(parts[:i]) or os.sep
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            # not there (yet): safe only if nobody else could make it
            if shared_parent is not None:
                return f"{here} does not exist and other accounts may create it in {shared_parent}"
            return None
        except OSError as exc:
            return f"{here}: {exc.strerror}"
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, uid):
                return f"{here} is a link of uid {st.st_uid}"
            return why_unsafe(os.path.join(os.path.realpath(here), *parts[i:]), uid)
        if st.st_uid not in (0, uid):
            return f"{here} belongs to uid {st.st_uid}"
        shared_parent = None
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            if not st.st_mode & stat.S_ISVTX or here == last:
                return (
                    f"{here} may be written by other accounts (mode {stat.S_IMODE(st.st_mode):o})"
                )
            shared_parent = here  # sticky (/tmp): others may add names, not replace ours
    return None


def safe_path(uid: int | None = None, entries: list[str] | None = None) -> list[str]:
    """The entries of ``sys.path`` (or ``entries``) that are safe for ``uid`` (default: ours)."""
    uid = os.geteuid() if uid is None else uid
    return [p for p in (sys.path if entries is None else entries) if p and not why_unsafe(p, uid)]


def unsafe_entries(uid: int | None = None) -> dict[str, str]:
    """Entry -> why it is left out, for the log."""
    uid = os.geteuid() if uid is None else uid
    return {p: why for p in sys.path if p and (why := why_unsafe(p, uid))}


# ``python -I -c BOOT MODULE PATH ARGS...``: the module's name stays readable in the command line
BOOT = (
    "import json, runpy, sys; module, path = sys.argv[1], json.loads(sys.argv[2]); "
    "del sys.argv[1:3]; sys.path[:0] = path; "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)


def python_command(module: str, *args: str, uid: int | None = None) -> list[str]:
    """``python -I`` running ``module`` as ``-m`` would, with only the safe part of our path."""
    return [sys.executable, "-I", "-c", BOOT, module, json.dumps(safe_path(uid)), *args]


def drop_unsafe_entries(uid: int | None = None) -> list[str]:
    """Remove from this process's ``sys.path`` what is not safe for ``uid``; returns what went."""
    gone = [p for p in sys.path if not p or why_unsafe(p, os.geteuid() if uid is None else uid)]
    sys.path[:] = [p for p in sys.path if p not in gone]
    return gone
