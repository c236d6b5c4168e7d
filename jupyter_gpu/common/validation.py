"""Checking what a caller sent before it touches any state: handler signatures are the schema.

Why: a Dask handler is called with whatever keyword arguments arrive on the comm. One request with
``workers: 1.5`` once wedged every later scheduling pass; a run update with a malformed field broke
the snapshot for everyone. Every handler of the broker, the worker plugin and the session is
therefore wrapped by ``validated``: each argument is checked against the handler's own annotation
(``Annotated`` types below carry ranges and lengths), unknown arguments are refused, numbers must be
finite, and a refusal (``Malformed``, in Dask's error envelope: ``common/refusals.py``) names the
field and the fix. Nothing is coerced: a string where a number belongs is refused, not parsed.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import (
    Annotated,
    Any,
    Literal,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
    get_type_hints,
)

from jupyter_gpu.common.refusals import Malformed

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import Unpack

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])  # a handler: ``validated`` keeps its signature


class BadMessage(ValueError):
    """A message whose fields are not what the protocol says; the text names the field and what it
    must be."""


@dataclass(frozen=True)
class Range:
    """Numbers: inclusive bounds."""

    lo: float = -math.inf
    hi: float = math.inf


@dataclass(frozen=True)
class MaxLen:
    """Strings, lists and dicts: at most this many characters or items."""

    n: int


# the shapes handlers use most
Name = Annotated[str, MaxLen(256)]  # user names, kernel ids, lease and request ids
Text = Annotated[str, MaxLen(4096)]  # labels, reasons, notebook paths
Seconds = Annotated[float, Range(0, 10 * 365 * 86400)]
Count = Annotated[int, Range(0, 1_000_000)]
# a training loop's step counts (report(step=..., total=...))
Steps = Annotated[int, Range(0, 2**53)]
Bytes = Annotated[int, Range(0, 2**62)]
Percent = Annotated[float, Range(0, 100)]
Address = Annotated[str, MaxLen(512)]
Secret = Annotated[str, MaxLen(256)]  # a lease's secret, a spawn key, a pool key
Token = Annotated[str, MaxLen(512)]  # a user's token (pools with a token file)


def check(value: Any, hint: Any, where: str) -> None:
    """Raise ``BadMessage`` unless ``value`` fits ``hint`` (a type annotation, possibly
    ``Annotated``)."""
    constraints: tuple[Any, ...] = ()
    if get_origin(hint) is Annotated:
        hint, *extra = get_args(hint)
        constraints = tuple(extra)
    origin = get_origin(hint)
    if hint is Any or hint is object:
        pass
    elif origin in (Union, types.UnionType):
        options = get_args(hint)
        errors = []
        for option in options:
            try:
                check(value, option, where)
                break
            except BadMessage as exc:
                errors.append((option, str(exc)))
        else:
            real = [why for option, why in errors if option is not type(None)]
            # ``X | None`` given something that is not None: what is wrong with it as an X
            raise BadMessage(
                real[0]
                if len(real) == 1
                else f"{where} must be {_describe(hint)}, not {_show(value)}"
            )
    elif hint is type(None):
        if value is not None:
            raise BadMessage(f"{where} must be null, not {_show(value)}")
    elif origin is Literal:
        if value not in get_args(hint) or isinstance(value, bool) != any(
            isinstance(a, bool) for a in get_args(hint)
        ):
            raise BadMessage(
                f"{where} must be one of {', '.join(map(repr, get_args(hint)))}, not {_show(value)}"
            )
    elif hint is bool:
        if not isinstance(value, bool):
            raise BadMessage(f"{where} must be true or false, not {_show(value)}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadMessage(f"{where} must be a whole number, not {_show(value)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadMessage(f"{where} must be a number, not {_show(value)}")
        if not math.isfinite(value):
            raise BadMessage(f"{where} must be a finite number, not {value}")
    elif hint is str:
        if not isinstance(value, str):
            raise BadMessage(f"{where} must be text, not {_show(value)}")
    elif hint is bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise BadMessage(f"{where} must be bytes, not {_show(value)}")
    elif origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise BadMessage(f"{where} must be a list, not {_show(value)}")
        args = get_args(hint)
        if args and origin is list:
            for i, item in enumerate(value):
                check(item, args[0], f"{where}[{i}]")
    elif origin is dict or hint is dict or _is_typeddict(hint):
        if not isinstance(value, dict):
            raise BadMessage(f"{where} must be a mapping, not {_show(value)}")
        args = get_args(hint)
        if args:
            for k, v in value.items():
                check(k, args[0], f"{where} key")
                check(v, args[1], f"{where}[{k!r}]")
        elif _is_typeddict(hint):
            check_fields(value, hint, where)
    elif isinstance(hint, type):
        if not isinstance(value, hint):
            raise BadMessage(f"{where} must be {hint.__name__}, not {_show(value)}")
    for c in constraints:
        if isinstance(c, Range) and not (c.lo <= value <= c.hi):
            raise BadMessage(f"{where} must be between {c.lo:g} and {c.hi:g}, not {value!r}")
        if isinstance(c, MaxLen) and len(value) > c.n:
            raise BadMessage(f"{where} is too long ({len(value)} > {c.n})")


def check_fields(value: dict[Any, Any], typed: type, where: str = "") -> None:
    """A ``TypedDict``: known keys only, each of its declared type (``where``: the message's name
    in the reasons; none for keyword arguments)."""
    hints = typed_fields(typed)
    unknown = sorted(str(k) for k in value if k not in hints)
    if unknown:
        raise BadMessage(
            f"{where or 'the message'} has unknown field(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(hints))}"
        )
    for key, v in value.items():
        check(v, hints[key], f"{where}.{key}" if where else key)
    missing = sorted(getattr(typed, "__required_keys__", set()) - set(value))
    if missing:
        raise BadMessage(f"{where or 'the message'} lacks {', '.join(missing)}")


@functools.lru_cache(maxsize=None)
def typed_fields(typed: type) -> dict[str, Any]:
    """A TypedDict's fields and their types (resolved once: every message of its type is checked
    against them)."""
    return get_type_hints(typed, include_extras=True)


def _is_typeddict(hint: Any) -> bool:
    return (
        isinstance(hint, type)
        and issubclass(hint, dict)
        and hasattr(hint, "__annotations__")
        and hasattr(hint, "__total__")
    )


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def validated(fn: F, op: str | None = None, skip: tuple[str, ...] = ("self", "comm")) -> F:
    """``fn`` with its arguments checked against its annotations first: a message that does not fit
    raises ``Malformed`` naming the op, the field and what it must be (``common/refusals.py``: the
    caller gets it in Dask's error envelope; for a one-way message it is logged and dropped).

    Unknown keyword arguments are refused too (a typo is a bug the sender must hear about, not a
    field silently ignored). ``**fields: Unpack[SomeTypedDict]`` takes the TypedDict's fields as
    keyword arguments, each checked against its declared type (the session's ``execute`` takes a
    ``CellPayload`` so).
    """
    sig = inspect.signature(fn)
    hints = get_type_hints(fn, include_extras=True)
    params = {
        n: p
        for n, p in sig.parameters.items()
        if n not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    unpacked = {
        n: unpacked_typeddict(hints[n])
        for n, p in sig.parameters.items()
        if p.kind is p.VAR_KEYWORD and n in hints and unpacked_typeddict(hints[n]) is not None
    }
    name_of_op = op or fn.__name__

    def problem(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            return f"{name_of_op}: {exc}"
        try:
            for name, value in bound.arguments.items():
                if name in params and name in hints:
                    check(value, hints[name], name)
                elif name in unpacked:
                    check_fields(value, cast(type, unpacked[name]))
        except BadMessage as exc:
            return f"{name_of_op}: {exc}"
        return None

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_handler(*args: Any, **kwargs: Any) -> Any:
            why = problem(args, kwargs)
            if why is not None:
                raise Malformed(why)
            return await fn(*args, **kwargs)

        return cast(F, async_handler)

    @functools.wraps(fn)
    def handler(*args: Any, **kwargs: Any) -> Any:
        why = problem(args, kwargs)
        if why is not None:
            raise Malformed(why)
        return fn(*args, **kwargs)

    return cast(F, handler)


def unpacked_typeddict(hint: Any) -> type | None:
    """The TypedDict of ``**kwargs: Unpack[TD]`` (None for any other annotation)."""
    if getattr(hint, "__origin__", None) is Unpack or get_origin(hint) is Unpack:
        (inner,) = get_args(hint)
        return cast(type, inner) if _is_typeddict(inner) else None
    return None
