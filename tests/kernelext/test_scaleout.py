"""%%gpu --workers N: real 2-rank runs (gloo on two virtual GPUs)."""

import os
import re
import signal
import time

import pytest

from tests.support.harness import Kernel, leases, snapshot, wait_until, worker_pid

pytestmark = pytest.mark.integration

DDP_CELL = """%%gpu --workers 2 --name ddp-ref
import torch, torch.distributed as dist, jupyter_gpu
from torch.nn.parallel import DistributedDataParallel as DDP
torch.manual_seed(0)
model = DDP(torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
r, n = jupyter_gpu.rank(), jupyter_gpu.world_size()
xs, ys = torch.from_numpy(X[r::n]), torch.from_numpy(Y[r::n])
for step in range(steps):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(xs), ys)
    loss.backward()
    opt.step()
    jupyter_gpu.report(step=step, loss=loss.item())
weights = model.module.weight.detach().clone()
print(f"rank {r} of {n} done")
"""

LOCAL_REFERENCE = """import torch
torch.manual_seed(0)
ref = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(ref.parameters(), lr=0.1)
xs, ys = torch.from_numpy(X), torch.from_numpy(Y)
for step in range(steps):
    opt.zero_grad()
    # the mean of the two ranks' mean losses over equal halves = the full batch's mean loss
    loss = (torch.nn.functional.mse_loss(ref(xs[0::2]), ys[0::2]) + torch.nn.functional.mse_loss(ref(xs[1::2]), ys[1::2])) / 2
    loss.backward()
    opt.step()
print(torch.allclose(ref.weight, weights, atol=1e-5))
"""


def test_two_ranks_train_like_the_local_reference_and_all_ranks_report(kernel, pool):
    kernel.run(
        "import numpy as np\nrng = np.random.default_rng(1)\nX = rng.normal(size=(64, "
        "4)).astype('float32')\n"
        "Y = (X @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype='float32'))\nsteps = 20"
    )
    res = kernel.run(DDP_CELL, timeout=240)
    assert res.error is None, res.error_text
    assert "rank 0 of 2 done" in res.stdout and "[rank 1] rank 1 of 2 done" in res.stdout
    progress = next(d for d in reversed(res.data()) if d.startswith("rank 0:"))
    assert "rank 0: step 19" in progress and "rank 1: step 19" in progress
    assert kernel.run(LOCAL_REFERENCE).stdout == "True\n"
    run = next(r for r in snapshot(pool)["runs"] if r["id"].startswith("ddp-ref"))
    assert set(run["ranks"]) == {"0", "1"} and run["state"] == "done"
    assert len(run["ranks"]["1"]) == 20  # the stream is kept by the broker for the panel
    assert not [ls for ls in leases(pool) if ls["world_size"] == 2]  # every rank's lease is freed
    badge = [d for d in res.data() if d.startswith("%%gpu ")][-1]  # steps, time, per-rank summary
    assert badge.startswith("%%gpu done: 2 ranks in ") and "; rank 0: step 19 · " in badge, badge
    assert "; rank 1: step 19 · " in badge and "loss=" in badge, badge


def test_a_ranks_exception_reaches_the_cell(kernel, pool):
    res = kernel.run(
        "%%gpu --workers 2\nimport jupyter_gpu, torch.distributed as dist\n"
        "if jupyter_gpu.rank() == 1:\n    raise ValueError('rank one broke')\ndist.barrier()",
        timeout=240,
    )
    assert res.error["ename"] == "ValueError" and "rank one broke" in res.error["evalue"]
    assert wait_until(lambda: not [ls for ls in leases(pool) if ls["world_size"] == 2])


def test_interrupt_tears_down_every_rank_and_frees_every_lease(kernel, pool):
    msg = kernel.submit(
        "%%gpu --workers 2\nimport time, jupyter_gpu\nprint('go', flush=True)\ntime.sleep(120)"
    )
    kernel.wait_for_output(msg, "go", timeout=120)
    assert len([ls for ls in leases(pool) if ls["world_size"] == 2]) == 2
    kernel.interrupt()
    res = kernel.collect(msg, timeout=120)
    assert res.error["ename"] == "KeyboardInterrupt"
    assert wait_until(lambda: not [ls for ls in leases(pool) if ls["world_size"] == 2])


def test_lost_worker_resumes_from_the_last_checkpoint(private_pool, tmp_path):

    k = Kernel(private_pool, env={"DASK_JUPYTER_GPU__SCALEOUT__CHECKPOINT_DIR": str(tmp_path)})
    try:
        msg = k.submit(
            "%%gpu --workers 2 --name resume\n"
            "import time, torch, jupyter_gpu, torch.distributed as dist\n"
            "state = jupyter_gpu.restore(default={'step': -1})\n"
            "for step in range(state['step'] + 1, 12):\n"
            "    jupyter_gpu.checkpoint({'step': step})\n"
            "    if jupyter_gpu.rank() == 0:\n"
            "        print(f'step {step}', flush=True)\n"
            "    time.sleep(0.5)\n"
            "    dist.barrier()\n"
            "last = step"
        )
        k.wait_for_output(msg, "step 4", timeout=180)
        rank1 = next(ls for ls in leases(private_pool) if ls["rank"] == 1 and ls["world_size"] == 2)
        os.kill(worker_pid(rank1["worker"]), signal.SIGKILL)
        res = k.collect(msg, timeout=240)
        assert res.error is None, res.stdout + res.stderr + res.error_text
        assert "rank 1's session was lost" in res.stdout and "retry 1 of 2" in res.stdout
        assert "[jupyter-gpu] resumed from step" in res.stdout
        assert k.run("print(last)").stdout == "11\n"
        resumed = int(res.stdout.split("resumed from step ")[1].split()[0])
        assert resumed >= 4
    finally:
        k.shutdown(now=True)


