"""Why a server said no: the exceptions a handler raises instead of answering, in one envelope.

Why exceptions: Dask already has a reply envelope for a call that does not succeed. A handler
raises; the server answers ``error_message(exc)`` with status ``uncaught-error``; ``rpc`` re-raises
the exception in the caller. Every handler of the broker, the GPU worker plugin and the session uses
that envelope (``common/handlers.py`` turns these exceptions into it without a traceback in the
server's log), so every caller handles one shape: ``except Refused``. Before, refusals came back in
six shapes (``{"error"}``, ``{"ok": False}``, ``{"released": False}``, ``{"cancelled": False}``...)
that each caller had to know.

What is not an error stays a state: a request that no GPU can ever satisfy is a ``RequestStatus``
of state ``refused``, a lease that ended is a ``LeaseView`` of state ``ended``, a cell that raised is
an ``ExecuteReply`` of status ``error``. The exceptions here are for calls that were not accepted
(``Refused``) or that were accepted and could not be carried out (``Failed``).

Every class carries the reason worded for the person who made the call (``str(exc)``), and it is a
``GpuPoolError``, so a kernel shows it as a pool's message, not as a bug. A caller whose comm does
not deserialize (a kernel reading its session's replies: ``deserialize=False``) gets Dask's plain
``Exception(repr(exc))``; :func:`reraised` turns that text back into the typed exception, by name
and literal arguments only (nothing is unpickled).
"""

from __future__ import annotations

import ast
import re

from jupyter_gpu.errors import GpuPoolError


class CallError(GpuPoolError):
    """A handler's answer instead of a reply; ``str(exc)`` is the reason, for the caller's user."""

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else ""


class Refused(CallError):
    """The call was not accepted: nothing happened."""


class NotAuthorized(Refused):
    """The caller is not one that may make this call: a wrong or missing token, pool key, lease
    secret, spawn key or nanny key."""


class NotYours(Refused):
    """What the call names belongs to another user."""


class NotFound(Refused):
    """Nothing by the name or id the call gives is here (a session, a request, variables)."""


class Malformed(Refused):
    """The message does not fit the handler's annotations (``common/validation.py``) or the
    protocol's rules; the reason names the field and what it must be."""


class NotPossible(Refused):
    """This pool or process cannot do what is asked (no cluster manager to scale, counts beyond the
    machine, a lease that has a session already)."""


class Failed(CallError):
    """The call was accepted and could not be carried out (a session did not start, variables could
    not be written); the reason says what went wrong."""


KINDS: dict[str, type[CallError]] = {
    cls.__name__: cls
    for cls in (
        CallError,
        Refused,
        NotAuthorized,
        NotYours,
        NotFound,
        Malformed,
        NotPossible,
        Failed,
    )
}
_REPR = re.compile(r"^(?P<name>[A-Za-z]+)\((?P<args>.*)\)$", re.DOTALL)


def from_text(text: str) -> CallError | None:
    """The exception whose ``repr`` is ``text`` (Dask's ``exception_text``), if it is one of ours
    with literal arguments; None otherwise."""
    match = _REPR.match(text.strip())
    if match is None or match.group("name") not in KINDS:
        return None
    try:
        args = ast.literal_eval(f"({match.group('args')},)") if match.group("args") else ()
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(args, tuple) or not all(isinstance(a, str) for a in args):
        return None
    return KINDS[match.group("name")](*args)


def reraised(exc: BaseException) -> BaseException:
    """For a comm that does not deserialize: the typed refusal behind Dask's plain ``Exception``
    (``raise reraised(exc) from None``), or ``exc`` itself when it is not one."""
    if isinstance(exc, CallError) or type(exc) is not Exception or len(exc.args) != 1:
        return exc
    typed = from_text(str(exc.args[0]))
    return typed if typed is not None else exc
