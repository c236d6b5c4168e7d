"""Byte sizes as people write them (``8GiB``, ``500MB``) and as we print them."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse ``8GiB`` / ``500MB`` / ``1.5G`` into bytes; raise ValueError naming the accepted
    forms."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as a memory size: write a number with a unit such as 500MB, "
            "8GiB or 1.5GB "
            "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be greater than zero")
    return int(value)


def typed_size(n: int) -> str:
    """``n`` bytes as a size one types in an option (``512MiB``, ``3GiB``), rounded up to whole
    MiB (whole GiB from 1 GiB on): the value an error or a hint tells the user to ask for."""
    if n >= 2**30:
        return f"{-(-n // 2**30)}GiB"
    return f"{-(-n // 2**20)}MiB"


def format_bytes(n: float | int | None) -> str:
    """Short human form with binary units, e.g. ``16.0 GiB``."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
