"""A session's variables moved to host memory, so that its GPU memory can be reclaimed without losing them.

Why: when the broker reclaims an idle session's lease for someone owed a guarantee, ending the session
would throw away everything its owner built (a model, data on the GPU). Instead the session writes its
namespace to a file in host memory (``/dev/shm`` where it exists) on its own worker, the process ends
(freeing its GPU memory and CUDA context), and the owner's next cell restores the variables into a new
session on that worker, on whichever GPU it gets there.

What travels: every user variable that cloudpickle can serialize. CUDA tensors and modules come back on
the new session's GPU (the only one it sees). Modules are re-imported by name. Objects that cannot be
serialized (open files, generators, sockets, CUDA streams) are listed by name, so the owner is told
exactly what is gone; nothing else is dropped silently.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import tempfile
import types
from typing import Any

log = logging.getLogger(__name__)


def offload_dir(tag: str) -> str:
    """Where a worker keeps offloaded namespaces: host memory (``/dev/shm``) when the machine has it."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    path = os.path.join(base, f"jupyter-gpu-offload-{tag}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def user_names(ns: dict, hidden: dict | None) -> list[str]:
    """The names a user made: not IPython's own (``In``, ``Out``, ``_i3``, ``get_ipython`` ...)."""
    hidden = hidden or {}
    return [n for n in ns if not n.startswith("_") and n not in hidden]


def save_namespace(ns: dict, hidden: dict | None, path: str) -> dict:
    """Write the user's variables to ``path``; returns what was saved, what could not be, and the size."""
    import cloudpickle

    saved: dict[str, tuple[str, Any]] = {}
    lost: list[dict] = []
    for name in user_names(ns, hidden):
        value = ns[name]
        if isinstance(value, types.ModuleType):
            saved[name] = ("module", value.__name__)
            continue
        try:
            saved[name] = ("value", cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:  # noqa: BLE001 - anything unpicklable is reported by name, not fatal
            lost.append({"name": name, "type": type(value).__name__, "why": f"{type(exc).__name__}: {exc}"[:200]})
    tmp = f"{path}.part"
    with open(tmp, "wb") as f:
        pickle.dump(saved, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return {"path": path, "saved": sorted(saved), "lost": lost, "bytes": os.path.getsize(path)}


def load_namespace(ns: dict, path: str) -> dict:
    """Put the variables saved at ``path`` back into ``ns`` and delete the file; returns what came back."""
    import cloudpickle

    with open(path, "rb") as f:
        saved = pickle.load(f)
    restored, failed = [], []
    for name, (kind, data) in saved.items():
        try:
            ns[name] = importlib.import_module(data) if kind == "module" else cloudpickle.loads(data)
            restored.append(name)
        except Exception as exc:  # noqa: BLE001 - e.g. a class whose module this worker lacks
            failed.append({"name": name, "why": f"{type(exc).__name__}: {exc}"[:200]})
    try:
        os.unlink(path)
    except OSError:
        pass
    return {"restored": sorted(restored), "failed": failed}
