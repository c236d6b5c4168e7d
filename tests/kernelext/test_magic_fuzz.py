"""Fuzzing the magic lines: whatever a user types after ``%%gpu`` or ``%gpu``, the answer is either
a parsed request or a one-paragraph UsageError / GpuPoolError, never an internal traceback.

Bug fixed: 8 of 263 fuzzed lines raised internally (``--gpus nan|inf|1e400``, ``--timeout 1e400``,
``--workers ²``, ``--retries ²``, ``%gpu scale ²``, ``--workers 9e39``).
"""

from __future__ import annotations

import math
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

from jupyter_gpu.errors import GpuPoolError
from jupyter_gpu.kernelext.options import CellOptions, parse_cell_options

OPTIONS = [
    "--gpus",
    "--memory",
    "--workers",
    "--timeout",
    "--priority",
    "--in",
    "--out",
    "--name",
    "--retries",
    "--fresh",
    "--async",
    "--gpu",
    "-g",
    "--",
    "--workers=2",
    "--gpus=0.5",
]
NASTY = [
    "nan",
    "inf",
    "-inf",
    "1e400",
    "9e39",
    "²",
    "９",
    "0",
    "-1",
    "1.5",
    "0.0",
    "1",
    "2",
    "4097",
    "1e-400",
    "99999999999999999999999",
    "0x10",
    "½",
    "'",
    '"',
    "\\",
    "",
    " ",
    "8GiB",
    "nanGB",
    "1e400GiB",
    "-5MB",
    "5min",
    "1e400s",
    "interactive",
    "batch",
    "a,b",
    "a b",
    "1,x",
    "é",
    "\x00",
    "\u202e",
    "%%",
    "--gpus",
]

values = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
)
lines = st.lists(st.one_of(st.sampled_from(OPTIONS), values), max_size=8).map(" ".join)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines)
def test_any_cell_line_parses_or_is_refused_with_a_usage_error(line):
    try:
        opts = parse_cell_options(line)
    except UsageError as exc:
        assert str(exc).startswith("%%gpu"), str(exc)
        return
    assert isinstance(opts, CellOptions)
    spec = opts.spec
    spec.validate()  # what it sends is valid as the broker will check it
    assert opts.timeout is None or (math.isfinite(opts.timeout) and opts.timeout > 0)
    assert 1 <= spec.workers <= 4096 and 0 <= opts.retries <= 100


@pytest.fixture(scope="module")
def magics(tmp_path_factory):
    """The real extension in a real IPython shell, pointed at a pool address where nothing
    listens."""
    from IPython.core.interactiveshell import InteractiveShell

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_GPU_SCHEDULER", f"tcp://127.0.0.1:{dead}")
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "jupyter_gpu")
    yield shell.find_magic("gpu").__self__
    shell.run_line_magic("unload_ext", "jupyter_gpu")
    mp.undo()


COMMANDS = [
    "connect",
    "status",
    "queue",
    "cancel",
    "scale",
    "pull",
    "release",
    "help",
    "bogus",
    "--keep",
    "",
]


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.sampled_from(COMMANDS), st.lists(values, max_size=3))
def test_any_line_magic_is_answered_or_refused_cleanly(magics, command, args):
    line = " ".join([command, *args])
    try:
        magics._line(line)
    except (UsageError, GpuPoolError) as exc:
        assert str(exc).strip(), line


def test_pull_refuses_ipythons_own_names(magics):
    """Bug fixed: ``%gpu pull In`` overwrote the kernel's input history."""
    for name in ("In", "Out", "_", "_i3", "exit", "get_ipython"):
        with pytest.raises(UsageError, match="one of IPython's own names"):
            magics._line(f"pull {name}")
