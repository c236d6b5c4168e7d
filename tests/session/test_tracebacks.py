"""Remote tracebacks rebuilt in the kernel (kernelext/rendering.py) show the cell's own lines, with
the IPython this machine has (8 here, 9 in a fresh environment)."""

from __future__ import annotations

import linecache
import re

from IPython.core.ultratb import VerboseTB
from tblib import Traceback

from jupyter_gpu.kernelext.rendering import traceback_from_dict
from jupyter_gpu.session.tracebacks import error_payload, frames_dict, user_frames


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


# an earlier cell: a function after a class (the block read from the cell's first line ends with
# the class)
EARLIER_CELL = (
    "import os\n\nclass Toy:\n    pass\n\n\n"
    "def helper(a):\n    b = a + 1\n    c = b * 2\n    return c / 0\n"
)


def test_a_function_of_an_earlier_cell_reads_from_its_own_first_line():
    """IPython reads a frame's source from its code's first line (IPython 9 for every cell, whose
    file is not on disk; IPython 8 when a frame's file is long). The stub of a function that starts
    on line 7 of its cell started on line 1, so ``Cell In[3], line 10`` showed nothing under it."""
    import inspect

    a = EARLIER_CELL
    _cell("<cell-c>", a)
    _cell("<cell-d>", "z = helper(3)\n")
    ns: dict = {}
    exec(compile(a, "<cell-c>", "exec"), ns)
    try:
        exec(compile("z = helper(3)\n", "<cell-d>", "exec"), ns)
    except ZeroDivisionError as exc:
        kept, _ = user_frames(exc.__traceback__, "<cell-d>")
        tb = traceback_from_dict(frames_dict(kept))
    frame = tb.tb_next.tb_frame
    lines, first = inspect.getsourcelines(frame)
    assert first == 7 and lines[0].startswith("def helper") and "return c / 0" in lines[-1]
    assert (frame.f_code.co_name, frame.f_lineno) == ("helper", 10)


def test_ipython_shows_the_lines_of_an_earlier_cell_also_on_its_fast_path(tmp_path):
    """IPython 8 formats every frame from its code's first line when the innermost frame's file is
    over 10,000 lines (as IPython 9 does for every frame whose file is not on disk)."""
    long_module = tmp_path / "long_module.py"
    long_module.write_text("x = 1\n" * 10_001)
    a = EARLIER_CELL
    _cell("<cell-e>", a)
    remote = {
        "tb_frame": {
            "f_code": {"co_filename": "<cell-e>", "co_name": "helper", "co_firstlineno": 7}
        },
        "tb_lineno": 10,
        "tb_next": {
            "tb_frame": {"f_code": {"co_filename": str(long_module), "co_name": "<module>"}},
            "tb_lineno": 3,
            "tb_next": None,
        },
    }
    tb = traceback_from_dict(remote)
    text = re.sub(
        r"\x1b\[[0-9;]*m",
        "",
        "\n".join(VerboseTB().structured_traceback(ZeroDivisionError, ZeroDivisionError(), tb, 0)),
    )
    assert re.search(r"-+> 10     return c / 0", text) and "9     c = b * 2" in text, text


def test_the_users_frames_leave_out_jupyter_gpus_own():
    """What a cell called of jupyter-gpu (the virtual GPU's torch hooks, report()) is not the
    user's code: the traceback ends at the cell's line that called it, as a library frame marked
    ``__tracebackhide__`` would locally."""
    from jupyter_gpu.common.units import parse_size

    code = "size = parse_size('lots')\n"
    try:
        exec(compile(code, "<cell-f>", "exec"), {"parse_size": parse_size})
    except ValueError as exc:
        payload = error_payload(exc, "<cell-f>")
    names = []
    node = payload["traceback"]
    while node:
        names.append(node["tb_frame"]["f_code"]["co_filename"])
        node = node["tb_next"]
    assert names == ["<cell-f>"], names
    assert "units.py" in payload["text"]  # the whole traceback is kept as text (and in the log)


def test_a_syntax_error_keeps_its_message_and_line_through_tblibs_reducers():
    """distributed installs tblib's exception reducers, which rebuilt a SyntaxError without its
    message: the kernel showed ``SyntaxError: None``."""
    import pickle

    import distributed  # noqa: F401 - installs tblib's reducers, as in every session

    try:
        compile("x = (1\n", "<cell-g>", "exec")
    except SyntaxError as exc:
        payload = error_payload(exc, "<cell-g>")
    rebuilt = pickle.loads(payload["pickled"])
    assert type(rebuilt) is SyntaxError and rebuilt.msg and rebuilt.text == "x = (1\n"
    assert (rebuilt.filename, rebuilt.lineno) == ("<cell-g>", 1)
