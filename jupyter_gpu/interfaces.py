"""Every entry point of every server, as data: who may call it and how the caller is checked.

Why here, at the top of the package: this module reads the handlers of all three servers (the
broker, the GPU worker plugin, the session) and the Jupyter server's routes, which no process of
the pool imports together; ``common/`` may import none of them. The handlers' own declarations are
the source (``common/handlers.py``: op, caller, check; their annotated signatures: arguments and
reply; their docstrings: what they do); what each server leaves open of Dask's own API, and the
panel's routes, are listed here next to them, each with its caller and check, from the modules that
close the rest (``broker/gate.py``, ``worker/dask_worker.py``, ``worker/nanny.py``,
``session/server.py``, ``labext/handlers.py``).

``handler_table()`` is what ``docs/interfaces.md`` is generated from (``python -m
jupyter_gpu.interfaces docs/interfaces.md``), what ``tests/broker/test_plugins_inprocess.py``
compares with the handlers the real servers register, and what a security test enumerates against
a live pool. The scheduler's rows describe a pool with a token file (a shared pool); a pool without
one leaves Dask's generic API open to its only user (docs/security.md).
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from jupyter_gpu.common import protocol, validation
from jupyter_gpu.common.handlers import Caller, Check, declared
from jupyter_gpu.common.validation import MaxLen, Range, unpacked_typeddict

Server = Literal["scheduler", "worker", "nanny", "session", "launcher", "jupyter"]


@dataclass(frozen=True)
class HandlerRecord:
    """One entry point: the server that answers it, its op (a Dask op, a stream op, an HTTP route),
    who calls it, how the caller is checked, its arguments and reply (as text), what it does, and
    where it is defined."""

    server: Server
    op: str
    caller: Caller
    check: Check
    arguments: str
    reply: str
    doc: str
    source: str
    kind: Literal["handler", "stream", "route"] = "handler"


# ---------------------------------------------------------------------- what Dask leaves open
def _scheduler_dask_rows() -> list[HandlerRecord]:
    from jupyter_gpu.broker import gate

    connect: dict[str, tuple[Caller, Check, str]] = {
        "identity": (
            "anyone",
            "none",
            "who this server is (a Dask client asks first): its type, id and address, not its "
            "workers (but to the in-process cluster manager)",
        ),
        "register-client": ("client", "none", "a Dask client joins (a kernel, the panel, the CLI)"),
        "register-worker": (
            "worker",
            "pool-key-proof",
            "a Dask worker joins: only with a proof of the pool key in its start-up information",
        ),
        "register_nanny": (
            "worker",
            "none",
            "a nanny asks for the scheduler's nanny plugins: a shared pool has none (registering "
            "one is closed), whoever asks",
        ),
        "heartbeat_worker": (
            "worker",
            "pool-key-proof",
            "a worker's heartbeat, about itself, with a fresh proof of the pool key",
        ),
    }
    assert set(connect) == set(gate.CONNECT_OPS), "broker/gate.py's CONNECT_OPS changed"
    rows = [
        HandlerRecord("scheduler", op, caller, check, "(Dask's)", "(Dask's)", doc, "broker/gate.py")
        for op, (caller, check, doc) in sorted(connect.items())
    ]
    rows += [
        HandlerRecord(
            "scheduler",
            op,
            "client",
            "client-stream",
            "(Dask's)",
            "-",
            "on a client's own stream: keeping its connection",
            "broker/gate.py",
            "stream",
        )
        for op in sorted(gate.CLIENT_STREAM_OPS)
    ]
    rows += [
        HandlerRecord(
            "scheduler",
            op,
            "worker",
            "worker-stream",
            "(Dask's)",
            "-",
            "on a registered worker's own stream",
            "broker/gate.py",
            "stream",
        )
        for op in sorted(gate.WORKER_STREAM_OPS)
    ]
    rows.append(
        HandlerRecord(
            "scheduler",
            "*",
            "cluster-manager",
            "in-process",
            "(Dask's)",
            "(Dask's)",
            "every other handler of Dask's scheduler: refused, but on the scheduler's inproc:// "
            "listener (the cluster manager a pool up owns)",
            "broker/gate.py",
        )
    )
    return rows


def _dask_rows() -> list[HandlerRecord]:
    rows = _scheduler_dask_rows()
    rows.append(
        HandlerRecord(
            "worker",
            "gpu_sessions_refused",
            "scheduler",
            "scheduler-stream",
            "leases: list[Name]",
            "-",
            "after a scheduler restart, the sessions the broker could not adopt: the worker ends "
            "them (on the stream it opened to its scheduler; Dask's own stream handlers are the "
            "scheduler's too)",
            "worker/plugin.py: GpuWorkerPlugin.gpu_sessions_refused",
            "stream",
        )
    )
    rows.append(
        HandlerRecord(
            "worker",
            "identity",
            "anyone",
            "none",
            "(Dask's)",
            "(Dask's)",
            "who this worker is; everything else of Dask's worker API is closed",
            "worker/dask_worker.py",
        )
    )
    rows += [
        HandlerRecord(
            "nanny",
            "identity",
            "anyone",
            "none",
            "(Dask's)",
            "(Dask's)",
            "who this nanny is; everything else of Dask's nanny API is closed",
            "worker/nanny.py",
        ),
        HandlerRecord(
            "nanny",
            "close_gracefully",
            "worker",
            "nanny-key",
            "reason?, key",
            "(Dask's)",
            "its own worker asks it to close (with the key the nanny gave it)",
            "worker/nanny.py",
        ),
        HandlerRecord(
            "session",
            "identity",
            "anyone",
            "none",
            "(Dask's)",
            "(Dask's)",
            "who this server is; Dask's other defaults are removed (session/server.py's "
            "REMOVED_DEFAULTS)",
            "session/server.py",
        ),
    ]
    return rows


LAUNCHER_DOCS = {
    "hello": "the worker names itself (its Dask address) once: grants must name it",
    "start": "a session for a lease, as the grant's user, in its cgroup, confined before it runs",
    "signal": "interrupt or kill a session this connection started",
    "end": "end it: its group killed and removed, its folder too unless its copy is parked",
    "move_copy": "a parked copy into the folder of the same user's next session (renameat)",
    "open_copy": "a descriptor to read a parked copy (checked on the descriptor)",
    "create_copy": "a descriptor to write a copy from another machine into a session's folder",
    "spill_copy": "a parked copy out of host memory into the launcher's disk folder (descriptors)",
    "forget_copy": "remove a parked copy's folder",
}


def _launcher_rows() -> list[HandlerRecord]:
    """The privileged launcher's requests (``launcher/server.py``): from the pool's service
    account only; ``start`` only on a signed grant."""
    rows = []
    for op, typed in protocol.LAUNCHER_REQUESTS.items():
        fields = [f for f in fields_text(typed).split(", ") if not f.startswith(("op", "id"))]
        rows.append(
            HandlerRecord(
                "launcher",
                op,
                "worker",
                "grant" if op == "start" else "service-account",
                ", ".join(fields),
                "LauncherReply",
                LAUNCHER_DOCS[op],
                "launcher/server.py: Launcher._" + op,
            )
        )
    return rows


def _route_rows() -> list[HandlerRecord]:
    from jupyter_gpu.labext.handlers import handler_classes

    rows = []
    for pattern, cls in handler_classes():
        for verb in ("get", "post", "put", "delete", "patch"):
            if verb not in vars(cls):
                continue
            route = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"<\1>", pattern)
            rows.append(
                HandlerRecord(
                    "jupyter",
                    f"{verb.upper()} jupyter-gpu/{route}",
                    "browser",
                    "jupyter-auth",
                    "-",
                    "JSON" if route != "api/stream" else "websocket",
                    _first_sentence(cls.__doc__ or ""),
                    f"labext/handlers.py: {cls.__name__}",
                    "route",
                )
            )
    return rows


# ---------------------------------------------------------------------- the declared handlers
def _servers() -> list[tuple[Server, type, str]]:
    from jupyter_gpu.broker.plugin import GpuBroker
    from jupyter_gpu.session.server import SessionServer
    from jupyter_gpu.worker.plugin import GpuWorkerPlugin

    return [
        ("scheduler", GpuBroker, "broker/plugin.py"),
        ("worker", GpuWorkerPlugin, "worker/plugin.py"),
        ("session", SessionServer, "session/server.py"),
    ]


def declared_rows() -> list[HandlerRecord]:
    """The handlers the three servers declare with ``@handler``, in their code's order."""
    rows = []
    for server, cls, path in _servers():
        for meta in declared(cls):
            rows.append(
                HandlerRecord(
                    server,
                    meta.op,
                    meta.caller,
                    meta.check,
                    arguments_text(meta.function),
                    reply_text(meta.function),
                    _first_sentence(inspect.getdoc(meta.function) or ""),
                    f"{path}: {cls.__name__}.{meta.function.__name__}",
                    "stream" if meta.stream else "handler",
                )
            )
    return rows


