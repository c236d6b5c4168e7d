"""The ``%%gpu`` options: declared once, parsed into a ``CellOptions``, with one clear paragraph per
mistake.

The declaration is IPython's ``magic_arguments`` (``@magic_arguments()`` over ``@argument(...)``, as
ipyparallel's ``%%px`` does). Everything a user reads about the options comes from it: the usage
line in every error (``USAGE``), ``%gpu?`` and ``%gpu help`` (``options_help()``) and the tables in
README.md and docs/user-guide.md (``options_markdown()``; ``python -m
jupyter_gpu.kernelext.options`` rewrites them), so an option cannot be parsed without being
documented, nor documented differently in two places.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from IPython.core.error import UsageError
from IPython.core.magic_arguments import (
    MagicArgumentParser,
    MagicHelpFormatter,
    argument,
    kwds,
    magic_arguments,
)

from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import RequestSpec
from jupyter_gpu.kernelext import option_values as values

log = logging.getLogger(__name__)

BEGIN_MARK = "<!-- BEGIN %%gpu options (generated: python -m jupyter_gpu.kernelext.options) -->"
END_MARK = "<!-- END %%gpu options -->"
DOC_FILES = ("README.md", "docs/user-guide.md")


class HelpFormatter(MagicHelpFormatter):
    """IPython's magic help layout at a fixed width, so that ``%gpu?`` reads the same in every
    terminal, with metavars as declared (``--in a,b``, not ``--in <a,b>``)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100, max_help_position=32)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        return argparse.HelpFormatter._format_action_invocation(self, action)


# the prog: IPython's help prefixes one more %, so the usage reads "%%gpu ..."
@magic_arguments("%gpu")
@kwds(formatter_class=HelpFormatter)
@argument(
    "--gpus",
    metavar="F",
    type=values.gpus,
    default=None,
    help="a fraction in (0, 1] of one GPU (0.25 is a quarter of its memory), or a whole number of "
    "GPUs "
    "(2); default: the pool's default fraction (0.25 out of the box)",
)
@argument(
    "--memory",
    metavar="SIZE",
    type=values.memory,
    default=None,
    help="ask by bytes on one GPU instead of --gpus, e.g. 8GiB, 500MB",
)
@argument(
    "--host-memory",
    metavar="SIZE",
    type=values.host_memory,
    default=None,
    help="the GPU machine's memory (RAM) the cell's session may use, e.g. 16GiB; over it the "
    "session alone is stopped (default: the pool's share for the GPU share asked for)",
)
@argument(
    "--cpus",
    metavar="N",
    type=values.cpus,
    default=None,
    help="CPU cores of the GPU machine for the cell's session, e.g. 2 or 0.5 (default: the "
    "pool's share for the GPU share asked for)",
)
@argument(
    "--workers",
    metavar="N",
    type=values.whole("%%gpu --workers", 1, RequestSpec.MAX_RANKS, "--workers 2"),
    default="1",
    help="run the cell on N GPUs at once, one rank per GPU, with torch.distributed initialised "
    "(default 1)",
)
@argument(
    "--timeout",
    metavar="S",
    type=values.duration,
    default=None,
    help="stop the cell after S seconds (5min, 2h also work), the time it waits in the queue "
    "included",
)
@argument(
    "--priority",
    metavar="interactive|batch",
    type=values.priority,
    default="interactive",
    help="interactive (the default) for cells you wait on; batch for long runs that may wait "
    "behind "
    "interactive work and are requeued when preempted",
)
@argument(
    "--in",
    dest="inputs",
    metavar="a,b",
    type=values.names("--in"),
    default=None,
    help="send exactly these local variables (default: the free names the cell uses that exist "
    "here)",
)
@argument(
    "--out",
    dest="outputs",
    metavar="x,y",
    type=values.names("--out"),
    default=None,
    help="bring back exactly these (default: the plain data the cell assigns; the rest stays "
    "remote)",
)
@argument(
    "--fresh",
    action="store_true",
    help="run in a throwaway session, released after the cell (single-GPU cells)",
)
@argument(
    "--async",
    dest="run_async",
    action="store_true",
    help="return a handle at once; the cell runs in the background (job.result(), await job)",
)
@argument(
    "--name",
    metavar="TEXT",
    type=values.label,
    default=None,
    help="a label for the panel and the queue; --resume finds this cell's earlier runs by it",
)
@argument(
    "--resume",
    action="store_true",
    help="start from the last jupyter_gpu.checkpoint() of this cell's latest earlier run (same "
    "--name, or "
    "same source); without it every run starts afresh (a run that lost a worker always resumes)",
)
@argument(
    "--retries",
    metavar="N",
    type=values.whole("%%gpu --retries", 0, 100, "--retries 2"),
    default="2",
    help="for batch cells, how many times a preempted cell is requeued; for --workers runs, how "
    "many "
    "times a run that lost a worker resumes from its last checkpoint (default 2)",
)
def gpu_options(line: str, cell: str) -> None:
    """Run this cell on a fraction of a GPU in the shared pool. The names it uses are sent from this
    kernel, and its output, the plain data it assigns and its errors come back as if it had run
    here; the notebook's variables on the GPU persist from one %%gpu cell to the next."""


