"""The session process's entry point: ``python -m jupyter_gpu.session``.

One session process per (kernel, lease): where ``%%gpu`` cells actually run. It is forked from a
zygote (``zygote.py``: Python, NumPy, torch and IPython already imported): the launcher's, already
confined to its user, when users are isolated (``launcher/``), or its worker's own; or, without a
zygote, started on its own. Its worker then assigns it its lease: pinned to its GPU and capped at its
memory before CUDA initialises. Its namespace persists across the kernel's cells. It writes one JSON
line with its address on the pipe it was given for that, and logs to fds 1 and 2, a pipe its worker
reads, until it captures them for the cells. If its parent dies, it dies too (parent-death signal
and a watchdog), so no session outlives its worker.

This is the trust boundary's user side: nothing imported from here belongs to the broker or the
worker (``tests/test_architecture.py`` checks that in a fresh interpreter).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import threading
import time
from typing import TextIO


def die_with_parent() -> None:
    """Ask Linux to SIGKILL us when our worker dies, so no session outlives its worker."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # noqa: BLE001 - not Linux: the watchdog thread below still catches it
        pass
    if os.getppid() != parent:
        os._exit(1)

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watchdog, daemon=True, name="jupyter-gpu-parent-watchdog").start()


def preload(modules: list[str]) -> None:
    """Import what cells will need, at low CPU priority: a spare warming up must not slow down the
    sessions, kernels and schedulers that are working now. The niceness is this thread's only
    (Linux), so the session itself runs at normal priority once it is assigned."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional preload (torch on a CPU-only client machine)
            pass  # an optional preload (torch on a CPU-only client machine)


def read_spawn_key(control_fd: int | None, timeout: float = 30.0) -> str | None:
    """The key for this session's first ``assign``: the first line its worker wrote on its private
    socket (never the environment or a zygote's message: a zygote's memory is every later child's,
    and the key must reach this session only)."""
    if control_fd is None:
        return None
    import select

    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n") and len(line) < 1024:
        if not select.select([control_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return None
        chunk = os.read(control_fd, 1)
        if not chunk:
            return None
        line += chunk
    try:
        key = json.loads(line).get("spawn_key")
    except (ValueError, AttributeError):
        return None
    return key if isinstance(key, str) else None


def serve(host: str, worker: str | None, control_fd: int | None, ready: TextIO) -> None:
    """Serve the kernel's comm: tell the worker our address on ``ready``, then run cells forever.
    Shared by a process started on its own (``main``) and one forked from a zygote (``zygote.py``).
    Its fds 1 and 2 are the pipe its worker reads its log from."""
    spawn_key = read_spawn_key(control_fd)
    # logs go to the worker (a copy of fd 2, taken before fd 2 is captured for the cells)
    logging.basicConfig(
        level=os.environ.get("JUPYTER_GPU_SESSION_LOG", "WARNING"),
        stream=os.fdopen(os.dup(2), "w", buffering=1),
        force=True,
        format="%(asctime)s session[%(process)d] %(levelname)s %(message)s",
    )
    from jupyter_gpu.common import no_pickle
    from jupyter_gpu.session.server import SessionServer

    # before it listens: nothing anyone sends runs code before the lease secret is checked (inputs
    # stay ``Serialized`` until the executor rebuilds them for the lease's owner)
    no_pickle.install()

    # an interrupt is SIGINT to the main thread: whatever this process inherited (a worker started
    # with SIGINT ignored, as a background job of a non-interactive shell is), it must raise
    # KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    session = SessionServer(host, worker, control_fd=control_fd, spawn_key=spawn_key)
    ready.write(json.dumps({"address": session.address, "pid": os.getpid()}) + "\n")
    ready.flush()
    ready.close()
    session.run_forever()


def main(argv: list[str] | None = None) -> None:
    """``python -m jupyter_gpu.session``: a session started on its own (no zygote); its worker (or
    the launcher, already as its user) gave it its private socket, its address pipe, and its log
    pipe as fds 1 and 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--preload", default="")
    parser.add_argument(
        "--control-fd",
        type=int,
        default=None,
        help="the worker's end of this session's private socket (worker_link.py)",
    )
    parser.add_argument(
        "--ready-fd", type=int, required=True, help="the pipe on which it announces its address"
    )
    args = parser.parse_args(argv)
    die_with_parent()
    ready = os.fdopen(args.ready_fd, "w")
    preloader = threading.Thread(
        target=preload,
        args=([m for m in args.preload.split(",") if m],),
        name="jupyter-gpu-preload",
    )
    preloader.start()
    preloader.join()
    serve(args.host, args.worker, args.control_fd, ready)
