"""The scheduler's door: in a pool shared by several people, only the project's own handlers are
open.

Why: a Dask scheduler answers a large generic API (``run_function``, ``broadcast`` to every worker,
``update-graph`` to run tasks, plugin registration, state dumps, ``terminate``...). Any of these in
a user's hands is code running in the scheduler or on every worker, under the pool's account. GPU
pools run no Dask tasks, so in a pool that checks tokens the broker closes all of it when it starts:
what stays open is what a Dask client needs to connect (``identity``, filtered to what a client
needs; ``register-client`` and its own stream), what a worker needs to join (``register-worker``
and ``heartbeat_worker``, each only with a proof that it holds the pool key, ``poolkey.proof``; its
own stream; ``register_nanny``, which answers the scheduler's nanny plugins, of which a shared pool
has none: registering one is closed), and the broker's handlers, each of which
checks who calls it (a kernel's token; a worker's own stream). A refused call is answered with the
reason and logged; a refused message on a client's stream is dropped and logged.

Streams, in every pool: Dask merges a stream's own identity (``client=`` or ``worker=``) *under*
each message, so a message could name another client or worker than the one whose stream it came
on (alice closing bob's client, a kernel posing as a worker). :func:`own_identity_streams` removes
those names from every message before the merge: a stream handler's ``client``/``worker`` is the
stream's.

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
from jupyter_gpu.common.protocol import STARTUP_PROOF

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


WORKERS_ONLY = (
    "only the pool's workers may call this, on the stream they registered with (a proof that "
    "they hold the pool key; see docs/security.md)"
)


def refusal(op: str) -> str:
    return (
        f"{op!r} is not available in this pool: it runs no Dask tasks, and a pool shared by "
        "several people "
        "answers only jupyter-gpu's own calls (see docs/security.md)"
    )


def install(
    scheduler: Any,
    key: str | None,
    ours: dict[str, Callable[..., Any]],
    ours_stream: dict[str, Callable[..., Any]],
    shared: bool,
) -> None:
    """The broker's handlers on ``scheduler``; every stream's messages its own client's or
    worker's; workers' proofs of the pool key taken (and, in a ``shared`` pool, required, and the
    rest of Dask's API closed)."""
    scheduler.handlers.update(ours)
    scheduler.stream_handlers.update(ours_stream)
    own_identity_streams(scheduler)
    if shared:
        close(scheduler, key, set(ours), set(ours_stream))
    else:
        workers_prove(scheduler, key, checked=False)


def close(
    scheduler: Any, key: str | None, ours: Collection[str], ours_stream: Collection[str] = ()
) -> None:
    """Shut the generic API of ``scheduler`` (see the module docstring). ``key``: the pool key that
    workers prove they hold; ``ours``: the broker's handlers, which stay open; ``ours_stream``: its
    worker-stream handlers."""
    for op in list(scheduler.handlers):
        if op in CONNECT_OPS or op in ours:
            continue
        scheduler.handlers[op] = _refuse(op, scheduler.handlers[op])
    workers_prove(scheduler, key, checked=True)
    for op in ours_stream:  # a worker's reports come on its own stream, never as a call
        scheduler.handlers[op] = _workers_only(op)
    scheduler.handlers["identity"] = _filtered_identity(scheduler)
    for op, handler in list(scheduler.stream_handlers.items()):
        scheduler.stream_handlers[op] = _stream_gate(scheduler, op, handler, set(ours_stream))
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


def _workers_only(op: str) -> Callable[..., Any]:
    def refused(comm: Any = None, **kwargs: Any) -> Any:
        from distributed.core import error_message

        log.warning("refused %r as a call: it comes on a worker's own stream only", op)
        return error_message(PermissionError(WORKERS_ONLY))

    return closed(refused)


def _expects_comm(handler: Callable[..., Any]) -> bool:
    params = inspect.signature(handler).parameters
    return bool(params) and next(iter(params)) == "comm"


def workers_prove(scheduler: Any, key: str | None, checked: bool) -> None:
    """``register-worker`` and ``heartbeat_worker`` take a worker's proof of the pool key, and,
    when ``checked`` (a shared pool), refuse without it. Installed by the broker in every pool (a
    GPU worker always sends its proof; Dask's own handlers would not take the argument)."""
    proofs = poolkey.ProofChecker() if checked else None
    scheduler.handlers["register-worker"] = _checked_registration(
        scheduler.handlers["register-worker"], key, proofs
    )
    scheduler.handlers["heartbeat_worker"] = _checked_heartbeat(
        scheduler.handlers["heartbeat_worker"], key, proofs
    )


def _checked_registration(
    handler: Callable[..., Any], key: str | None, proofs: poolkey.ProofChecker | None
) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def register_worker(comm: Any = None, **msg: Any) -> Any:
        extra = msg.get("extra") or {}
        given = extra.pop(STARTUP_PROOF, None) if isinstance(extra, dict) else None
        address = str(msg.get("address"))
        if proofs is not None and not proofs.check(given, key, "register", address):
            log.warning("refused a worker at %s: no proof that it holds the pool key", address)
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


def _checked_heartbeat(
    handler: Callable[..., Any], key: str | None, proofs: poolkey.ProofChecker | None
) -> Callable[..., Any]:
    """``heartbeat_worker`` (it rewrites a worker's resources and keeps it alive) for workers that
    prove they hold the pool key, each about itself."""

    @functools.wraps(handler)
    def heartbeat_worker(*, address: str, proof: Any = None, **msg: Any) -> Any:
        from distributed.core import error_message

        if proofs is not None and not proofs.check(proof, key, "heartbeat", str(address)):
            log.warning("refused a heartbeat for %s without a proof of the pool key", address)
            return error_message(
                PermissionError(
                    "heartbeat_worker: only a worker about itself, with a proof that it holds the "
                    "pool key (see docs/security.md)"
                )
            )
        return handler(address=address, **msg)

    return heartbeat_worker


def _filtered_identity(scheduler: Any) -> Callable[..., Any]:
    """``identity``: what a Dask client needs (the scheduler's type, id, address), not its
    workers' addresses and start-up information, but for the pool's own in-process callers."""
    full = scheduler.handlers["identity"]

    def identity(comm: Any = None, n_workers: int = -1, **kwargs: Any) -> dict[str, Any]:
        info = dict(full(n_workers=n_workers))
        if not in_process(comm):
            info["workers"] = {}
        return info

    return identity


def own_identity_streams(scheduler: Any) -> None:
    """Every stream's messages carry the stream's own ``client``/``worker`` (see the module
    docstring); installed by the broker in every pool."""
    original = scheduler.handle_stream

    async def handle_stream(comm: Any, extra: dict[str, Any] | None = None) -> None:
        await original(_OwnIdentity(comm, extra or {}), extra=extra)

    scheduler.handle_stream = handle_stream


IDENTITY_KEYS = ("client", "worker")


class _OwnIdentity:
    """A stream's comm whose messages name no client or worker: the stream's own is merged in."""

    def __init__(self, comm: Any, extra: dict[str, Any]) -> None:
        self._comm, self._extra = comm, extra

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)

    async def read(self, *args: Any, **kwargs: Any) -> Any:
        msgs = await self._comm.read(*args, **kwargs)
        for msg in msgs if isinstance(msgs, (list, tuple)) else (msgs,):
            if isinstance(msg, dict):
                for key in IDENTITY_KEYS:
                    named = msg.pop(key, None)
                    if named is not None and named != self._extra.get(key):
                        log.warning(
                            "a %r message on the stream of %s named another %s (%r): dropped",
                            msg.get("op"),
                            self._comm.peer_address,
                            key,
                            str(named)[:80],
                        )
        return msgs


def _stream_gate(
    scheduler: Any, op: str, handler: Callable[..., Any], ours: Collection[str] = ()
) -> Callable[..., Any]:
    worker_op = op in WORKER_STREAM_OPS or op in ours
    client_op = op in CLIENT_STREAM_OPS

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
