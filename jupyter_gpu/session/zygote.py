"""A zygote: one process that has imported what sessions need, and forks them in milliseconds.

Why: a session started from scratch spends seconds importing torch, and eight of them at once on
a small machine take minutes. The zygote imports Python, NumPy, torch (CUDA is never touched
here: a forked CUDA context is unusable), matplotlib, IPython and the session's own server once;
every session is then a ``fork`` of it, sharing those pages copy-on-write (an idle session costs
what it changed, not a torch). The child pins its GPU and caps its memory at ``assign``, before any
CUDA call, exactly like a session started on its own (``main.py``).

Two kinds run this code: a worker's own zygote, whose sessions run as the worker's account (users
not isolated; ``worker/forkserver.py``), and the launcher's, which is root and confines each child
to its user before it serves (``launcher/zygote.py`` passes its ``child``). Both are started with
``python -I`` and only safe folders on their path (``common/safe_python.py``), from ``/``.

Protocol, on the ``SOCK_SEQPACKET`` socket its parent gave it (one message per packet, JSON; the
types are ``common/protocol.py``'s ``ForkRequest`` and ``ZygoteMessage``):

* parent -> zygote ``{"op": "fork", "id", "env", "host", "worker"}`` (and the launcher's ``confine``)
  with three descriptors attached: the session's end of its private socket to the worker
  (``worker_link.py``), the write end of a pipe on which the child announces its address, and the
  write end of the pipe its log goes to (its fds 1 and 2). Nothing secret travels here: what a
  zygote was told stays in its memory, which every later child inherits (the session's key for its
  first ``assign`` comes on its private socket, from the worker);
* zygote -> parent ``{"op": "ready", "pid"}`` once the imports are done, ``{"op": "forked", "id",
  "pid"}``, ``{"op": "failed", "id", "error"}`` and ``{"op": "exited", "pid", "code"}`` (a negative
  code: the signal) when it reaps a child, so its parent learns how each session ended.

The zygote runs no user code and holds no lease or pool secret; it is single-threaded whenever it
forks (the import thread has ended), each child closes every descriptor but its three before
anything else, and the zygote dies with its parent (parent-death signal and a check of its parent).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import select
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import cast

from jupyter_gpu.common.fds import keep_only
from jupyter_gpu.common.protocol import ForkRequest, ZygoteMessage

log = logging.getLogger("jupyter_gpu.session.zygote")

MAX_MESSAGE = 1 << 20  # a fork request carries an environment: well under this

# imported by every session before its first cell (lazily, inside functions): importing them once
# here saves each forked session a third of a second
SESSION_MODULES = (
    "distributed",
    "distributed.core",
    "distributed.comm.tcp",
    "distributed.protocol",
    "distributed.security",
    "cloudpickle",
    "tblib",
    "psutil",
    "jupyter_gpu.common.config",  # the settings' defaults (YAML): 0.07 s of CPU per session
    "jupyter_gpu.common.security",
    "jupyter_gpu.common.datacontract",
    "jupyter_gpu.common.local_transfer",
    "jupyter_gpu.session.server",
    "jupyter_gpu.session.shell",
    "jupyter_gpu.session.executor",
    "jupyter_gpu.session.tracebacks",
    "jupyter_gpu.session.offload",
    "jupyter_gpu.session.standby",
    "jupyter_gpu.session.memory_meter",
    "jupyter_gpu.session.isolation",
    "jupyter_gpu.session.distributed_rank",
    "jupyter_gpu.session.api",
    "jupyter_gpu.session.virtual_device",
    "jupyter_gpu.session.tqdm_bridge",
    "jupyter_gpu.session.progress",
    "IPython.core.interactiveshell",
    "matplotlib_inline.backend_inline",
    "tqdm.std",
    "tqdm.notebook",
    "pynvml",
)


def _send(sock: socket.socket, msg: ZygoteMessage) -> None:
    try:
        sock.send(json.dumps(msg).encode())
    except OSError as exc:  # the worker is gone: the parent check ends us
        log.debug("could not tell the worker %s: %s", msg.get("op"), exc)


def _reap(sock: socket.socket) -> None:
    """Wait for every child that has ended and tell the worker how."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def _reseed() -> None:
    """A fork copies the parent's random generators: every session would draw the same "random"
    numbers. Python's ``random`` reseeds itself after a fork; NumPy's and torch's global generators
    are reseeded here from the operating system, as a freshly started process would be."""
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()


def _apply_environment(env: dict[str, str]) -> None:
    """Take the session's environment, and the Dask settings in it that differ from the zygote's
    (the worker's TLS and the pool's settings for sessions come this way). Re-reading every config
    file would cost each session 0.2 s; only what changed is applied."""
    import dask.config

    changed = {k: v for k, v in env.items() if k.startswith("DASK_") and os.environ.get(k) != v}
    removed = [k for k in os.environ if k.startswith("DASK_") and k not in env]
    os.environ.clear()
    os.environ.update(env)
    if removed:
        dask.config.refresh()
    elif changed:
        dask.config.update(dask.config.config, dask.config.collect_env(changed), priority="new")


