"""The handlers' refusal envelope (``common/handlers.py``): what a refusal costs the server that
says it."""

from __future__ import annotations

import asyncio
import logging

from jupyter_gpu.common.handlers import answering_refusals
from jupyter_gpu.common.refusals import NotPossible, from_text


def test_a_refusal_is_answered_without_a_traceback_and_logged_once_in_a_while(caplog):
    """Bug fixed (issue 20: one user's flood of refused calls moved another's cell start by 1.5 s,
    about 6 ms a refusal): every refusal was answered with its traceback, formatted and pickled
    through tblib (which the caller rebuilds by compiling code), and logged on a line of its own.
    The caller still gets the typed refusal with its reason."""

    def refuses(n: int) -> None:
        raise NotPossible(f"queue full ({n})")

    async def refuses_later(n: int) -> None:
        await asyncio.sleep(0)
        refuses(n)

    answer = answering_refusals(refuses, "op_test")
    answer_later = answering_refusals(refuses_later, "op_test_async")
    with caplog.at_level(logging.WARNING, logger="jupyter_gpu.common.handlers"):
        replies = [answer(n) for n in range(50)]
        replies += asyncio.run(_all(answer_later, 50))
    assert all(r["status"] == "uncaught-error" for r in replies)
    assert {r["traceback_text"] for r in replies} == {""}  # (the traceback: a pickled None)
    exc = from_text(replies[-1]["exception_text"])  # as a caller that reads no pickles does
    assert isinstance(exc, NotPossible) and str(exc) == "queue full (49)"
    lines = [r.getMessage() for r in caplog.records if " refused: " in r.getMessage()]
    assert lines == ["op_test refused: queue full (0)", "op_test_async refused: queue full (0)"]


async def _all(answer, n: int) -> list[dict]:
    return list(await asyncio.gather(*(answer(i) for i in range(n))))
