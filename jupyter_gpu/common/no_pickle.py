"""The pool's processes read no pickles from the network.

Why: Dask unpickles while it *reads* a message, before any handler, gate, token, pool key or lease
secret is looked at. ``distributed.protocol.loads`` (which every TCP, TLS and WebSocket comm calls
on each message, ``comm/utils.py: from_frames``) unpickles a ``__Pickled__`` sub-frame (what
``ToPickle`` sends) whatever the comm's ``deserialize`` says, and deserializes a ``__Serialized__``
one with whichever family its header names when the comm deserializes: ``pickle``, or ``dask``,
which unpickles the object's type first. And a caller unpickles the exception of an error reply
(``distributed.core.clean_exception``). So ``identity(junk=ToPickle(obj))`` sent to a scheduler ran
``obj.__reduce__`` in the scheduler; sent to a worker, a nanny or a session (alice to bob's session
address), it ran code as their account before the lease secret was checked. Dask has no setting for
any of this.

:func:`install` closes it in a process of the pool (the scheduler, ``jupyter-gpu worker`` and its
nannies, the Dask worker processes, sessions and the launcher's zygote), for the whole process:

- :func:`loads` replaces Dask's: a ``__Pickled__`` sub-frame is refused (``NotAuthorized``; a server
  answers it in Dask's error envelope and no handler runs); a ``__Serialized__`` one stays
  ``Serialized`` when the comm does not deserialize (the session's inputs travel that way, and the
  session's executor rebuilds them after the secret check), and otherwise is rebuilt only from
  msgpack (plain data) or as plain bytes (how an error reply carries its exception); every other
  family is refused. In-process (``inproc://``) comms do not serialize at all and are unchanged;
- :func:`clean_exception` replaces Dask's in the rpc path: an error reply becomes the typed refusal
  its text names (``common/refusals.py``: by name, literal arguments only) or a plain ``Exception``
  with its text; nothing is unpickled.

Kernels are not pool processes: a kernel unpickles values and errors that come from its own session,
which only its own user's code can produce (docs/security.md).
"""

from __future__ import annotations

import builtins
import io
import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from jupyter_gpu.common.refusals import NotAuthorized, from_text

log = logging.getLogger(__name__)

REFUSED = (
    "this jupyter-gpu process reads no pickled data from the network (a pickle would run code in "
    "it before any check): send plain data"
)
# the types a "dask"-family header may name, and nothing else: what an error reply's exception
# travels as (the pickle of the exception itself is never loaded: see clean_exception)
PLAIN_TYPES = {("builtins", "bytes"), ("builtins", "bytearray"), ("builtins", "memoryview")}

_originals: dict[str, Any] = {}


