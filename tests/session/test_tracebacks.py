"""Remote tracebacks rebuilt in the kernel (kernelext/rendering.py) show the cell's own lines, with
the IPython this machine has (8 here, 9 in a fresh environment)."""

from __future__ import annotations

import linecache
import re

from IPython.core.ultratb import VerboseTB
from tblib import Traceback

from jupyter_gpu.kernelext.rendering import traceback_from_dict


def _cell(name: str, source: str) -> None:
    linecache.cache[name] = (len(source), None, source.splitlines(keepends=True), name)


def _remote() -> dict:
    """A traceback as the session sends it (tblib's dict of a real one), through two cells' code."""
    a, b = "def helper(a):\n    b = a + 1\n    return b / 0\n", "x = 1\nz = helper(3)\n"
    _cell("<cell-a>", a)
    _cell("<cell-b>", b)
    ns: dict = {}
    exec(compile(a, "<cell-a>", "exec"), ns)
    try:
        exec(compile(b, "<cell-b>", "exec"), ns)
    except ZeroDivisionError as exc:
        return Traceback(exc.__traceback__.tb_next).as_dict()  # from the cell's own frame on
    raise AssertionError("the cell did not fail")


def test_each_frame_keeps_its_file_function_and_line():
    tb = traceback_from_dict(_remote())
    frames = []
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_name, tb.tb_lineno))
        # the frame's code starts at line 1, as a real module's does (IPython 9 reads source from
        # there)
        assert tb.tb_frame.f_code.co_firstlineno == 1
        tb = tb.tb_next
    assert frames == [("<cell-b>", "<module>", 2), ("<cell-a>", "helper", 3)]


def test_ipython_shows_the_failing_line_of_a_function_from_another_cell():
    tb = traceback_from_dict(_remote())
    exc = ZeroDivisionError("division by zero").with_traceback(tb)
    text = re.sub(
        r"\x1b\[[0-9;]*m",
        "",
        "\n".join(VerboseTB().structured_traceback(ZeroDivisionError, exc, tb, tb_offset=0)),
    )
    assert "----> 3     return b / 0" in text and "----> 2 z = helper(3)" in text, text
    assert "      1 def helper(a):" in text, text
