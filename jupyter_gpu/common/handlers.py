"""How a server declares a handler: its op name, who calls it and how the caller is checked, next to
its code.

Why here: the handlers' own signatures are the protocol. A handler of the broker, the GPU worker
plugin or the session is declared with ``@handler("gpu_request", caller="kernel",
check="user-token")``, its arguments are annotated with the types ``common/validation.py`` checks
(``Name``, ``Bytes``, TypedDicts of ``common/protocol.py``...) and its reply with a TypedDict (or
``None``). The decorator checks the arguments before the handler runs and answers a refusal
(``common/refusals.py``) in Dask's error envelope; the server registers exactly its decorated
methods (``handlers_of``), and ``jupyter_gpu/interfaces.py`` builds the tables of every server
(``docs/interfaces.md``, and what the security tests enumerate) from the same declarations. A
handler cannot exist without saying who may call it, and the documentation cannot drift from it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from jupyter_gpu.common.refusals import CallError
from jupyter_gpu.common.validation import validated

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# who calls a handler: a notebook kernel (or the panel's server and the CLI, acting for a user like
# it), a session (through its worker: worker/relay.py), a GPU worker, the broker, any Dask client
# that connects, the cluster manager inside the scheduler, a nanny's own worker, a user's browser,
# the scheduler (on its stream to a worker)
Caller = Literal[
    "kernel",
    "session",
    "worker",
    "broker",
    "anyone",
    "client",
    "cluster-manager",
    "browser",
    "scheduler",
]
# how the caller is checked before the handler acts
Check = Literal[
    "none",  # nothing: anyone who reaches the port is answered
    "user-token",  # the user's name, with its token in a pool with a token file; owners only
    "pool-key",  # the pool key (common/poolkey.py): the broker and workers, towards workers
    "pool-key-proof",  # a fresh, single-use HMAC of the pool key over the call (poolkey.proof)
    "worker-stream",  # on a registered worker's own stream (Dask's batched stream)
    "scheduler-stream",  # on the scheduler's stream to this worker (the worker opened it)
    "client-stream",  # on a registered client's own stream
    "lease-secret",  # the lease's secret, which only the worker and the owner's kernel hold
    "spawn-key",  # the key the worker gave the session process when it started it
    "nanny-key",  # the key a GPU nanny gave its own worker
    "in-process",  # only a comm from the scheduler's own process (its inproc:// listener)
    "jupyter-auth",  # the Jupyter server's authentication (tornado.web.authenticated)
    "service-account",  # the launcher: the peer's uid (SO_PEERCRED) is the pool's service account's
    "grant",  # ... and a grant the broker signed (common/grants.py), for this worker, used once
]
ATTRIBUTE = "__jupyter_gpu_handler__"
CLOSED = "__jupyter_gpu_closed__"


@dataclass(frozen=True)
class Declared:
    """What ``@handler`` records on a handler: its op, caller and check, and the function itself
    (whose signature and docstring are the rest of the protocol)."""

    op: str
    caller: Caller
    check: Check
    function: Callable[..., Any]
    stream: bool = False  # a stream handler (a message on a registered stream), not an rpc


def handler(op: str, *, caller: Caller, check: Check, stream: bool = False) -> Callable[[F], F]:
    """Declare a server's handler ``op`` (see the module docstring): its arguments are checked
    against its annotations, a ``CallError`` it raises is answered in Dask's error envelope (on a
    ``stream``, where nothing is answered, it is logged), and ``handlers_of`` registers it. A
    handler method is named as its op (one naming scheme in every server: what a caller calls is
    what a reader finds)."""

    def wrap(fn: F) -> F:
        if fn.__name__ != op:
            raise TypeError(f"the handler of {op!r} must be named {op}, not {fn.__name__}")
        wrapped = answering_refusals(validated(fn, op), op)
        setattr(wrapped, ATTRIBUTE, Declared(op, caller, check, fn, stream))
        return wrapped

    return wrap


LOG_EVERY = 10.0  # seconds: a handler's refusals are logged once in this, then counted


def answering_refusals(fn: F, op: str) -> F:
    """``fn``, answering a ``CallError`` as Dask answers any error (``error_message``, status
    ``uncaught-error``: the caller's ``rpc`` re-raises it) but with one line in the log instead of
    a traceback: a refusal is the handler doing its job.

    A refusal costs the server next to nothing, so that one user's flood of calls does not slow
    everyone's (issue 20: 10,000 refused requests moved another user's cell start by 1.5 s, at
    about 6 ms each): it is answered without its traceback (Dask's ``error_message`` formats and
    pickles the one of the exception being handled, with tblib, which the caller then rebuilds
    by compiling code; a refusal's traceback says nothing to its caller), and a handler logs at
    most one refusal every ``LOG_EVERY`` seconds, with how many it did not log."""
    from distributed.core import error_message

    logged = [-LOG_EVERY, 0]  # when the last line was written, refusals not logged since

    def answer(exc: CallError) -> Any:
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
        now = time.monotonic()
        if now - logged[0] >= LOG_EVERY:
            more = f" (and {logged[1]} more refusal(s) of {op} not logged)" if logged[1] else ""
            log.warning("%s refused: %s%s", op, exc, more)
            logged[:] = [now, 0]
        else:
            logged[1] += 1
        return error_message(exc, status="uncaught-error")  # outside ``except``: no traceback

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_handler(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except CallError as exc:
                refusal = exc
            return answer(refusal)

        return cast(F, async_handler)

    @functools.wraps(fn)
    def sync_handler(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CallError as exc:
            refusal = exc
        return answer(refusal)

    return cast(F, sync_handler)


def closed(fn: F) -> F:
    """Mark ``fn`` as what stands in for one of Dask's handlers that a server closed (it answers
    with a refusal): the tests tell the handlers a server leaves open from the closed ones by it."""
    setattr(fn, CLOSED, True)
    return fn


def is_closed(fn: Callable[..., Any]) -> bool:
    return bool(getattr(fn, CLOSED, False))


def is_declared(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` (a function or a bound method) is a handler declared with ``@handler``."""
    return isinstance(getattr(fn, ATTRIBUTE, None), Declared)


def declared(cls: type) -> list[Declared]:
    """The handlers ``cls`` declares, in the order of its code."""
    found = []
    for klass in reversed(cls.__mro__):
        for value in vars(klass).values():
            meta = getattr(value, ATTRIBUTE, None)
            if isinstance(meta, Declared):
                found.append(meta)
    return found


def handlers_of(server: object, stream: bool = False) -> dict[str, Callable[..., Any]]:
    """Op -> bound method for every handler (``stream``: every stream handler) ``server``'s class
    declares: what the server registers (nothing else)."""
    table: dict[str, Callable[..., Any]] = {}
    for klass in type(server).__mro__:
        for name, value in vars(klass).items():
            meta = getattr(value, ATTRIBUTE, None)
            if isinstance(meta, Declared) and meta.stream == stream and meta.op not in table:
                table[meta.op] = getattr(server, name)
    return table
