"""Whether a process still runs, asked the same way everywhere (stale folders, runtime files, test
hosts).

Why one helper: the answer has two traps, a process of another account (``kill(pid, 0)`` is refused:
it runs) and a child of ours that exited and was not reaped yet (a zombie still has its pid), and
each copy of the check got one of them wrong at some point.
"""

from __future__ import annotations

import os


def pid_alive(pid: object, reap: bool = False) -> bool:
    """Whether ``pid`` names a running process. ``reap``: when it is an exited child of this
    process, reap it (and say it is gone) instead of counting the zombie; only for children nothing
    else waits for (a ``subprocess.Popen`` would lose its exit code)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if reap:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        except ChildProcessError:
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another account's process
    return True