def warm_caches(own_account: bool) -> None:
    """Fill, once, the caches every session fills on its way to its first cell, so that a burst
    of first cells (eight kernels at once on two cores) does not pay them eight times (issue 24).

    * tornado's default client TLS context (the system's CA store: 0.03 s of CPU), which its
      ``SSLIOStream`` makes for the first connection the session's comm server accepts, even
      though the server's own context is the one used;
    * matplotlib's registry of backends (every installed distribution's entry points), read the
      first time a shell enables the inline backend;
    * with ``own_account`` (the worker's zygote, whose sessions run as its account), the IPython
      shell itself (``shell.prepare_shell``: 0.04 s). The launcher's root zygote does not: a shell
      made as root would keep root's home and IPython folder in a user's session.

    None of these holds a secret or anything of one session's, and none starts a thread (the
    zygote forks single-threaded)."""
    try:
        from tornado import netutil

        make_context = getattr(netutil, "_client_ssl_defaults", None)  # tornado >= 6.5
        if callable(make_context):
            make_context()
    except Exception as exc:  # noqa: BLE001 - only a cache: each session makes it otherwise
        log.debug("could not make tornado's default TLS context: %s", exc)
    try:
        from matplotlib.backends.registry import backend_registry

        backend_registry.list_all()
    except Exception as exc:  # noqa: BLE001 - only a cache; no matplotlib: nothing to warm
        log.debug("could not read matplotlib's backends: %s", exc)
    if own_account:
        try:
            from jupyter_gpu.session.shell import prepare_shell

            prepare_shell()
        except Exception as exc:  # noqa: BLE001 - each session makes its shell otherwise
            log.warning("the zygote could not prepare the sessions' shell: %s", exc)


Child = Callable[[socket.socket, ForkRequest, list[int]], None]
DESCRIPTORS = 3  # the session's private socket, its address pipe, its log pipe


def start_session(host: str, worker: str | None, fds: list[int]) -> None:
    """In a new, set-up child: serve as a session (``fds``: its private socket and its address
    pipe, already where they stay)."""
    control_fd, ready_fd = fds
    _reseed()
    from jupyter_gpu.session.main import die_with_parent, serve

    die_with_parent()
    serve(host, worker, control_fd, os.fdopen(ready_fd, "w"))


def _child(sock: socket.socket, msg: ForkRequest, fds: list[int]) -> None:
    """In the forked child: become a session process of this zygote's account (never
    returns)."""
    code = 1
    try:
        sock.close()
        _apply_environment({str(k): str(v) for k, v in (msg.get("env") or {}).items()})
        kept = keep_only(fds)  # nothing of the zygote's (its log, its socket) stays open
        start_session(str(msg.get("host") or "127.0.0.1"), msg.get("worker"), kept)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the worker's log must say why a session never started
        traceback.print_exc()
    finally:
        os._exit(code)


def _fork(sock: socket.socket, msg: ForkRequest, fds: list[int], child: Child = _child) -> None:
    if msg.get("op") != "fork" or len(fds) != DESCRIPTORS:
        for fd in fds:
            os.close(fd)
        _send(
            sock,
            {
                "op": "failed",
                "id": msg.get("id"),
                "error": f"a fork request needs {DESCRIPTORS} descriptors",
            },
        )
        return
    try:
        pid = os.fork()
    except OSError as exc:
        _send(sock, {"op": "failed", "id": msg.get("id"), "error": f"fork: {exc.strerror}"})
    else:
        if pid == 0:
            child(sock, msg, fds)
        _send(sock, {"op": "forked", "id": msg.get("id"), "pid": pid})
    finally:
        for fd in fds:
            os.close(fd)


def serve_forks(sock: socket.socket, parent: int, child: Child = _child) -> None:
    """Answer fork requests until the worker closes its end or dies."""
    while True:
        if os.getppid() != parent:
            return
        try:
            readable, _, _ = select.select([sock], [], [], 0.2)
        except InterruptedError:
            readable = []
        if readable:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, DESCRIPTORS)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                return
            if not data:  # the worker closed its end
                for fd in fds:
                    os.close(fd)
                return
            try:
                msg = json.loads(data)
            except ValueError:
                msg = {}
            # anything but a fork request is answered as a failed one
            _fork(sock, cast(ForkRequest, msg if isinstance(msg, dict) else {}), fds, child)
        _reap(sock)


def main(argv: list[str] | None = None, child: Child = _child) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--socket-fd", type=int, required=True, help="the worker's SOCK_SEQPACKET socket"
    )
    parser.add_argument("--preload", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("JUPYTER_GPU_SESSION_LOG", "WARNING"),
        stream=sys.stderr,
        format="%(asctime)s zygote[%(process)d] %(levelname)s %(message)s",
    )
    from jupyter_gpu.session.main import preload

    parent = os.getppid()
    try:
        import ctypes

        # PR_SET_PDEATHSIG, SIGKILL: die with the worker
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)
    except (OSError, AttributeError):
        pass
    sock = socket.socket(fileno=args.socket_fd)
    sock.setblocking(True)
    # imports on a thread of low priority (the machine's running sessions come first), then joined:
    # the zygote must be single-threaded when it forks
    modules = [m for m in args.preload.split(",") if m]
    loader = threading.Thread(target=preload, args=(modules,), name="jupyter-gpu-preload")
    loader.start()
    loader.join()
    for name in SESSION_MODULES:  # what every session imports on its way to serving: once, here
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the session will say what it lacks
            log.warning("the zygote could not import %s: %s", name, exc)
    warm_caches(own_account=child is _child)

    _send(sock, {"op": "ready", "pid": os.getpid()})
    serve_forks(sock, parent, child)
    os._exit(0)


if __name__ == "__main__":
    main()
