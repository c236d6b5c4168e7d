"""Which rank's error a failed --workers cell shows (the rest is tested with real ranks in
tests/kernelext/test_scaleout.py)."""

from jupyter_gpu.kernelext.scaleout import first_failure


def test_the_rank_that_failed_first_is_named_whatever_order_the_replies_came_in():
    """Bug fixed (a flaky CI run): rank 1 raised, tore its process group down, and rank 0's barrier
    error ("connection closed by peer") reached the kernel first, so the cell showed RuntimeError,
    not the ValueError that caused it."""
    errors = {  # in arrival order
        0: {"status": "error", "finished": 1000.30, "error": {"type": "builtins.RuntimeError"}},
        1: {"status": "error", "finished": 1000.01, "error": {"type": "builtins.ValueError"}},
    }
    assert first_failure(errors)[0] == 1
    # replies without the time (an older session) fall back to arrival order
    assert first_failure({2: {"status": "error"}, 0: {"status": "error"}})[0] == 2
