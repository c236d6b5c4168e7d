"""The session process's entry point: ``python -m jupyter_gpu.session``.

One session process per (kernel, lease): where ``%%gpu`` cells actually run. The GPU worker forks it
from its zygote (``zygote.py``: Python, NumPy, torch and IPython already imported) or, without one,
starts it ahead of need (a spare), then assigns it a lease: pinned to its GPU and capped at its
memory before CUDA initialises. Its namespace persists across the kernel's cells. It prints one JSON
line with its address on its original stdout, then captures fds 1 and 2 for the cells. If its worker
dies, it dies too (parent-death signal and a watchdog), so no session outlives its worker.

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

from jupyter_gpu.common.protocol import SPAWN_KEY_ENV


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


def serve(
    host: str, worker: str | None, control_fd: int | None, ready: TextIO, spawn_key: str | None
) -> None:
    """Serve the kernel's comm: tell the worker our address on ``ready``, then run cells forever.
    Shared by a process started on its own (``main``) and one forked from the worker's zygote
    (``zygote.py``)."""
    # logs go to the worker's stderr (a copy of fd 2 taken before fd 2 is captured for the cells)
    logging.basicConfig(
        level=os.environ.get("JUPYTER_GPU_SESSION_LOG", "WARNING"),
        stream=os.fdopen(os.dup(2), "w", buffering=1),
        force=True,
        format="%(asctime)s session[%(process)d] %(levelname)s %(message)s",
    )
    from jupyter_gpu.session.server import SessionServer

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
    args = parser.parse_args(argv)
    # the worker's key for ``assign``: read once, and gone from the environment before any user code
    spawn_key = os.environ.pop(SPAWN_KEY_ENV, None)
    die_with_parent()
    ready = os.fdopen(os.dup(1), "w")  # our original stdout: tells the worker our address
    preloader = threading.Thread(
        target=preload,
        args=([m for m in args.preload.split(",") if m],),
        name="jupyter-gpu-preload",
    )
    preloader.start()
    preloader.join()
    serve(args.host, args.worker, args.control_fd, ready, spawn_key)
