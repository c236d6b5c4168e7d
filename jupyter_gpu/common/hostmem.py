"""Host memory that a worker and its sessions share: the folder where idle sessions' variables wait.

Why a module of its own: the worker owns the folder (it creates it, hands paths out, fetches and deletes
files in it) and the session writes into it (offloads, standby copies); both sides must agree on where it
is and how files in it are removed, without the session importing worker code.
"""

from __future__ import annotations

import os
import tempfile


def offload_dir(tag: str) -> str:
    """Where a worker keeps offloaded namespaces: host memory (``/dev/shm``) when the machine has it."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    path = os.path.join(base, f"jupyter-gpu-offload-{tag}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def discard(path: str) -> None:
    """Remove a file of host memory (an offload, a standby copy, a partial write) that may already be gone."""
    try:
        os.unlink(path)
    except OSError:
        pass