@dataclass
class CellOptions:
    """What one ``%%gpu`` line asks for."""

    spec: RequestSpec
    timeout: float | None = None
    inputs: list[str] | None = None
    outputs: list[str] | None = None
    fresh: bool = False
    run_async: bool = False
    name: str | None = None
    explicit_request: bool = False
    retries: int = 2
    resume: bool = False
    extra: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=1)
def _parser() -> MagicArgumentParser:
    """The declaration's parser, built once by ``@magic_arguments`` (argparse construction costs
    more than parsing a %%gpu line, and the warm round trip of a no-op cell is benchmarked).
    Abbreviations are off: a misspelt ``--gpu`` must be an error, not silently ``--gpus``."""
    parser = gpu_options.parser
    parser.allow_abbrev = False
    return parser


def _option_rows() -> list[tuple[str, str]]:
    """(invocation, help) per option, in declaration order, with argparse's %-escapes expanded."""
    parser = _parser()
    rows = []
    for action in parser._actions:
        metavar = cast("str | None", action.metavar)  # one word per option here, never a tuple
        invocation = " ".join(filter(None, [action.option_strings[0], metavar]))
        rows.append((invocation, (action.help or "") % {**vars(action), "prog": parser.prog}))
    return rows


@functools.lru_cache(maxsize=1)
def usage() -> str:
    """The one-line usage (``%%gpu [--gpus F] ...``) that every error about the options ends
    with."""
    return "%%gpu " + " ".join(f"[{invocation}]" for invocation, _ in _option_rows())


USAGE = usage()


def options_help() -> str:
    """``%gpu?`` and ``%gpu help`` for the cell form: the declaration's argparse help."""
    # @magic_arguments replaced the docstring with the parser's help
    return gpu_options.__doc__ or ""


def options_markdown() -> str:
    """The options table of README.md and docs/user-guide.md, between ``BEGIN_MARK`` and
    ``END_MARK``."""
    lines = ["| option | what it does |", "| --- | --- |"]
    for invocation, text in _option_rows():
        cells = [f"`{invocation}`", text]
        # a | would split the cell
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def with_generated_table(text: str) -> str:
    """``text`` with the part between the markers replaced by ``options_markdown()``."""
    pattern = re.compile(re.escape(BEGIN_MARK) + r"\n.*?" + re.escape(END_MARK), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN_MARK!r} ... {END_MARK!r} block to rewrite")
    return pattern.sub(lambda _: f"{BEGIN_MARK}\n{options_markdown()}\n{END_MARK}", text)


def parse_cell_options(line: str) -> CellOptions:
    """Parse the text after ``%%gpu``; raise UsageError naming the wrong option and the fix.

    Each value is checked by its option's ``type=`` (``option_values.py``) as it is parsed, before
    anything is sent or waits; what is left here is how the options go together."""
    args = _parse(line)
    if args.gpus is not None and args.memory is not None:
        raise UsageError(
            "%%gpu: give either --gpus (a fraction or a number of GPUs) or --memory (bytes on one "
            "GPU), not both: they are two ways to say how much GPU this cell needs."
        )
    spec = RequestSpec(priority=args.priority)
    if isinstance(args.gpus, int):
        spec.gpus = args.gpus
    elif args.gpus is not None:
        spec.fraction = args.gpus
    elif args.memory is not None:
        spec.memory = args.memory
    else:
        spec.fraction = float(config.get("default-fraction"))
    spec.workers = args.workers
    spec.host_memory, spec.cpus = args.host_memory, args.cpus
    try:
        spec.validate()
    except ValueError as exc:
        raise UsageError(f"%%gpu: {exc}.") from None
    if args.fresh and spec.workers > 1:
        raise UsageError(
            "%%gpu: --fresh applies to single-GPU cells; every --workers run already gets its own "
            "sessions."
        )
    return CellOptions(
        spec=spec,
        timeout=args.timeout,
        inputs=args.inputs,
        outputs=args.outputs,
        fresh=args.fresh,
        run_async=args.run_async,
        name=args.name,
        explicit_request=any(
            value is not None for value in (args.gpus, args.memory, args.host_memory, args.cpus)
        ),
        retries=args.retries,
        resume=args.resume,
    )


def _parse(line: str) -> argparse.Namespace:
    """The options of one ``%%gpu`` line, each converted by its ``type=``."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(
            f"%%gpu: cannot read the options ({exc}); check the quotes. Usage: {USAGE}"
        ) from None
    try:
        return _parser().parse_args(argv)
    except values.OptionValueError as exc:  # a value's own paragraph, as IPython shows a UsageError
        raise UsageError(str(exc)) from None
    except UsageError as exc:  # argparse's own message (an unknown option, a missing value)
        raise UsageError(
            f"%%gpu: {exc}. Usage: {USAGE}. Run `%gpu?` for what each option means."
        ) from None


def main(argv: list[str] | None = None) -> int:
    """``python -m jupyter_gpu.kernelext.options [FILE ...]``: rewrite the generated options tables
    (by default README.md and docs/user-guide.md, relative to the current directory: run it from the
    repo)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:]) or DOC_FILES]
    for path in paths:
        text = path.read_text()
        new = with_generated_table(text)
        if new != text:
            path.write_text(new)
            log.info("rewrote the %%%%gpu options table in %s", path)
        else:
            log.info("%s is up to date", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
