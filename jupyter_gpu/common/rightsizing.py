"""Right-sizing: compare what a GPU session reserved with what its cells used, and suggest a smaller
ask.

A lease reserves memory for the session's whole life, so an over-sized request keeps others waiting
for memory nobody touches. Every cell measures its peak (``jupyter_gpu.session.memory_meter``); the
kernel, ``%gpu status``, the panel and ``jupyter-gpu usage`` use these helpers to tell the user when
a request was far larger than its use, with a request that would have done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jupyter_gpu.common.units import format_bytes, typed_size

#: a session that used less than this share of its reservation was over-sized
OVERSIZED_BELOW = 0.25
#: below this reservation the saving is not worth a hint
MIN_RESERVED_FOR_HINT = 1 << 30
#: headroom over the measured peak in a suggestion
HEADROOM = 1.25
MIN_SUGGESTION = 256 << 20


@dataclass(frozen=True)
class RightSize:
    """How a session's peak compares with its reservation, and the request that would have done."""

    peak_bytes: int
    reserved_bytes: int
    suggestion_bytes: int

    @property
    def used_share(self) -> float:
        return self.peak_bytes / self.reserved_bytes if self.reserved_bytes else 0.0

    def suggestion(self) -> str:
        """The ``--memory`` value to ask next time, e.g. ``2GiB`` or ``512MiB``."""
        return typed_size(self.suggestion_bytes)

    label = "Right-size"

    def hint(self) -> str:
        return (
            f"this session used at most {format_bytes(self.peak_bytes)} of the "
            f"{format_bytes(self.reserved_bytes)} it reserves: --memory {self.suggestion()} would "
            "do "
            "and leaves the rest to others"
        )


def suggest_bytes(peak_bytes: int) -> int:
    """The next power of two (at least 256 MiB) above the peak plus headroom: requests people can
    read."""
    want = max(MIN_SUGGESTION, int(peak_bytes * HEADROOM))
    return 1 << math.ceil(math.log2(want))


def right_size(peak_bytes: int | None, reserved_bytes: int | None) -> RightSize | None:
    """A ``RightSize`` when the reservation was far larger than the peak (None: no measurement, or
    fine)."""
    if peak_bytes is None or not reserved_bytes or reserved_bytes < MIN_RESERVED_FOR_HINT:
        return None
    peak = max(0, int(peak_bytes))
    if peak >= reserved_bytes * OVERSIZED_BELOW:
        return None
    suggestion = suggest_bytes(peak)
    if suggestion >= reserved_bytes:
        return None
    return RightSize(peak, int(reserved_bytes), suggestion)


@dataclass(frozen=True)
class OverUse:
    """A cell whose measured peak went over the share its session reserves, where nothing enforces
    the share (isolation ``none``: a virtual GPU). On a real GPU with a cap the same cell fails
    with CUDA out of memory, so a notebook that passes in CI must hear of it there."""

    peak_bytes: int
    reserved_bytes: int

    label = "Over its share"

    def suggestion(self) -> str:
        return typed_size(suggest_bytes(self.peak_bytes))

    def hint(self) -> str:
        return (
            f"this cell's peak, {format_bytes(self.peak_bytes)}, is more than the "
            f"{format_bytes(self.reserved_bytes)} its session reserves. A virtual GPU does not "
            "enforce the share; on a real GPU this cell would run out of memory: ask for "
            f"--memory {self.suggestion()} (with %gpu release first)"
        )


def over_use(peak_bytes: int | None, reserved_bytes: int | None) -> OverUse | None:
    """An ``OverUse`` when a cell's peak went over its session's reservation (None otherwise)."""
    if peak_bytes is None or not reserved_bytes or peak_bytes <= reserved_bytes:
        return None
    return OverUse(int(peak_bytes), int(reserved_bytes))
