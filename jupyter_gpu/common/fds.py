"""What a new session process keeps of the descriptors it was born with: the ones handed to it.

Why: a process forked from a zygote (or the launcher) inherits every open descriptor of its parent:
the parent's log, its sockets, what it was handed for other sessions. A session runs its user's
code, which can use any of them (it read the worker's log and wrote forged lines into it through a
copy of the worker's stderr). So the first thing a new session does, single-threaded and before any
user code, is to close all of them but the ones meant for it.
"""

from __future__ import annotations

import os


def keep_only(fds: list[int]) -> list[int]:
    """Close every descriptor but ``fds``; the last of them (the log pipe) becomes 1 and 2, and
    stdin ``/dev/null``. Returns where the others are now (moved above 2 if they were below)."""
    moved = [os.dup(fd) if fd <= 2 else fd for fd in fds]
    low = 3
    for fd in sorted(set(moved)):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(low, os.sysconf("SC_OPEN_MAX")))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(moved[-1], 1)
    os.dup2(moved[-1], 2)
    os.close(moved[-1])
    return moved[:-1]