class _TypeOnly(pickle.Unpickler):
    """Unpickles the pickle of one of ``PLAIN_TYPES`` (a header's ``type-serialized``) and
    nothing else: any other global, and with it any call, is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in PLAIN_TYPES:
            return getattr(builtins, name)
        raise NotAuthorized(REFUSED)


def _plain_type(data: bytes) -> type:
    try:
        typ = _TypeOnly(io.BytesIO(bytes(data))).load()
    except NotAuthorized:
        raise
    except Exception:  # noqa: BLE001 - a malformed pickle is refused like a forbidden one
        raise NotAuthorized(REFUSED) from None
    if not isinstance(typ, type):
        raise NotAuthorized(REFUSED)
    return typ


def _deserialize(header: dict[str, Any], frames: list[Any]) -> Any:
    """Dask's ``deserialize`` for msgpack, plain bytes and collections of them; refused for the
    rest."""
    from distributed.protocol.serialize import dask_deserialize, msgpack_loads

    if "is-collection" in header:
        kind = header["type-serialized"]
        if kind not in ("tuple", "list", "set", "dict"):
            raise NotAuthorized(REFUSED)
        items, start = [], 0
        for sub, length in zip(header["sub-headers"], header["frame-lengths"]):
            key = sub.pop("key", None)
            items.append((key, _deserialize(sub, frames[start : start + length])))
            start += length
        if kind == "dict":
            return dict(items)
        return {"tuple": tuple, "list": list, "set": set}[kind](v for _, v in items)
    family = header.get("serializer")
    if family == "msgpack":
        return msgpack_loads(header, frames)
    if family == "dask":
        typ = _plain_type(header["type-serialized"])
        loads = dask_deserialize.dispatch(typ)  # type: ignore[no-untyped-call]  # Dask's Dispatch is untyped
        return loads(header["sub-header"], frames)
    raise NotAuthorized(REFUSED)


def _merged(header: dict[str, Any], frames: list[Any]) -> list[Any]:
    """Frames that ``serialize_and_split`` split, joined again (as Dask's
    ``merge_and_deserialize``)."""
    if "split-num-sub-frames" not in header:
        return frames
    from distributed.protocol.utils import host_array_from_buffers, merge_memoryviews

    merged = []
    for n, offset in zip(header["split-num-sub-frames"], header["split-offsets"]):
        sub = frames[offset : offset + n]
        try:
            merged.append(merge_memoryviews(sub))
        except (ValueError, TypeError):
            merged.append(host_array_from_buffers(sub))
    return merged


def loads(frames: list[Any], deserialize: bool = True, deserializers: Any = None) -> Any:
    """``distributed.protocol.loads`` without pickles (see the module docstring)."""
    import msgpack  # type: ignore[import-untyped]  # no stubs; Dask's own dependency
    from distributed.protocol.compression import decompress
    from distributed.protocol.serialize import Serialized, msgpack_decode_default
    from distributed.protocol.utils import msgpack_opts

    def decode(obj: dict[str, Any]) -> Any:
        offset = obj.get("__Serialized__", 0)
        if offset > 0:
            sub_header = msgpack.loads(
                frames[offset], object_hook=msgpack_decode_default, use_list=False, **msgpack_opts
            )
            offset += 1
            sub_frames = frames[offset : offset + sub_header["num-sub-frames"]]
            if not deserialize:
                return Serialized(sub_header, sub_frames)
            if "compression" in sub_header:
                sub_frames = decompress(sub_header, sub_frames)
            return _deserialize(sub_header, _merged(sub_header, sub_frames))
        if obj.get("__Pickled__", 0) > 0:
            raise NotAuthorized(REFUSED)
        return msgpack_decode_default(obj)

    try:
        return msgpack.loads(frames[0], object_hook=decode, use_list=False, **msgpack_opts)
    except NotAuthorized:
        log.warning("refused a message with pickled data (%s)", REFUSED)
        raise


def clean_exception(
    exception: Any = None, traceback: Any = None, **kwargs: Any
) -> tuple[type[BaseException] | None, BaseException | None, TracebackType | None]:
    """Dask's ``clean_exception`` (an error reply -> the exception to raise) without unpickling:
    a refusal of ours by its name and text, else an ``Exception`` with the reply's text."""
    if isinstance(exception, BaseException):  # made in this process (an in-process comm)
        return type(exception), exception, None
    if exception is None and not kwargs.get("exception_text"):
        return None, None, None
    text = kwargs.get("exception_text") or (exception if isinstance(exception, str) else "")
    exc: BaseException = from_text(str(text)) or Exception(str(text))
    return type(exc), exc, None


def install() -> None:
    """Read no pickles from the network in this process (idempotent; see the module
    docstring)."""
    import distributed.core
    import distributed.protocol
    import distributed.protocol.core

    if _originals:
        return
    _originals.update(
        loads=distributed.protocol.loads, clean_exception=distributed.core.clean_exception
    )
    distributed.protocol.loads = loads
    distributed.protocol.core.loads = loads
    # what rpc's send_recv calls (ours takes what Dask's does, and names Dask's None result too)
    distributed.core.clean_exception = clean_exception  # type: ignore[assignment]


def uninstall() -> None:
    """Dask's own functions again (for tests that install it in their own process)."""
    import distributed.core
    import distributed.protocol
    import distributed.protocol.core

    if not _originals:
        return
    distributed.protocol.loads = _originals["loads"]
    distributed.protocol.core.loads = _originals["loads"]
    distributed.core.clean_exception = _originals["clean_exception"]
    _originals.clear()


def installed() -> bool:
    return bool(_originals)


@contextmanager
def refusing_pickles() -> Iterator[None]:
    """``install`` for the duration of a block (in-process tests), then Dask's own again."""
    was = installed()
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
