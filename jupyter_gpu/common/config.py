"""Settings live in Dask's config under ``jupyter-gpu``; this module registers the defaults."""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "jupyter-gpu.yaml")

with open(_DEFAULTS_FILE) as _f:
    dask.config.update_defaults(yaml.safe_load(_f))


def get(key: str, default: Any = None) -> Any:
    """Read ``jupyter-gpu.<key>`` from Dask config."""
    return dask.config.get(f"jupyter-gpu.{key}", default=default)


def get_seconds(key: str) -> float:
    """A duration setting (``1.5s``, ``8h``) in seconds."""
    from dask.utils import parse_timedelta

    return float(parse_timedelta(get(key)))


def get_bytes(key: str) -> int:
    from jupyter_gpu.common.units import parse_size

    value = get(key)
    return int(value) if isinstance(value, (int, float)) else parse_size(value)
