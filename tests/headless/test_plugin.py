"""The pytest plugin, driven through ``pytester``: notebooks collected as items, reports, tags,
timeouts, the shared session pool, and ``pytest -n 2`` running notebooks on separate pools."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_notebooks_as_items_with_cell_reports_and_tags(pytester, copy_notebooks):
    copy_notebooks(
        "passing.ipynb",
        "failing_gpu.ipynb",
        "requires_gpu.ipynb",
        "passing.ipynb",
        into=pytester.path,
    )
    (pytester.path / "passing.out.ipynb").write_text(
        "not a notebook: outputs of the runner are not collected"
    )
    result = pytester.runpytest_subprocess("--nbgpu", "-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    out = result.stdout.str()
    assert "\x1b" not in out
    result.stdout.fnmatch_lines(
        [
            "*failing_gpu.ipynb: cell 3 (In [[]3]) raised ZeroDivisionError: integer division or "
            "modulo by zero",
            "*---- cell 3 (In [[]3]) source ----",
            "%%gpu",
            "def steps(n):",
            "*---- remote traceback ----",
            "File <%%gpu cell In[3]>:5",
        ]
    )
    assert "about to divide" in out  # what the failing cell printed, as a report section
    result.stdout.fnmatch_lines(
        ["*SKIPPED*cell 2 is tagged requires-gpu and the pool has no real GPU*"]
    )


def test_not_collected_without_the_option(pytester, copy_notebooks):
    copy_notebooks("failing_gpu.ipynb", into=pytester.path)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes()
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_ini_options_cell_timeout_frees_the_lease_in_the_shared_pool(pytester, copy_notebooks):
    pytester.makeini("[pytest]\nnbgpu = true\nnbgpu_cell_timeout = 5\n")
    copy_notebooks("slow_gpu.ipynb", into=pytester.path)
    # runs after the notebook (files are collected in name order), in the same pytest process and
    # pool
    pytester.makepyfile(
        test_zz_after="""
        import time
        from jupyter_gpu.headless.pool import all_leases, pool_snapshot

        def test_the_shared_pool_holds_nothing(gpu_pool):
            deadline = time.monotonic() + 10
            while True:
                snap = pool_snapshot(gpu_pool)
                if not all_leases(snap) and not snap["queue"]:
                    break
                assert time.monotonic() < deadline, snap
                time.sleep(0.1)
            # the notebook's session was there: it ran, and its lease ended
            assert len(snap["gpus"]) == 2 and all(g["virtual"] for g in snap["gpus"])
    """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*slow_gpu.ipynb: cell 3 (In [[]3]) timed out after 5 s (cell timeout)*"]
    )


def test_xdist_runs_two_notebooks_on_separate_pools(pytester, copy_notebooks):
    pytest.importorskip("xdist")
    copy_notebooks("pool_a.ipynb", "pool_b.ipynb", into=pytester.path)
    result = pytester.runpytest_subprocess(
        "--nbgpu", "-n", "2", "-p", "no:cacheprovider", timeout=240
    )
    result.assert_outcomes(passed=2)
    pool_a, kernel_a = (pytester.path / "pool_a.pool").read_text().split()
    pool_b, kernel_b = (pytester.path / "pool_b.pool").read_text().split()
    assert pool_a != pool_b, "both notebooks ran on one pool"
    assert kernel_a != kernel_b
