"""Exceptions that cross the boundary between the pool and the notebook.

Each carries a message written for the notebook user: what happened, and what to do about it.
"""

from __future__ import annotations


class GpuPoolError(RuntimeError):
    """The pool could not do what a cell asked (refused request, lost session, no pool)."""


class RequestRefused(GpuPoolError):
    """The broker refused a request at once because no GPU in the pool could ever satisfy it."""


class SessionLost(GpuPoolError):
    """The remote session ended while a cell ran in it (crash, OOM kill, lost worker, kill after
    interrupt)."""


class PoolUnreachable(GpuPoolError):
    """The pool's scheduler does not answer (down, restarting, or unreachable from here)."""


class CellTimeout(GpuPoolError, TimeoutError):
    """A ``%%gpu --timeout`` limit was reached; the remote work was stopped."""


class RemoteError(Exception):
    """Stands in for a remote exception whose type cannot be imported in the kernel."""

    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_message = message


class NoGpuAvailable(GpuPoolError):
    """This machine has neither a GPU that NVML can see nor virtual GPUs configured."""
