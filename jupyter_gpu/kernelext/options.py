"""Parsing ``%%gpu`` options into a ``CellOptions``, with one clear paragraph for every mistake."""

from __future__ import annotations

import argparse
import functools
import shlex
from dataclasses import dataclass, field

from IPython.core.error import UsageError

from jupyter_gpu.common import config
from jupyter_gpu.common.protocol import PRIORITIES, RequestSpec
from jupyter_gpu.common.units import parse_size

USAGE = ("%%gpu [--gpus F] [--memory SIZE] [--workers N] [--timeout S] [--priority interactive|batch] "
         "[--in a,b] [--out x,y] [--fresh] [--async] [--name TEXT]")


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
    extra: dict = field(default_factory=dict)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit the kernel process
        raise UsageError(f"%%gpu: {message}. Usage: {USAGE}. Run `%gpu?` for what each option means.")


@functools.lru_cache(maxsize=1)
def _parser() -> _Parser:
    """Built once: argparse construction costs more than parsing a %%gpu line."""
    p = _Parser(prog="%%gpu", add_help=False, allow_abbrev=False)
    p.add_argument("--gpus", default=None)
    p.add_argument("--memory", default=None)
    p.add_argument("--workers", default="1")
    p.add_argument("--timeout", default=None)
    p.add_argument("--priority", default="interactive")
    p.add_argument("--in", dest="inputs", default=None)
    p.add_argument("--out", dest="outputs", default=None)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--async", dest="run_async", action="store_true")
    p.add_argument("--name", default=None)
    p.add_argument("--retries", default="2")
    return p


def _names(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"%%gpu {option}: {', '.join(map(repr, bad))} is not a variable name. Give names "
                         f"separated by commas, e.g. {option} x,y")
    return names


def _duration(text: str) -> float | None:
    """Seconds from ``300``, ``90s``, ``5min``, ``2h`` (Dask's units, plus ``min``), or None."""
    from dask.utils import parse_timedelta

    text = text.strip()
    if text.endswith("min"):
        text = text[:-3] + "m"
    try:
        return float(parse_timedelta(text, default="seconds"))
    except (ValueError, KeyError, TypeError):
        return None


def parse_cell_options(line: str) -> CellOptions:
    """Parse the text after ``%%gpu``; raise UsageError naming the wrong option and the fix."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"%%gpu: cannot read the options ({exc}); check the quotes. Usage: {USAGE}") from None
    args = _parser().parse_args(argv)
    if args.gpus is not None and args.memory is not None:
        raise UsageError("%%gpu: give either --gpus (a fraction or a number of GPUs) or --memory (bytes on one "
                         "GPU), not both: they are two ways to say how much GPU this cell needs.")
    spec = RequestSpec(priority=args.priority)
    if args.gpus is not None:
        try:
            value = float(args.gpus)
        except ValueError:
            raise UsageError(f"%%gpu --gpus {args.gpus}: write a fraction of one GPU in (0, 1] such as 0.25, or a "
                             "whole number of GPUs such as 2.") from None
        if value <= 0:
            raise UsageError(f"%%gpu --gpus {args.gpus}: a GPU share must be greater than 0. Write a fraction in "
                             "(0, 1] such as 0.25 (a quarter of one GPU) or a whole number such as 1.")
        if value <= 1 and not (value == 1 and "." not in args.gpus):
            spec.fraction = value
        elif value == int(value):
            spec.gpus = int(value)
        else:
            raise UsageError(f"%%gpu --gpus {args.gpus}: above 1 the count must be whole (2, not 1.5): one "
                             "session gets whole GPUs, or a fraction of one.")
    elif args.memory is not None:
        try:
            spec.memory = parse_size(args.memory)
        except ValueError as exc:
            raise UsageError(f"%%gpu --memory: {exc}.") from None
    else:
        spec.fraction = float(config.get("default-fraction"))
    if not args.workers.isdigit() or int(args.workers) < 1:
        raise UsageError(f"%%gpu --workers {args.workers}: write how many GPUs to train on, a whole number "
                         ">= 1 (e.g. --workers 2).")
    spec.workers = int(args.workers)
    if args.priority not in PRIORITIES:
        raise UsageError(f"%%gpu --priority {args.priority}: use 'interactive' (the default, for cells you "
                         "wait on) or 'batch' (long runs that may wait behind interactive work).")
    timeout = None
    if args.timeout is not None:
        timeout = _duration(args.timeout)
        if timeout is None or timeout <= 0:
            raise UsageError(f"%%gpu --timeout {args.timeout}: write a positive duration in seconds (300) or "
                             "with a unit (90s, 5min, 2h).")
    try:
        spec.validate()
    except ValueError as exc:
        raise UsageError(f"%%gpu: {exc}.") from None
    if not args.retries.isdigit():
        raise UsageError(f"%%gpu --retries {args.retries}: write a whole number >= 0.")
    retries = int(args.retries)
    if args.fresh and spec.workers > 1:
        raise UsageError("%%gpu: --fresh applies to single-GPU cells; every --workers run already gets its own "
                         "sessions.")
    return CellOptions(spec=spec, timeout=timeout, inputs=_names(args.inputs, "--in"),
                       outputs=_names(args.outputs, "--out"), fresh=args.fresh, run_async=args.run_async,
                       name=args.name, explicit_request=args.gpus is not None or args.memory is not None,
                       retries=retries)