def handler_table() -> list[HandlerRecord]:
    """Every entry point of the pool's servers and the panel's routes (see the module
    docstring)."""
    return declared_rows() + _dask_rows() + _launcher_rows() + _route_rows()


# ---------------------------------------------------------------------- types as text
def _aliases() -> dict[Any, str]:
    """The named field types of ``common/validation.py`` (``Name``, ``Bytes``...), by value; two
    names for one value are both left out (the text would be ambiguous)."""
    named = [
        (value, name)
        for name, value in vars(validation).items()
        if get_origin(value) is Annotated and not name.startswith("_")
    ]
    values = [v for v, _ in named]
    return {v: n for v, n in named if values.count(v) == 1}


def _constraint(c: Any) -> str:
    if isinstance(c, MaxLen):
        return f"at most {c.n:,}"
    if isinstance(c, Range):
        return f"{_number(c.lo)} to {_number(c.hi)}"
    return repr(c)


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e19 else f"{x:g}"


def type_text(hint: Any, aliases: dict[Any, str] | None = None) -> str:
    """An annotation as the tables show it: ``Name``, ``list[GpuInfoMsg] (at most 1,024)``,
    ``"running" | "idle"``, ``Text | null``."""
    aliases = _aliases() if aliases is None else aliases
    if hint in aliases:
        return aliases[hint]
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        base, *constraints = args
        return f"{type_text(base, aliases)} ({', '.join(map(_constraint, constraints))})"
    if origin in (Union, types.UnionType):
        shown = [type_text(a, aliases) for a in args if a is not type(None)]
        return " | ".join(shown + (["null"] if type(None) in args else []))
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (list, tuple):
        return f"list[{type_text(args[0], aliases)}]" if args else "list"
    if origin is dict:
        return f"dict[{type_text(args[0], aliases)}, {type_text(args[1], aliases)}]"
    if hint is Any:
        return "any"
    if hint is type(None):
        return "null"
    return str(getattr(hint, "__name__", hint))