def test_ranks_can_start_dataloader_worker_processes(kernel, pool):
    res = kernel.run(
        "%%gpu --workers 2\nimport torch, jupyter_gpu\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "loader = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=8, num_workers=2)\n"
        "seen = sum(len(b[0]) for b in loader)\n"
        "jupyter_gpu.report(step=0, samples=seen)\n"
        "print(f'rank {jupyter_gpu.rank()} saw {seen}')",
        timeout=240,
    )
    assert res.error is None, res.error_text
    assert "rank 0 saw 64" in res.stdout and "[rank 1] rank 1 saw 64" in res.stdout


RERUN = (
    "%%gpu --workers 2 --name rerun{opts}\n"
    "import jupyter_gpu\n"
    "state = jupyter_gpu.restore(default={{'step': -1}})\n"
    "first = state['step'] + 1\n"
    "for step in range(first, steps):\n"
    "    jupyter_gpu.checkpoint({{'step': step}})\n"
    "    jupyter_gpu.report(step=step, total=steps, loss=1.0 / (step + 1))\n"
)


def test_a_rerun_starts_afresh_and_resuming_is_asked_for_and_announced(pool, tmp_path):
    """Rerunning a --workers cell (new hyperparameters) silently started at the old run's last
    checkpoint: the run id was the same for every run of a cell. Now each run has its own; --resume
    continues the latest run of the cell, and the badge says so. Each run is a run of its own in the
    panel."""
    k = Kernel(pool, env={"DASK_JUPYTER_GPU__SCALEOUT__CHECKPOINT_DIR": str(tmp_path)})
    try:
        k.run("steps = 5")
        assert k.run(RERUN.format(opts=""), timeout=240).error is None
        res = k.run(RERUN.format(opts=""), timeout=240)
        assert res.error is None, res.error_text
        assert k.run("print(first)").stdout == "0\n"  # from scratch, not from step 5
        assert "resumed" not in res.stdout
        badge = [d for d in res.data() if d.startswith("%%gpu ")][-1]
        assert re.match(
            r"%%gpu done: 2 ranks in \d+ s \(waited [\d.]+ s for 2 GPUs\); rank 0: 5/5 steps "
            r"\(100%\) · "
            r"[\d.]+ steps/s · loss=0\.2; rank 1: 5/5 steps",
            badge,
        ), badge
        k.run("steps = 8")
        res = k.run(RERUN.format(opts=" --resume"), timeout=240)
        assert res.error is None, res.error_text
        assert k.run("print(first)").stdout == "5\n"
        assert "[jupyter-gpu] resumed from step 4 (--resume)" in res.stdout
        badges = [d for d in res.data() if d.startswith("%%gpu ")]
        assert all("--resume: continues run rerun-" in b for b in badges if "starting" not in b), (
            badges
        )
        runs = [r for r in snapshot(pool)["runs"] if r["id"].startswith("rerun-")]
        assert len(runs) == 3 and len({r["id"] for r in runs}) == 3
        assert all(r["state"] == "done" and r["ended"] >= r["started"] for r in runs)
        assert runs[-1]["resumes"] == runs[-2]["id"]
    finally:
        k.shutdown(now=True)


def test_a_cell_waiting_behind_a_run_that_reports_progress_gets_a_steady_estimate(private_pool):
    """The queue said 22 -> 27 -> 39 s while one waited: running work was assumed to need as long
    again as it had run. The ranks of a run report step/total to the broker (through their workers);
    a cell queued behind the run gets the run's end as its estimate, which holds still, and says
    what it rests on."""
    a, c = Kernel(private_pool, user="ann"), Kernel(private_pool, user="cid")
    try:
        run = a.submit(
            "%%gpu --workers 2 --name long\nimport time, jupyter_gpu\nfor i in range(40):\n"
            "    time.sleep(0.4)\n    jupyter_gpu.report(step=i, total=40)\nprint('done')"
        )
        assert wait_until(
            lambda: (
                len(
                    [
                        ls
                        for ls in leases(private_pool)
                        if ls["world_size"] == 2 and ls["state"] == "running"
                    ]
                )
                == 2
            ),
            timeout=120,
        )
        waiting = c.submit("%%gpu --gpus 1\nprint('ran')")
        estimates = []
        deadline = time.monotonic() + 60
        while len(estimates) < 4 and time.monotonic() < deadline:
            queued = [q for q in snapshot(private_pool)["queue"] if q["user"] == "cid"]
            if queued and queued[0]["eta_basis"] == "progress":
                estimates.append((time.time(), queued[0]["eta"]))
            time.sleep(1.5)
        assert len(estimates) == 4, estimates
        etas = [eta for _, eta in estimates]
        # it holds still (it grew by seconds each time before)
        assert max(etas) - min(etas) < 5, estimates
        assert all(eta > t for t, eta in estimates) and etas[-1] - estimates[-1][0] < 20, estimates
        res = c.collect(waiting, timeout=120)
        badges = [d for d in res.data() if d.startswith("%%gpu queued")]
        assert any("(from the reported progress)" in b for b in badges), badges
        assert res.stdout == "ran\n"
        assert a.collect(run, timeout=120).error is None
    finally:
        a.shutdown(now=True)
        c.shutdown(now=True)
