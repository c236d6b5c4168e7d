"""A session's variables moved to host memory, so that its GPU memory can be reclaimed without
losing them.

Why: when the broker reclaims an idle session's lease for someone owed a guarantee, ending the
session would throw away everything its owner built (a model, data on the GPU). Instead the session
writes its namespace to a file in host memory (``/dev/shm`` where it exists) on its own worker, the
process ends (freeing its GPU memory and CUDA context), and the owner's next cell restores the
variables into a new session on that worker, on whichever GPU it gets there.

What travels: every user variable that cloudpickle can serialize, pickled together so that objects
shared between variables stay shared (a model and its optimizer, a tensor and its views). CUDA
tensors and modules come back on the new session's GPU (the only one it sees). Modules are
re-imported by name. Objects that cannot be serialized (open files, generators, sockets, CUDA
streams) are listed by name, so the owner is told exactly what is gone; nothing else is dropped
silently.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import sys
import types
from typing import Any, Callable

from jupyter_gpu.common.codenames import code_names_kept
from jupyter_gpu.common.hostmem import discard, discard_soon

log = logging.getLogger(__name__)


class CopyStopped(Exception):
    """A standby copy was stopped because work arrived for its session (see ``standby.py``)."""


# the most a standby copy writes between two looks at whether a cell arrived (a few ms of copying)
STOP_CHECK_BYTES = 4 << 20


class _StoppableFile:
    """A file that asks ``should_stop`` before every write, and between pieces of at most
    ``STOP_CHECK_BYTES`` of a large one: a standby copy gives way to a cell within milliseconds.

        Why the pieces: ``torch.save`` writes each tensor's storage in one ``write`` (and pickle
        each large array in one), so stopping only between writes made a cell wait for a whole
        record: 0.4-1 s behind a 2 GiB tensor."""

    def __init__(self, f: Any, should_stop: Callable[[], bool]):
        self._f, self._should_stop = f, should_stop

    def write(self, data: Any) -> int:
        view = memoryview(data)
        if view.nbytes <= STOP_CHECK_BYTES or not view.c_contiguous:
            self._check()
            return self._f.write(data)
        view = view.cast("B")
        for start in range(0, view.nbytes, STOP_CHECK_BYTES):
            self._check()
            self._f.write(view[start : start + STOP_CHECK_BYTES])
        return view.nbytes

    def _check(self) -> None:
        if self._should_stop():
            raise CopyStopped("work arrived for the session")

    def flush(self) -> None:
        self._f.flush()


def user_names(ns: dict, hidden: dict | None) -> list[str]:
    """The names a user made: not IPython's own (``In``, ``Out``, ``_i3``, ``get_ipython`` ...)."""
    hidden = hidden or {}
    return [n for n in ns if not n.startswith("_") and n not in hidden]


class _Discard:
    """A file that keeps nothing: pickling into it only tells whether an object can be pickled."""

    def write(self, data: Any) -> int:
        # bytes, or a PickleBuffer (protocol 5 writes large buffers as they are)
        return memoryview(data).nbytes


