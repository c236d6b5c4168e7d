"""The launcher's zygote: root, it has imported what sessions need, and each child it forks is
confined to its user (``confine.py``) before it serves.

Why root and a fork: a session that starts from scratch spends seconds importing torch; a fork of a
process that has imported it takes milliseconds (``bench/session_start.py`` measures both). Taking
the user's account needs root, and it must happen in the single-threaded child before any thread or
user code exists, so the zygote that forks sessions of several users is root. What makes that
acceptable: the launcher starts it with ``python -I`` from ``/``, with an environment of its own and
only root-owned folders on its path (``common/safe_python.py``); it runs no user code and holds no
secret (no lease secret or session key ever passes through it: its memory is every later child's);
it forks only what the launcher asks on its private socket; and every child closes all descriptors
but its own three, joins its cgroup, enters its own mount namespace and becomes its user before it
does anything else.
"""

from __future__ import annotations

import os
import socket
import traceback

from jupyter_gpu.common.protocol import ForkRequest
from jupyter_gpu.launcher.confine import confine
from jupyter_gpu.session import zygote


def confined_child(sock: socket.socket, msg: ForkRequest, fds: list[int]) -> None:
    """In the forked child: confine, then serve as the user's session (never returns)."""
    code = 1
    try:
        sock.close()
        # the session's Dask settings (its worker's TLS...) into its config, before its environment
        # is cut down to what a login gives
        zygote._apply_environment({str(k): str(v) for k, v in (msg.get("env") or {}).items()})
        spec = msg.get("confine")
        if spec is None:
            raise RuntimeError("the launcher's zygote forks confined sessions only")
        kept = confine(spec, fds)
        zygote.start_session(str(msg.get("host") or "127.0.0.1"), msg.get("worker"), kept)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the worker's log must say why a session never started
        traceback.print_exc()
    finally:
        os._exit(code)


if __name__ == "__main__":
    zygote.main(child=confined_child)
