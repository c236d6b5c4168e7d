"""jupyter-gpu: run notebook cells on a fraction of a shared GPU pool.

In a notebook: ``%load_ext jupyter_gpu`` then ``%%gpu`` on a cell. Inside a ``%%gpu`` cell the
functions below tell the cell where it runs and stream its progress.
"""

from __future__ import annotations

from jupyter_gpu._version import __version__
from jupyter_gpu.session.api import checkpoint, device, rank, report, restore, world_size

__all__ = [
    "__version__",
    "checkpoint",
    "device",
    "load_ipython_extension",
    "rank",
    "report",
    "restore",
    "unload_ipython_extension",
    "world_size",
]


def load_ipython_extension(ipython) -> None:  # noqa: ANN001 - IPython's own type
    """``%load_ext jupyter_gpu``: register the ``%gpu`` / ``%%gpu`` magics in this kernel."""
    from jupyter_gpu.kernelext.magics import load

    load(ipython)


def unload_ipython_extension(ipython) -> None:  # noqa: ANN001
    from jupyter_gpu.kernelext.magics import unload

    unload(ipython)