def _unpicklable(values: dict[str, Any]) -> list[dict]:
    """The variables that cannot be pickled, each with why (one pickling pass over each, into
    nothing)."""
    import cloudpickle

    lost = []
    for name, value in values.items():
        try:
            cloudpickle.dump(value, _Discard(), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - anything unpicklable is reported by name, not fatal
            lost.append(
                {
                    "name": name,
                    "type": type(value).__name__,
                    "why": f"{type(exc).__name__}: {exc}"[:200],
                }
            )
    return lost


def _array_from_tensor(tensor: Any) -> Any:
    """Unpickling side of ``_TorchPickler``: the numpy array that travelled as a tensor's raw
    storage."""
    return tensor.numpy()


def _torch_pickle_module() -> Any:
    """A pickle module for ``torch.save``: cloudpickle (functions and classes made in the notebook),
    with plain numeric numpy arrays sent as tensors sharing their memory, so that they are written
    as raw storage records like tensors are (in-band pickling copies them through the pickler's
    frames, several times slower)."""
    import cloudpickle
    import numpy as np
    import torch

    class _TorchPickler(cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if (
                type(obj) is np.ndarray
                and obj.dtype.kind in "biuf"
                and obj.flags.c_contiguous
                and obj.flags.writeable
                and obj.nbytes >= 4096
            ):
                try:
                    return _array_from_tensor, (torch.from_numpy(obj),)
                except (TypeError, ValueError):  # a dtype torch has no tensor for
                    pass
            return super().reducer_override(obj)

    return types.SimpleNamespace(Pickler=_TorchPickler, __name__="jupyter_gpu_offload_pickle")


def _write(
    path: str, modules: dict, values: dict, should_stop: Callable[[], bool] | None = None
) -> None:
    """One file: with torch loaded, ``torch.save`` of everything (tensors as raw storage records, a
    tensor and its views sharing one storage); else one cloudpickle."""
    import cloudpickle

    # 0600 whatever the umask: a user's variables are readable by that user only
    # (worker/hoststore.py refuses to restore a file that others could read or have written)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    # functions made in cells keep their cells' file names: tracebacks after a restore still show
    # their lines
    with os.fdopen(fd, "wb") as raw, code_names_kept():
        f = _StoppableFile(raw, should_stop) if should_stop is not None else raw
        if "torch" in sys.modules:
            import torch
            import torch.serialization as serialization

            # no CRC32 over every record (torch >= 2.6 lets us skip it): it halves the speed, for a
            # file that lives minutes in RAM
            crc = (
                serialization.get_crc32_options()
                if hasattr(serialization, "set_crc32_options")
                else None
            )
            if crc is not None:
                serialization.set_crc32_options(False)
            try:
                torch.save(
                    {"modules": modules, "values": values},
                    f,
                    pickle_module=_torch_pickle_module(),
                    pickle_protocol=pickle.HIGHEST_PROTOCOL,
                )
            finally:
                if crc is not None:
                    serialization.set_crc32_options(crc)
        else:
            pickle.dump(modules, f, protocol=pickle.HIGHEST_PROTOCOL)
            cloudpickle.dump(values, f, protocol=pickle.HIGHEST_PROTOCOL)


def save_namespace(
    ns: dict, hidden: dict | None, path: str, should_stop: Callable[[], bool] | None = None
) -> dict:
    """Write the user's variables to ``path``; returns what was saved, what could not be, and the
    size.

        The variables are pickled together, in one pickle, so that objects shared between them stay
        shared when they come back: an optimizer still updates the model's own parameters, a view
        still shares its tensor's storage, ``b = [a]`` still holds ``a`` itself. Pickled one by one
        they would come back as separate copies, and a training loop would silently stop changing
        the model. When something cannot be pickled, each variable is tried alone to name the
        culprits, and the rest are pickled together. ``should_stop`` (a standby copy) is asked
        before every write; when it says so, the partial file is removed and ``CopyStopped`` raised.
    """
    names = user_names(ns, hidden)
    modules = {n: ns[n].__name__ for n in names if isinstance(ns[n], types.ModuleType)}
    values = {n: ns[n] for n in names if n not in modules}
    lost: list[dict] = []
    tmp = f"{path}.part"
    while True:
        try:
            _write(tmp, modules, values, should_stop)
            break
        except OSError:
            discard(tmp)
            # host memory full, or the folder went away: the broker says the variables are lost
            raise
        except Exception as exc:
            if isinstance(exc, CopyStopped) or (should_stop is not None and should_stop()):
                # (torch may hand the stop back wrapped in its own error); the partial file is
                # freed on a thread: the cell that stopped the copy must not wait for that
                discard_soon(tmp)
                raise CopyStopped("work arrived for the session") from None
            culprits = _unpicklable(values)
            if not culprits:
                discard(tmp)
                raise
            lost += culprits
            for entry in culprits:
                values.pop(entry["name"], None)
    os.replace(tmp, path)
    return {
        "path": path,
        "saved": sorted([*modules, *values]),
        "lost": lost,
        "bytes": os.path.getsize(path),
    }


def _read(path: str) -> tuple[dict, dict]:
    """(modules, values) from a file ``_write`` made (a zip is ``torch.save``'s format)."""
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            import torch

            # the user's own objects (not weights only); mapped, not copied: CPU tensors and arrays
            # use the file's pages in host memory as they are (copy-on-write, kept after the file is
            # unlinked below), CUDA ones are copied to the new session's GPU from them
            saved = torch.load(path, weights_only=False, mmap=True)
            return saved["modules"], saved["values"]
        f.seek(0)
        return pickle.load(f), pickle.load(f)


def load_namespace(ns: dict, path: str) -> dict:
    """Put the variables saved at ``path`` back into ``ns`` and delete the file; returns what came
    back."""
    restored, failed = [], []
    try:
        try:
            modules, values = _read(path)
        except Exception as exc:  # noqa: BLE001 - e.g. a class whose module this worker lacks
            modules, values = {}, {}
            failed.append({"name": "(all variables)", "why": f"{type(exc).__name__}: {exc}"[:200]})
        for name, module in modules.items():
            try:
                ns[name] = importlib.import_module(module)
                restored.append(name)
            except Exception as exc:  # noqa: BLE001 - the module is not installed where the session now runs
                failed.append({"name": name, "why": f"{type(exc).__name__}: {exc}"[:200]})
        ns.update(values)
        restored += list(values)
    finally:
        discard(path)
    return {"restored": sorted(restored), "failed": failed}
