"""The README's commands are what a new user types first: they must be true as written.

Bugs fixed: the quick start began with ``pip install jupyter-gpu``, which fails (the package is on no
index); ``--gpus 2`` was shown as a way to ask, but the quick start's pool (two virtual GPUs, one per
worker) refuses it.
"""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _bash_blocks() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
    return [[line for line in b.splitlines() if line.strip()] for b in blocks]


def test_the_first_two_command_lines_are_the_two_set_up_commands():
    first, second = _bash_blocks()[:2]
    assert len(first) == 1 and len(second) == 1
    assert (
        "pip install ." in first[0] and "jupyter-gpu run notebooks/01-quickstart.ipynb" in first[0]
    )
    assert second == ["bash scripts/test.sh"]


def test_nothing_installs_jupyter_gpu_from_a_package_index():
    for block in _bash_blocks():
        for line in block:
            command = line.split("#")[0]
            assert not re.search(r"pip install\s+jupyter-gpu\b", command), line
    quick = README[README.index("## Quick start") :]
    assert "python -m pip install ." in quick and "pip wheel" in quick


def test_an_option_the_quick_start_pool_cannot_grant_says_so():
    """Each ``--gpus N`` of whole GPUs the README shows says what the quick start's pool does."""
    for match in re.finditer(r"`--gpus ([2-9]|\d\d+)`", README):
        context = README[match.start() : match.start() + 300]
        assert "--workers" in context and "one GPU per worker" in context, context
