"""Each ``%gpu`` / ``%%gpu`` option's value, from the text a user typed to a checked value.

These are the ``type=`` of the options' declarations (``options.py`` for the cell form,
``line_commands.py`` for the line commands): argparse calls one per value, so an option cannot be
parsed without its check, and each check lives next to nothing else. A wrong value raises an
``OptionValueError``: one paragraph that names the option, the value and what to write instead.
Numbers are plain ASCII decimals within their range: ``--gpus nan``, ``--workers ²`` and ``--timeout
1e400`` are mistakes, not values.

Why ``UsageError`` and not argparse's ``ArgumentTypeError``: argparse would rewrite the message as
``argument --gpus: ...``; an exception of another kind passes through argparse untouched, so the
user reads exactly the paragraph written here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from IPython.core.error import UsageError

from jupyter_gpu.common.protocol import PRIORITIES, RequestSpec
from jupyter_gpu.common.units import parse_size

# plain ASCII decimals: no 1e400, nan, inf, ²
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_WHOLE = re.compile(r"[0-9]+")
MAX_TIMEOUT = 366 * 86400.0  # a year: anything longer is a typo, not a limit
MAX_NAME = 200


class OptionValueError(UsageError):
    """A value that one option does not accept; the message is the whole explanation. The parsers
    raise it on as a plain ``UsageError``: IPython shows that type (exactly) as a one-line usage
    error, anything else as a traceback."""


def whole_number(text: str, what: str, lo: int, hi: int, example: str) -> int:
    """``text`` as a whole number in [lo, hi], or an error naming ``what`` and an example."""
    if not _WHOLE.fullmatch(text or "") or not lo <= int(text) <= hi:
        raise OptionValueError(
            f"{what} {text}: write a whole number >= {lo} (at most {hi}), e.g. {example}."
        )
    return int(text)


def whole(what: str, lo: int, hi: int, example: str) -> Callable[[str], int]:
    """The ``type=`` of an option that takes a whole number in [lo, hi]."""

    def convert(text: str) -> int:
        return whole_number(text, what, lo, hi, example)

    return convert


def gpus(text: str) -> float | int:
    """``--gpus``: a fraction of one GPU (a float in (0, 1]; ``1.0`` is all of one GPU's memory)
    or a whole number of GPUs (an int: ``1``, ``2``)."""
    if not _DECIMAL.fullmatch(text.strip()):
        raise OptionValueError(
            f"%%gpu --gpus {text}: write a fraction of one GPU in (0, 1] such as 0.25, or a whole "
            "number of GPUs such as 2."
        )
    value = float(text)
    if value <= 0:
        raise OptionValueError(
            f"%%gpu --gpus {text}: a GPU share must be greater than 0. Write a fraction in (0, 1] "
            "such as 0.25 (a quarter of one GPU) or a whole number such as 1."
        )
    if value <= 1 and not (value == 1 and "." not in text):
        return value
    if value == int(value) and value <= RequestSpec.MAX_GPUS:
        return int(value)
    if value == int(value):
        raise OptionValueError(
            f"%%gpu --gpus {text}: at most {RequestSpec.MAX_GPUS} whole GPUs in one session."
        )
    raise OptionValueError(
        f"%%gpu --gpus {text}: above 1 the count must be whole (2, not 1.5): one session gets "
        "whole GPUs, or a fraction of one."
    )


def _size(option: str, text: str, example: str) -> int:
    """A size in bytes for ``option`` (above 0, at most 2**62), or the error that says how to
    write one (``example``: what a good value looks like for this option)."""
    try:
        size = parse_size(text)
    except (ValueError, OverflowError) as exc:
        raise OptionValueError(f"%%gpu {option} {text}: {exc}. Write {example}.") from None
    if not 0 < size <= 2**62:
        raise OptionValueError(
            f"%%gpu {option} {text}: write a size above 0 such as 8GiB or 500MB."
        )
    return size


def memory(text: str) -> int:
    """``--memory``: bytes on one GPU (``8GiB``, ``500MB``)."""
    return _size("--memory", text, "a size such as 8GiB or 500MB")


def host_memory(text: str) -> int:
    """``--host-memory``: bytes of the GPU machine's own memory (RAM) for the cell's session."""
    return _size("--host-memory", text, "a size of host memory (RAM) such as 8GiB")


def cpus(text: str) -> float:
    """``--cpus``: CPU cores of the GPU machine for the cell's session (fractions allowed)."""
    if not _DECIMAL.fullmatch(text.strip()) or not 0 < float(text) <= RequestSpec.MAX_CPUS:
        raise OptionValueError(
            f"%%gpu --cpus {text}: write a number of CPU cores above 0 (at most "
            f"{RequestSpec.MAX_CPUS}) such as 2 or 0.5."
        )
    return float(text)


def duration(text: str) -> float:
    """``--timeout``: seconds from ``300``, ``90s``, ``5min``, ``2h`` (Dask's units, plus
    ``min``), positive and at most a year."""
    from dask.utils import parse_timedelta

    clean = text.strip()
    if clean.endswith("min"):
        clean = clean[:-3] + "m"
    seconds: float | None = None
    # plain decimals with a unit: no 1e400, nan, inf, ²
    if re.fullmatch(r"[0-9.]+\s*[a-z]*", clean):
        try:
            seconds = float(parse_timedelta(clean, default="seconds"))
        except (ValueError, KeyError, TypeError, OverflowError):
            seconds = None
    if seconds is None or not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT:
        raise OptionValueError(
            f"%%gpu --timeout {text}: write a positive duration in seconds (300) or with a unit "
            "(90s, 5min, 2h), at most a year."
        )
    return seconds


def priority(text: str) -> str:
    """``--priority``: interactive or batch."""
    if text not in PRIORITIES:
        raise OptionValueError(
            f"%%gpu --priority {text}: use 'interactive' (the default, for cells you wait on) or "
            "'batch' (long runs that may wait behind interactive work)."
        )
    return text


def names(option: str) -> Callable[[str], list[str]]:
    """The ``type=`` of ``--in`` / ``--out``: variable names separated by commas."""

    def convert(text: str) -> list[str]:
        found = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in found if not n.isidentifier() or len(n) > MAX_NAME]
        if bad:
            raise OptionValueError(
                f"%%gpu {option}: {', '.join(map(repr, bad))} is not a variable name. Give names "
                f"separated by commas, e.g. {option} x,y"
            )
        return found

    return convert


def label(text: str) -> str:
    """``--name``: a short printable label."""
    if len(text) > MAX_NAME or not text.isprintable():
        raise OptionValueError(
            f"%%gpu --name: give a short printable label (at most {MAX_NAME} characters)."
        )
    return text


def variable(text: str) -> str:
    """``%gpu pull NAME``: the name of one variable."""
    if not text.isidentifier() or len(text) > MAX_NAME:
        raise OptionValueError(
            "%gpu pull NAME: give the name of one variable that lives in your GPU session."
        )
    return text


def identifier(text: str) -> str:
    """``%gpu cancel ID``: a request, lease or job id as the pool printed it."""
    if len(text) > MAX_NAME or not text.isprintable():
        raise OptionValueError(
            "%gpu cancel ID: give one id from `%gpu queue` or `%gpu status` (R.. for a queued "
            "request, L.. for a lease, J.. for an --async job)."
        )
    return text
