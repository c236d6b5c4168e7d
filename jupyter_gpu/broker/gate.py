"""The scheduler's door: in a pool shared by several people, only the project's own handlers are
open.

Why: a Dask scheduler answers a large generic API (``run_function``, ``broadcast`` to every worker,
``update-graph`` to run tasks, plugin registration, state dumps, ``terminate``...). Any of these in
a user's hands is code running in the scheduler or on every worker, under the pool's account. GPU
pools run no Dask tasks, so in a pool that checks tokens the broker closes all of it when it starts:
what stays open is what a Dask client needs to connect (``identity``, ``register-client`` and its
heartbeat), what a worker needs to join (``register-worker``, only with the pool key in its start-up
information; its own stream; heartbeats), and the broker's handlers, each of which checks who calls
it (a kernel's token, the pool key). A refused call is answered with the reason and logged; a
refused message on a client's stream is dropped and logged.

One caller keeps Dask's API: a comm that comes in on the scheduler's ``inproc://`` listener, which
only code running in the scheduler's own process can open (user code never runs there). That is the
cluster manager a ``jupyter-gpu pool up`` owns (``pool/cluster_manager.py``): its ``SpecCluster``
watches the workers and retires them through that comm.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Collection
from typing import Any

from jupyter_gpu.common import poolkey
from jupyter_gpu.common.handlers import closed
from jupyter_gpu.common.protocol import STARTUP_KEY

log = logging.getLogger(__name__)

# what a Dask client or worker needs to connect, besides the broker's own handlers
CONNECT_OPS = frozenset(
    {"identity", "register-client", "register-worker", "register_nanny", "heartbeat_worker"}
)
# on a client's own stream: keeping the connection, nothing that computes or changes anyone's data
CLIENT_STREAM_OPS = frozenset(
    {
        "heartbeat-client",
        "close-client",
        "client-releases-keys",
        "subscribe-topic",
        "unsubscribe-topic",
    }
)
# on a registered worker's own stream
WORKER_STREAM_OPS = frozenset(
    {
        "keep-alive",
        "worker-status-change",
        "log-event",
        "long-running",
        "reschedule",
        "release-worker-data",
        "add-keys",
        "request-refresh-who-has",
        "task-finished",
        "task-erred",
    }
)
# what Dask's client subscribes to itself (no other user's events)
TOPICS = frozenset({"print", "warn"})


def refusal(op: str) -> str:
    return (
        f"{op!r} is not available in this pool: it runs no Dask tasks, and a pool shared by "
        "several people "
        "answers only jupyter-gpu's own calls (see docs/security.md)"
    )


def close(scheduler: Any, key: str | None, ours: Collection[str]) -> None:
    """Shut the generic API of ``scheduler`` (see the module docstring). ``key``: the pool key that
    ``register-worker`` must carry; ``ours``: the broker's handlers, which stay open."""
    for op in list(scheduler.handlers):
        if op in CONNECT_OPS or op in ours:
            continue
        scheduler.handlers[op] = _refuse(op, scheduler.handlers[op])
    scheduler.handlers["register-worker"] = _checked_registration(
        scheduler.handlers["register-worker"], key
    )
    for op, handler in list(scheduler.stream_handlers.items()):
        scheduler.stream_handlers[op] = _stream_gate(scheduler, op, handler)
    log.info(
        "the scheduler answers only jupyter-gpu's handlers and what clients and workers need to "
        "connect"
    )


def in_process(comm: Any) -> bool:
    """Whether ``comm`` came from this very process (the scheduler's ``inproc://`` listener)."""
    return str(getattr(comm, "peer_address", "") or "").startswith("inproc://")


def _refuse(op: str, handler: Callable[..., Any] | None = None) -> Callable[..., Any]:
    takes_comm = handler is not None and _expects_comm(handler)

    def refused(comm: Any = None, **kwargs: Any) -> Any:
        from distributed.core import error_message

        if handler is not None and in_process(comm):  # the pool's own cluster manager
            return handler(comm, **kwargs) if takes_comm else handler(**kwargs)
        log.warning("refused %r (a pool shared by several people runs no Dask tasks)", op)
        # Dask's own error shape: the caller raises it
        return error_message(PermissionError(refusal(op)))

    return closed(refused)


def _expects_comm(handler: Callable[..., Any]) -> bool:
    params = inspect.signature(handler).parameters
    return bool(params) and next(iter(params)) == "comm"


def _checked_registration(handler: Callable[..., Any], key: str | None) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def register_worker(comm: Any = None, **msg: Any) -> Any:
        given = (msg.get("extra") or {}).get(STARTUP_KEY)
        if not poolkey.matches(given, key):
            log.warning("refused a worker at %s: it did not show the pool key", msg.get("address"))
            await comm.write(
                {
                    "status": "error",
                    "message": "this pool accepts only workers that hold its pool key "
                    "(see docs/security.md: the pool key file)",
                    "time": 0,
                }
            )
            await comm.close()
            return None
        result = handler(comm=comm, **msg)
        return await result if inspect.isawaitable(result) else result

    return register_worker


def _stream_gate(scheduler: Any, op: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    worker_op, client_op = op in WORKER_STREAM_OPS, op in CLIENT_STREAM_OPS

    @functools.wraps(handler)
    def gated(*args: Any, **kwargs: Any) -> Any:
        if "worker" in kwargs and worker_op:
            return handler(*args, **kwargs)
        if (
            "client" in kwargs
            and client_op
            and (op != "subscribe-topic" or kwargs.get("topic") in TOPICS)
        ):
            return handler(*args, **kwargs)
        log.warning(
            "dropped %r on a stream of %s (not available in this pool)",
            op,
            kwargs.get("client") or kwargs.get("worker") or "an unregistered peer",
        )
        # the graph is never read: its futures fail at once
        if op == "update-graph" and kwargs.get("client"):
            _fail_futures(
                scheduler, kwargs["client"], kwargs.get("keys") or (), refusal("submitting tasks")
            )
        return None

    return gated


def _fail_futures(scheduler: Any, client: str, keys: Any, why: str) -> None:
    from distributed.protocol.serialize import Serialize

    for key in list(keys)[:10_000]:
        scheduler.report(
            {
                "op": "task-erred",
                "key": key,
                "exception": Serialize(PermissionError(why)),
                "traceback": None,
            },
            client=client,
        )
