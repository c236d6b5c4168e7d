"""Sessions forked from each worker's zygote (session/zygote.py, worker/forkserver.py), in a real
pool."""

import os
import signal

import pytest

from tests.support.harness import Kernel, session_starters, wait_until

pytestmark = pytest.mark.integration

DRAW = (
    "%%gpu --fresh\nimport os, random, numpy, torch\n"
    "print(os.getppid(), random.random(), numpy.random.rand(), torch.rand(1).item())"
)


def test_sessions_are_forks_of_the_zygote_and_draw_their_own_random_numbers(pool):
    assert wait_until(lambda: all(s["ready"] for s in session_starters(pool).values()), timeout=120)
    zygotes = {s["pid"] for s in session_starters(pool).values()}
    assert all(s["kind"] == "fork" for s in session_starters(pool).values())
    a, b = Kernel(pool), Kernel(pool)
    try:
        draws = []
        for k in (a, b, a):
            res = k.run(DRAW)
            assert res.error is None, res.error_text
            parent, *numbers = res.stdout.split()
            assert int(parent) in zygotes, "a session's parent is its worker's zygote"
            draws.append(tuple(numbers))
        # a fork copies the zygote's generators: each session must have reseeded Python's, NumPy's,
        # torch's
        for i in range(3):
            assert len({d[i] for d in draws}) == 3, (
                f"generator {i} repeats across sessions: {draws}"
            )
    finally:
        a.shutdown(now=True)
        b.shutdown(now=True)


def test_a_zygote_that_dies_is_replaced_at_the_next_start(private_pool):
    assert wait_until(
        lambda: all(s["ready"] for s in session_starters(private_pool).values()), timeout=120
    )
    before = {w: s["pid"] for w, s in session_starters(private_pool).items()}
    k = Kernel(private_pool)
    try:
        for pid in before.values():
            os.kill(pid, signal.SIGKILL)
        res = k.run(DRAW)  # the worker sees its zygote gone and starts another for this session
        assert res.error is None, res.error_text
        after = {w: s["pid"] for w, s in session_starters(private_pool).items()}
        parent = int(res.stdout.split()[0])
        assert parent in after.values() and parent not in before.values()
    finally:
        k.shutdown(now=True)
