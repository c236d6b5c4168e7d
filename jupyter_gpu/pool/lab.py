"""``jupyter-gpu lab``: JupyterLab with an embedded pool that lives exactly as long as Lab.

Why not start the pool and ``exec`` Lab: the pool is started with ``keep`` (it must not shut itself
down while Lab is open with no notebook running), so nobody was left to stop it, and it stayed up
for ``embedded.keep-idle-timeout`` (8 h) after Lab exited or failed to start. Here Lab runs as a
child; when it ends, however it ends, a pool that this command started is stopped (one that was
already running, e.g. a kernel's or ``jupyter-gpu pool up --embedded``, is left alone).
``jupyter-gpu pool down`` stops an embedded pool by hand. ``--help`` and ``--version`` go to
JupyterLab without starting a pool.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from typing import TextIO

log = logging.getLogger(__name__)

HELP = """usage: jupyter-gpu lab [JUPYTERLAB OPTIONS]

JupyterLab with the GPU panel and an embedded pool on this machine (set JUPYTER_GPU_VIRTUAL_GPUS=2x16GiB on a
machine without a GPU). The pool starts with Lab and stops when Lab exits, unless it was already running.
`jupyter-gpu pool down` stops an embedded pool by hand. The options are JupyterLab's:
"""

_INFO_FLAGS = ("-h", "--help", "--help-all", "--version")


def run_lab(args: list[str], out: TextIO | None = None) -> int:
    """Run JupyterLab with ``args`` beside an embedded pool; return Lab's exit code (1 if no
    pool)."""
    out = out or sys.stderr
    lab = [sys.executable, "-m", "jupyterlab", *args]
    if any(a in _INFO_FLAGS for a in args):
        if "--version" not in args:
            print(HELP, file=sys.stdout, flush=True)
        return subprocess.call(lab)
    import os

    from jupyter_gpu.common.protocol import SCHEDULER_ENV
    from jupyter_gpu.errors import GpuPoolError
    from jupyter_gpu.pool.discovery import live_embedded_pool
    from jupyter_gpu.pool.launcher import (
        EmbeddedPoolError,
        ensure_embedded_pool,
        stop_embedded_pool,
    )

    # a pool of the team's: Lab and its kernels use it, nothing to start
    if os.environ.get(SCHEDULER_ENV):
        print(
            f"jupyter-gpu: using the pool at {os.environ[SCHEDULER_ENV]} ({SCHEDULER_ENV})",
            file=out,
            flush=True,
        )
        return _run_child(lab)
    ours = live_embedded_pool() is None  # a pool already running is someone else's to stop
    try:
        address = ensure_embedded_pool(keep=True)
    # NoGpuAvailable says to set the virtual GPUs
    except (GpuPoolError, EmbeddedPoolError, OSError) as exc:
        print(f"jupyter-gpu lab: could not start the embedded GPU pool: {exc}", file=out)
        return 1
    print(
        f"jupyter-gpu: embedded pool at {address}"
        + ("" if ours else " (already running: left running)"),
        file=out,
        flush=True,
    )
    try:
        return _run_child(lab)
    finally:
        if ours:
            stopped = stop_embedded_pool()
            print(
                "jupyter-gpu: stopped the embedded pool"
                if stopped
                else "jupyter-gpu: the embedded pool had already stopped",
                file=out,
                flush=True,
            )


def _run_child(command: list[str]) -> int:
    """Run ``command``, passing on SIGINT/SIGTERM/SIGHUP (Lab asks before it quits on Ctrl-C), and
    return its exit code; this process stays to clean up after it."""
    child = subprocess.Popen(command)
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda s, _f: child.send_signal(s)) for sig in forwarded}
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # a signal that arrived before the handler was set
                child.send_signal(signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
