"""Functions and classes shipped by value keep the file names of the cells that defined them.

cloudpickle (which Dask uses for anything defined in ``__main__``, i.e. in a notebook) renames every
code object's file to ``<dynamic-code>``, to make its bytes deterministic. For us that name is a
dead end: a remote traceback through ``Net.forward``, defined in an earlier cell, would read ``File
<dynamic-code>:19 'Could not get source'``. The kernel can show those lines (it has every cell's
source in its ``linecache``: its own cells under IPython's file names, ``%%gpu`` cells under
theirs), so while we serialize a cell's inputs, outputs or a session's variables, code keeps its
real file name.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from typing import Any

_DYNAMIC = "<dynamic-code>"
_lock = threading.RLock()


def _named_code_reduce(code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
    """cloudpickle's reduction of a code object, with its file name put back."""
    from cloudpickle import cloudpickle

    constructor, args = cloudpickle._code_reduce(code)
    if _DYNAMIC in args:  # the top-level arguments: co_filename is the only string equal to it
        at = args.index(_DYNAMIC)
        args = args[:at] + (code.co_filename,) + args[at + 1 :]
    return constructor, args


@contextlib.contextmanager
def code_names_kept() -> Iterator[None]:
    """While inside, cloudpickle keeps code objects' file names (see the module docstring)."""
    try:
        from cloudpickle import cloudpickle
    except ImportError:  # pragma: no cover - cloudpickle is a dependency
        yield
        return
    table = cloudpickle.Pickler._dispatch_table
    with _lock:
        previous = table.get(types.CodeType)
        table[types.CodeType] = _named_code_reduce
        try:
            yield
        finally:
            if previous is None:
                table.pop(types.CodeType, None)
            else:
                table[types.CodeType] = previous
