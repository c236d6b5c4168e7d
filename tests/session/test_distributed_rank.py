"""Tearing down the ranks of a ``%%gpu --workers N`` run (``session/distributed_rank.py``), on a real
pool and kernel."""

from __future__ import annotations

import pytest

from tests.support.harness import leases, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.mark.parametrize("last", [0, 1])
def test_no_rank_prints_a_store_error_when_the_run_ends(kernel, pool, last):
    """Bug fixed: after a run ended (a resumed one in the report, where rank 0 happened to finish
    last), about 30 lines of a C++ "TCPStore recvValue failed ... Connection was likely closed"
    stack from rank 1 were printed into the cell: rank 0, which serves the rendezvous store,
    destroyed it while rank 1 still asked it whether everyone had arrived. Here the rank named
    ``last`` finishes its cell a moment after the other."""
    res = kernel.run(
        "%%gpu --workers 2\nimport time, jupyter_gpu, torch.distributed as dist\n"
        "dist.barrier()\n"
        f"if jupyter_gpu.rank() == {last}:\n    time.sleep(1.5)\n"
        "print('rank', jupyter_gpu.rank(), 'done', flush=True)",
        timeout=240,
    )
    assert res.error is None, res.error_text
    assert "rank 0 done" in res.stdout and "rank 1 done" in res.stdout, res.stdout
    text = res.stdout + res.stderr
    assert "TCPStore" not in text and "recvValue" not in text and "frame #" not in text, text
    assert wait_until(lambda: not [ls for ls in leases(pool) if ls["world_size"] == 2], 30)
