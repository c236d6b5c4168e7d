"""The ``%gpu COMMAND`` line commands: declared once, parsed, and documented from the declaration.

Each command is declared as the cell form's options are (``options.py``): IPython's
``magic_arguments`` over one function per command, its docstring the one-line description, each
argument with its ``type=`` check (``option_values.py``). ``%gpu help``, ``%gpu?`` and every error
about a command come from these declarations (``LINE_HELP``, ``command_usage``), so a command
cannot take an argument it does not document.
"""

from __future__ import annotations

import argparse
import functools
import shlex
from collections.abc import Callable

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser, argument, kwds, magic_arguments

from jupyter_gpu.kernelext import option_values as values
from jupyter_gpu.kernelext.options import HelpFormatter

MAX_WORKERS = 100_000  # what %gpu scale accepts (the broker checks the same bound)


def _command(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``@magic_arguments`` for ``%gpu NAME``, laid out like the cell form's help."""

    def declare(func: Callable[..., None]) -> Callable[..., None]:
        return magic_arguments(f"gpu {name}")(kwds(formatter_class=HelpFormatter)(func))

    return declare


@_command("connect")
@argument("address", nargs="?", metavar="ADDRESS", help="the scheduler, e.g. tcp://10.0.0.5:8786")
@argument(
    "--keep",
    action="store_true",
    help="keep the embedded pool up for hours after its last kernel (across kernel restarts)",
)
def connect(line: str) -> None:
    """join a pool (no address: JUPYTER_GPU_SCHEDULER or the embedded pool)"""


@_command("status")
def status(line: str) -> None:
    """the pool, my sessions, my quota"""


@_command("queue")
def queue(line: str) -> None:
    """the queue, with the reason each item waits"""


@_command("cancel")
@argument("id", metavar="ID", type=values.identifier, help="R.. (request), L.. (lease), J.. (job)")
def cancel(line: str) -> None:
    """cancel my queued request, lease or --async job"""


@_command("scale")
@argument(
    "n",
    metavar="N",
    type=values.whole("%gpu scale", 0, MAX_WORKERS, "%gpu scale 3"),
    help="how many workers the pool should have (0: none of its cluster manager's jobs)",
)
def scale(line: str) -> None:
    """scale the pool to N workers (if allowed; jobs of its cluster manager)"""


@_command("pull")
@argument("name", metavar="NAME", type=values.variable, help="a variable of your GPU session")
def pull(line: str) -> None:
    """bring a remote-only object back (as a CPU copy)"""


@_command("release")
def release(line: str) -> None:
    """end my remote session now (its variables are lost)"""


@_command("help")
def help_(line: str) -> None:
    """these commands, and the options of %%gpu"""


COMMANDS: dict[str, Callable[..., None]] = {
    "connect": connect,
    "status": status,
    "queue": queue,
    "cancel": cancel,
    "scale": scale,
    "pull": pull,
    "release": release,
    "help": help_,
}


def _parser(command: str) -> MagicArgumentParser:
    parser: MagicArgumentParser = COMMANDS[command].parser  # type: ignore[attr-defined]
    parser.allow_abbrev = False  # `%gpu connect --kee` is a mistake, not --keep
    return parser


@functools.lru_cache(maxsize=None)
def command_usage(command: str) -> str:
    """``%gpu scale N``: the command and its arguments, from the declaration."""
    parser = _parser(command)
    formatter = argparse.HelpFormatter(parser.prog, width=1000)
    formatter.add_usage(parser.usage, parser._actions, [], prefix="")
    return "%" + formatter.format_help().strip()


def description(command: str) -> str:
    """What the command does: its function's docstring (``@magic_arguments`` made it the
    parser's description)."""
    return " ".join((_parser(command).description or "").split())


def line_help() -> str:
    """``%gpu help``: each command with its usage and what it does, then its arguments."""
    rows: list[tuple[str, str]] = []
    for command in COMMANDS:
        rows.append((command_usage(command), description(command)))
        for action in _parser(command)._actions:
            invocation = action.option_strings[0] if action.option_strings else action.metavar
            rows.append((f"    {invocation}", action.help or ""))
    width = max(len(u) for u, _ in rows) + 3
    body = "\n".join(f"{u:<{width}}{what}".rstrip() for u, what in rows)
    return f"The line form, %gpu COMMAND:\n\n{body}\n"


LINE_HELP = line_help()


def parse_line(line: str) -> tuple[str, argparse.Namespace]:
    """``%gpu COMMAND ARGS`` as the command and its checked arguments; a UsageError naming the
    mistake and the command's usage otherwise (``help`` for an empty line)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"%gpu: cannot read the line ({exc}); check the quotes.") from None
    if not words or words[0] in ("-h", "--help"):
        return "help", argparse.Namespace()
    command, rest = words[0], words[1:]
    if command not in COMMANDS:
        raise UsageError(
            f"%gpu {command}: unknown command. Commands: {', '.join(COMMANDS)}. Run `%gpu help` "
            "for their arguments; `%%gpu` (two %) on the first line of a cell runs the cell on a "
            "GPU."
        )
    try:
        return command, _parser(command).parse_args(rest)
    except values.OptionValueError as exc:  # a value's own paragraph, as IPython shows a UsageError
        raise UsageError(str(exc)) from None
    except UsageError as exc:  # argparse's message: a missing or an extra argument
        raise UsageError(
            f"%gpu {command}: {exc}. Usage: `{command_usage(command)}` ({description(command)})."
        ) from None