def arguments_text(fn: Any) -> str:
    """A handler's keyword arguments (``name?`` when optional); ``**TypedDict`` for fields it
    takes as a whole message."""
    hints = get_type_hints(fn, include_extras=True)
    aliases = _aliases()
    parts = []
    for name, p in inspect.signature(fn).parameters.items():
        if name in ("self", "comm"):
            continue
        if p.kind is p.VAR_KEYWORD:
            typed = unpacked_typeddict(hints.get(name))
            parts.append(f"**{typed.__name__}" if typed is not None else f"**{name}")
            continue
        optional = "?" if p.default is not p.empty else ""
        parts.append(f"{name}{optional}: {type_text(hints.get(name, Any), aliases)}")
    return ", ".join(parts) or "-"


def reply_text(fn: Any) -> str:
    """A handler's reply type; ``-`` for a handler that answers nothing."""
    hint = get_type_hints(fn, include_extras=True).get("return")
    return "-" if hint is None or hint is type(None) else type_text(hint)


def _first_sentence(doc: str) -> str:
    """The docstring's first sentence (up to a period, colon or semicolon outside parentheses), in
    Markdown's backticks."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "`")
    depth = 0
    for i, ch in enumerate(paragraph):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch in ".:;" and depth == 0 and (i + 1 == len(paragraph) or paragraph[i + 1] == " "):
            return paragraph[:i]
    return paragraph


# ---------------------------------------------------------------------- docs/interfaces.md
TITLES: dict[Server, str] = {
    "scheduler": "Scheduler (the broker, `broker/plugin.py`; Dask's own as `broker/gate.py` leaves it)",
    "worker": "Worker (the GPU worker plugin, `worker/plugin.py`; `worker/dask_worker.py`)",
    "nanny": "Nanny (`worker/nanny.py`)",
    "session": "Session (the session process, `session/server.py`)",
    "launcher": "Launcher (root, on a GPU machine started as root, `launcher/server.py`)",
    "jupyter": "Jupyter server routes (the panel's, `labext/handlers.py`)",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def tables_markdown() -> str:
    """The tables of every server, the legend of the field types, and the messages (the generated
    part of ``docs/interfaces.md``)."""
    out: list[str] = []
    rows = handler_table()
    for server, title in TITLES.items():
        out += [
            f"### {title}",
            "",
            "| op | caller | check | arguments | reply | what it does |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in (r for r in rows if r.server == server):
            op = f"`{r.op}`" + (" (stream)" if r.kind == "stream" else "")
            cells = [op, r.caller, r.check, _cell(r.arguments), _cell(r.reply), _cell(r.doc)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += ["### Field types", "", "| name | what it is |", "| --- | --- |"]
    for value, name in sorted(_aliases().items(), key=lambda item: item[1]):
        out.append(f"| `{name}` | {_cell(type_text(value, {}))} |")
    out += ["", "### Messages (`common/protocol.py`)", "", "| message | fields |", "| --- | --- |"]
    for name, td in sorted(typeddicts().items()):
        out.append(f"| `{name}` | {_cell(fields_text(td))} |")
    out.append("")
    return "\n".join(out)


def typeddicts() -> dict[str, type]:
    """Every TypedDict of ``common/protocol.py`` (private bases included in their subclasses)."""
    return {
        name: value
        for name, value in vars(protocol).items()
        if not name.startswith("_")
        and isinstance(value, type)
        and issubclass(value, dict)
        and hasattr(value, "__total__")
        and value.__module__ == protocol.__name__
    }


def fields_text(td: type) -> str:
    required: frozenset[str] = getattr(td, "__required_keys__", frozenset())
    aliases = _aliases()
    hints = get_type_hints(td, include_extras=True)
    return ", ".join(
        f"{k}{'' if k in required else '?'}: {type_text(v, aliases)}" for k, v in hints.items()
    )


GENERATED_BEGIN = "<!-- BEGIN GENERATED: python -m jupyter_gpu.interfaces -->"
GENERATED_END = "<!-- END GENERATED -->"


def render_interfaces(doc: str) -> str:
    """``doc`` (docs/interfaces.md) with its generated section replaced by the current tables."""
    head, _, rest = doc.partition(GENERATED_BEGIN)
    _, _, tail = rest.partition(GENERATED_END)
    return f"{head}{GENERATED_BEGIN}\n\n{tables_markdown()}\n{GENERATED_END}{tail}"


if __name__ == "__main__":  # regenerate docs/interfaces.md's tables in place
    path = sys.argv[1] if len(sys.argv) > 1 else "docs/interfaces.md"
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(render_interfaces(text))
