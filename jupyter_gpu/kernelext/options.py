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
import math
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
from jupyter_gpu.common.protocol import PRIORITIES, RequestSpec
from jupyter_gpu.common.units import parse_size

log = logging.getLogger(__name__)

BEGIN_MARK = "<!-- BEGIN %%gpu options (generated: python -m jupyter_gpu.kernelext.options) -->"
END_MARK = "<!-- END %%gpu options -->"
DOC_FILES = ("README.md", "docs/user-guide.md")


class _HelpFormatter(MagicHelpFormatter):
    """IPython's magic help layout at a fixed width, so that ``%gpu?`` reads the same in every
    terminal, with metavars as declared (``--in a,b``, not ``--in <a,b>``)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100, max_help_position=32)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        return argparse.HelpFormatter._format_action_invocation(self, action)


# the prog: IPython's help prefixes one more %, so the usage reads "%%gpu ..."
@magic_arguments("%gpu")
@kwds(formatter_class=_HelpFormatter)
@argument(
    "--gpus",
    metavar="F",
    default=None,
    help="a fraction in (0, 1] of one GPU (0.25 is a quarter of its memory), or a whole number of "
    "GPUs "
    "(2); default: the pool's default fraction (0.25 out of the box)",
)
@argument(
    "--memory",
    metavar="SIZE",
    default=None,
    help="ask by bytes on one GPU instead of --gpus, e.g. 8GiB, 500MB",
)
@argument(
    "--workers",
    metavar="N",
    default="1",
    help="run the cell on N GPUs at once, one rank per GPU, with torch.distributed initialised "
    "(default 1)",
)
@argument(
    "--timeout",
    metavar="S",
    default=None,
    help="stop the cell after S seconds (5min, 2h also work), the time it waits in the queue "
    "included",
)
@argument(
    "--priority",
    metavar="interactive|batch",
    default="interactive",
    help="interactive (the default) for cells you wait on; batch for long runs that may wait "
    "behind "
    "interactive work and are requeued when preempted",
)
@argument(
    "--in",
    dest="inputs",
    metavar="a,b",
    default=None,
    help="send exactly these local variables (default: the free names the cell uses that exist "
    "here)",
)
@argument(
    "--out",
    dest="outputs",
    metavar="x,y",
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


def _names(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier() or len(n) > MAX_NAME]
    if bad:
        raise UsageError(
            f"%%gpu {option}: {', '.join(map(repr, bad))} is not a variable name. Give names "
            f"separated by commas, e.g. {option} x,y"
        )
    return names


def _duration(text: str) -> float | None:
    """Seconds from ``300``, ``90s``, ``5min``, ``2h`` (Dask's units, plus ``min``), or None."""
    from dask.utils import parse_timedelta

    text = text.strip()
    if text.endswith("min"):
        text = text[:-3] + "m"
    # plain decimals with a unit: no 1e400, nan, inf, ²
    if not re.fullmatch(r"[0-9.]+\s*[a-z]*", text):
        return None
    try:
        return float(parse_timedelta(text, default="seconds"))
    except (ValueError, KeyError, TypeError, OverflowError):
        return None


# plain ASCII decimals: no 1e400, nan, inf, ²
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_WHOLE = re.compile(r"[0-9]+")
MAX_TIMEOUT = 366 * 86400.0  # a year: anything longer is a typo, not a limit
MAX_NAME = 200


def whole_number(text: str, what: str, lo: int, hi: int, example: str) -> int:
    """``text`` as a whole number in [lo, hi], or UsageError naming ``what`` and an example."""
    if not _WHOLE.fullmatch(text or "") or not lo <= int(text) <= hi:
        raise UsageError(
            f"{what} {text}: write a whole number >= {lo} (at most {hi}), e.g. {example}."
        )
    return int(text)


def parse_cell_options(line: str) -> CellOptions:
    """Parse the text after ``%%gpu``; raise UsageError naming the wrong option and the fix.

    Every value is checked here, before anything is sent or waits: numbers are plain ASCII
    decimals within their range (``--gpus nan``, ``--workers ²``, ``--timeout 1e400`` are
    mistakes, not values)."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(
            f"%%gpu: cannot read the options ({exc}); check the quotes. Usage: {USAGE}"
        ) from None
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:  # argparse's own message (an unknown option, a missing value)
        raise UsageError(
            f"%%gpu: {exc}. Usage: {USAGE}. Run `%gpu?` for what each option means."
        ) from None
    if args.gpus is not None and args.memory is not None:
        raise UsageError(
            "%%gpu: give either --gpus (a fraction or a number of GPUs) or --memory (bytes on one "
            "GPU), not both: they are two ways to say how much GPU this cell needs."
        )
    spec = RequestSpec(priority=args.priority)
    if args.gpus is not None:
        if not _DECIMAL.fullmatch(args.gpus.strip()):
            raise UsageError(
                f"%%gpu --gpus {args.gpus}: write a fraction of one GPU in (0, 1] such as 0.25, or "
                "a "
                "whole number of GPUs such as 2."
            )
        value = float(args.gpus)
        if value <= 0:
            raise UsageError(
                f"%%gpu --gpus {args.gpus}: a GPU share must be greater than 0. Write a fraction "
                "in "
                "(0, 1] such as 0.25 (a quarter of one GPU) or a whole number such as 1."
            )
        if value <= 1 and not (value == 1 and "." not in args.gpus):
            spec.fraction = value
        elif value == int(value) and value <= RequestSpec.MAX_GPUS:
            spec.gpus = int(value)
        elif value == int(value):
            raise UsageError(
                f"%%gpu --gpus {args.gpus}: at most {RequestSpec.MAX_GPUS} whole GPUs in one "
                "session."
            )
        else:
            raise UsageError(
                f"%%gpu --gpus {args.gpus}: above 1 the count must be whole (2, not 1.5): one "
                "session gets whole GPUs, or a fraction of one."
            )
    elif args.memory is not None:
        try:
            spec.memory = parse_size(args.memory)
        except (ValueError, OverflowError) as exc:
            raise UsageError(
                f"%%gpu --memory {args.memory}: {exc}. Write a size such as 8GiB or 500MB."
            ) from None
        if not 0 < spec.memory <= 2**62:
            raise UsageError(
                f"%%gpu --memory {args.memory}: write a size above 0 such as 8GiB or 500MB."
            )
    else:
        spec.fraction = float(config.get("default-fraction"))
    spec.workers = whole_number(
        args.workers, "%%gpu --workers", 1, RequestSpec.MAX_RANKS, "--workers 2"
    )
    if args.priority not in PRIORITIES:
        raise UsageError(
            f"%%gpu --priority {args.priority}: use 'interactive' (the default, for cells you "
            "wait on) or 'batch' (long runs that may wait behind interactive work)."
        )
    timeout = None
    if args.timeout is not None:
        timeout = _duration(args.timeout)
        if timeout is None or not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT:
            raise UsageError(
                f"%%gpu --timeout {args.timeout}: write a positive duration in seconds (300) or "
                "with a unit (90s, 5min, 2h), at most a year."
            )
    try:
        spec.validate()
    except ValueError as exc:
        raise UsageError(f"%%gpu: {exc}.") from None
    retries = whole_number(args.retries, "%%gpu --retries", 0, 100, "--retries 2")
    if args.fresh and spec.workers > 1:
        raise UsageError(
            "%%gpu: --fresh applies to single-GPU cells; every --workers run already gets its own "
            "sessions."
        )
    if args.name is not None and (len(args.name) > MAX_NAME or not args.name.isprintable()):
        raise UsageError(
            f"%%gpu --name: give a short printable label (at most {MAX_NAME} characters)."
        )
    return CellOptions(
        spec=spec,
        timeout=timeout,
        inputs=_names(args.inputs, "--in"),
        outputs=_names(args.outputs, "--out"),
        fresh=args.fresh,
        run_async=args.run_async,
        name=args.name,
        explicit_request=args.gpus is not None or args.memory is not None,
        retries=retries,
        resume=args.resume,
    )


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
