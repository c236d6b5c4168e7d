"""Headless reruns and the pytest plugin, tested with real pools, real kernels and real notebooks.

The pool fixtures come from the plugin itself (``gpu_pool``, ``gpu_kernel``; the ``pytest11`` entry
point loads it). There is no GPU on CI machines: the pools use virtual GPUs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).parent / "notebooks"

# the notebooks here are inputs of these tests (some fail on purpose), never tests themselves
collect_ignore_glob = ["notebooks/*"]

# set before any pool starts: the plugin's session pool, and pools started by pytester runs, inherit
# it
os.environ.setdefault("JUPYTER_GPU_VIRTUAL_GPUS", "2x16GiB")
os.environ.pop("JUPYTER_GPU_SCHEDULER", None)


def pytest_configure(config: pytest.Config) -> None:
    # `pytest_plugins = ["pytester"]` is refused in a conftest below the rootdir when pytest is run
    # on tests/
    if not config.pluginmanager.has_plugin("pytester"):
        config.pluginmanager.import_plugin("pytester")


@pytest.fixture
def notebooks() -> Path:
    return NOTEBOOKS


@pytest.fixture
def copy_notebooks(tmp_path: Path):
    """Copy named test notebooks into a directory (the test's own by default) and return their
    paths."""

    def copy(*names: str, into: Path | None = None) -> list[Path]:
        target = into or tmp_path
        return [Path(shutil.copy(NOTEBOOKS / name, target / name)) for name in names]

    return copy
