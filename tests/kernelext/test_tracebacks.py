"""What a user reads when a ``%%gpu`` cell fails, in a real kernel against a real pool: their own
frames only (their cells with their lines, the libraries they called), never jupyter-gpu's
(``run_cell_magic``, the session's machinery, the virtual GPU's torch hooks); and a value that
stayed in the session says so when it is used here."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.integration


def test_an_interrupted_cell_shows_its_own_frames_not_run_cell_magic(kernel):
    msg = kernel.submit("%%gpu\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    kernel.wait_for_output(msg, "sleeping", timeout=120)
    kernel.interrupt()
    res = kernel.collect(msg, timeout=120)
    text = res.error_text
    assert res.error["ename"] == "KeyboardInterrupt", text
    assert "----> 3 time.sleep(60)" in text, text
    assert "run_cell_magic" not in text and "interactiveshell.py" not in text, text
    assert "jupyter_gpu" not in text and "skipping hidden" not in text, text


def test_torch_errors_on_a_virtual_gpu_and_syntax_errors_show_only_the_users_code(kernel):
    res = kernel.run(
        "%%gpu\nimport torch, jupyter_gpu\nt = torch.ones(3).to(jupyter_gpu.device())\n"
        "t @ torch.ones(4)"
    )
    text = res.error_text
    assert res.error["ename"] == "RuntimeError" and "----> 3 t @ torch.ones(4)" in text, text
    assert "virtual_device.py" not in text and "__torch_function__" not in text, text
    # a syntax error: the cell's line and a caret, as IPython shows one locally
    res = kernel.run("%%gpu\nx = 1\ny = (x +\n")
    text = res.error_text
    assert res.error["ename"] == "SyntaxError" and "y = (x +" in text and "^" in text, text
    assert "None" not in res.error["evalue"] and "interactiveshell" not in text, text


def test_a_function_from_an_earlier_plain_cell_shows_its_lines(kernel):
    """The function starts after a class in its cell (the cell's first block ends with the class):
    its frame shows its own lines (IPython 9 read them from the cell's first line and showed none;
    tests/session/test_tracebacks.py fails that way on IPython 8 too)."""
    cell = (
        "import os\n\nclass Toy:\n    pass\n\n\n"
        "def demo_basic(rank):\n    a = rank + 1\n    b = a * 2\n    return b / 0\n"
    )
    assert kernel.run(cell).error is None
    res = kernel.run("%%gpu\ndemo_basic(0)")
    text = res.error_text
    assert re.search(r"-+> 10\s+return b / 0", text) and re.search(r"9\s+b = a \* 2", text), text
    assert "----> 1 demo_basic(0)" in text, text


def test_a_remote_value_used_as_a_local_one_says_how_to_get_it(kernel):
    res = kernel.run(
        "%%gpu\nimport torch, jupyter_gpu\nx = torch.linspace(0, 1, 5)\n"
        "y_pred = (x * 2).to(jupyter_gpu.device())"
    )
    assert res.error is None, res.error_text
    res = kernel.run("import matplotlib.pyplot as plt\nplt.plot(x, y_pred.detach())")
    evalue = res.error["evalue"]
    assert res.error["ename"] == "RemoteAttributeError", res.error_text
    assert "\n" not in evalue and "y_pred" in evalue and "stayed in your GPU session" in evalue
    assert "`%gpu pull y_pred`" in evalue and "`%%gpu --out y_pred`" in evalue, evalue
    # the user's line, and the library code it called: none of jupyter-gpu's frames
    assert "----> 2 plt.plot(x, y_pred.detach())" in res.error_text, res.error_text
    assert "remote_value.py" not in res.error_text, res.error_text
    for use in ("y_pred + 1", "len(y_pred)", "import numpy as np; np.asarray(y_pred)"):
        res = kernel.run(use)
        assert "`%gpu pull y_pred`" in res.error["evalue"], (use, res.error_text)
        assert "remote_value.py" not in res.error_text and "jupyter_gpu/" not in res.error_text
    # the remedy it names works
    assert kernel.run("%gpu pull y_pred").error is None
    assert kernel.run("print(float(y_pred.detach().sum()))").stdout == "5.0\n"
