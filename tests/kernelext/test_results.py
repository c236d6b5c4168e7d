"""The one kernel driver's CellResult: what a notebook saves (outputs) and everything a cell sent
(log)."""

from __future__ import annotations

from jupyter_gpu.headless.kernel import CellResult, KernelCellError, _Recorder


def msg(kind: str, **content) -> dict:
    return {
        "msg_type": kind,
        "header": {"msg_type": kind},
        "parent_header": {"msg_id": "m"},
        "content": content,
    }


def record(*messages: dict) -> CellResult:
    result = CellResult(code="cell")
    recorder = _Recorder(result)
    for m in messages:
        recorder.add(m)
    return result


def test_outputs_are_nbformat_and_the_log_keeps_every_message_in_order():
    res = record(
        msg("stream", name="stdout", text="a"),
        msg("stream", name="stdout", text="b\n"),
        msg("stream", name="stderr", text="warn\n"),
        msg(
            "display_data",
            data={"text/plain": "%%gpu running"},
            metadata={},
            transient={"display_id": "d1"},
        ),
        msg(
            "update_display_data",
            data={"text/plain": "%%gpu done"},
            metadata={},
            transient={"display_id": "d1"},
        ),
        msg("display_data", data={"text/html": "<b>x</b>", "text/plain": "x"}, metadata={}),
        msg("execute_result", data={"text/plain": "42"}, metadata={}, execution_count=3),
    )
    assert [o["output_type"] for o in res.outputs] == [
        "stream",
        "stream",
        "display_data",
        "display_data",
        "execute_result",
    ]
    # consecutive text of one stream is one output, as saved
    assert res.outputs[0]["text"] == "ab\n"
    # the update landed on its display
    assert res.outputs[2]["data"] == {"text/plain": "%%gpu done"}
    assert [o["output_type"] for o in res.log] == [
        "stream",
        "stream",
        "stream",
        "display_data",
        "update_display_data",
        "display_data",
        "execute_result",
    ]
    assert res.stdout == "ab\n" and res.stderr == "warn\n"
    assert res.data() == ["%%gpu running", "%%gpu done", "x", "42"]  # every payload, in order
    assert res.data("text/html") == ["<b>x</b>"]
    assert res.result == "42"
    assert res.text == "ab\nwarn\n%%gpu done\nx\n42\n"
    assert res.error is None and res.error_text == ""


def test_clear_output_clears_what_is_saved_but_not_the_log():
    res = record(
        msg("stream", name="stdout", text="1\n"),
        msg("clear_output", wait=False),
        msg("stream", name="stdout", text="2\n"),
        msg("clear_output", wait=True),
    )
    # wait=True: cleared only when the next output comes
    assert [o["text"] for o in res.outputs] == ["2\n"]
    assert res.stdout == "1\n2\n"
    res = record(
        msg("stream", name="stdout", text="1\n"),
        msg("clear_output", wait=True),
        msg("display_data", data={"text/plain": "p"}, metadata={}),
    )
    assert [o["output_type"] for o in res.outputs] == ["display_data"]
    assert [o["output_type"] for o in res.log] == ["stream", "clear_output", "display_data"]


def test_error_output_and_reply_fields():
    tb = ["\x1b[0;31mZeroDivisionError\x1b[0m", "----> 1 1 / 0"]
    res = record(msg("error", ename="ZeroDivisionError", evalue="division by zero", traceback=tb))
    assert res.error["ename"] == "ZeroDivisionError" and res.error["traceback"] == tb
    assert res.error_text == "ZeroDivisionError\n----> 1 1 / 0"
    assert res.outputs[0]["output_type"] == "error"
    res.status, res.ename, res.evalue, res.traceback = (
        "error",
        "ZeroDivisionError",
        "division by zero",
        "tb",
    )
    err = KernelCellError(res)
    assert "raised ZeroDivisionError: division by zero" in str(err) and "cell" in str(err)
    # a result with no error output (a reply-only result, record=False) still says what failed
    assert CellResult(status="error", traceback="plain tb").error_text == "plain tb"
