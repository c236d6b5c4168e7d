"""The Dask nanny of a GPU worker, answering nobody but its own worker.

Why: a Dask nanny answers ``run`` (run a function in the nanny, as the pool's account),
``plugin_add``, ``instantiate``, ``kill``, ``restart``, ``terminate``... to whoever connects. In a
pool shared by several people any of these is code running as root or a way to stop other users'
sessions. A GPU nanny needs none of them from outside: it starts its worker itself and its worker
asks it to close. So it answers only ``identity``, and ``close_gracefully`` with the key it gave its
worker (in the worker's environment, which no user can read and which sessions do not inherit).
"""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
import secrets
from typing import TYPE_CHECKING, Any

from distributed import Nanny
from distributed.core import error_message

if TYPE_CHECKING:
    from distributed.core import ErrorMessage

from jupyter_gpu.common.handlers import closed
from jupyter_gpu.common.protocol import NANNY_KEY_ENV

log = logging.getLogger(__name__)


class GpuNanny(Nanny):
    """See the module docstring. Use it where ``distributed.Nanny`` would be used."""

    def __init__(self, *args: Any, env: dict[str, str] | None = None, **kwargs: Any):
        self._key = secrets.token_urlsafe(24)
        kwargs["env"] = {**(env or {}), NANNY_KEY_ENV: self._key}
        super().__init__(*args, **kwargs)
        close_gracefully = self.handlers["close_gracefully"]
        for op in list(self.handlers):
            if op != "identity":
                self.handlers[op] = _refused(op)
        self.handlers["close_gracefully"] = self._keyed(close_gracefully)

    def _keyed(self, handler: Any) -> Any:
        @functools.wraps(handler)
        async def close_gracefully(
            reason: str = "nanny-close-gracefully", key: str | None = None
        ) -> Any:
            if key is None or not hmac.compare_digest(key, self._key):
                log.warning("refused close_gracefully from a caller without this nanny's key")
                return error_message(PermissionError("only this nanny's own worker may close it"))
            # Dask's Nanny.close_gracefully is a plain function (it only marks the nanny as
            # closing): awaiting its None raised a TypeError in the worker's close
            result = handler(reason=reason)
            if inspect.isawaitable(result):
                result = await result
            return result

        return close_gracefully


def _refused(op: str) -> Any:
    def refused(**kwargs: Any) -> ErrorMessage:
        log.warning("refused %r on a GPU nanny (it answers only its own worker)", op)
        return error_message(PermissionError(f"{op!r} is not available on a jupyter-gpu nanny"))

    return closed(refused)
