"""The Scale button and ``%gpu scale`` behind a real Slurm: a ``jupyter-gpu pool up`` that owns
dask-jobqueue's ``SLURMCluster`` submits and cancels real jobs (``sbatch``/``scancel`` on a
one-node cluster started by the test), each job runs our GPU worker (virtual GPUs), and what
Slurm says about them (``squeue``) is what the panel and the queue show. The pool is a shared one
(tokens checked, Dask's generic API closed), as a team's pool on a Slurm cluster would be: its
cluster object works through the scheduler's in-process comm.

- scale up from 0 to 2 GPU workers, a cell on each job; a third job waits for CPUs (``PENDING
  (Resources)``) and a waiting request says so; scale down to 0 while one kernel holds a session: the
  other jobs are cancelled at once, that one only when its session is gone, and the session keeps its
  variables meanwhile;
- adaptive scaling (0..1): a waiting cell gets a job submitted for it; the job stays while its worker holds
  the session, idle between cells, and then only its variables in host memory; it is cancelled once the
  kernel is gone and the idle period has passed;
- a job killed by Slurm at its walltime is a lost worker: the cell says which job ended and why
  (``TIMEOUT (TimeLimit)``), the panel lists it, and the pool submits a replacement.
"""

from __future__ import annotations

import time

import pytest

from tests.broker.test_fair_pool import connected_client
from tests.support.harness import wait_until
from tests.system.slurm.slurmpool import slurm_pool

# the first test's setup may install Slurm (apt-get) and starts it: more than the default 300 s on a
# cold CI
pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

# the admin's idle timeout moves an idle session's variables to host memory on its worker
QUOTAS = "idle-timeout: 6s\nmin-run-time: 0s\n"
USERS = ("alice", "bob", "carol", "admin")
# adaptive scaling retires a job whose workers held nothing for this long (and not sooner)
IDLE = 3.0


@pytest.fixture(scope="module")
def spool(slurm, tmp_path_factory):
    pool = slurm_pool(
        tmp_path_factory.mktemp("slurm-pool"),
        slurm,
        quotas=QUOTAS,
        users=USERS,
        idle=f"{IDLE}s",
        cooldown=f"{IDLE}s",
    )
    try:
        yield pool
    finally:
        pool.stop()
        assert wait_until(lambda: not slurm.live_jobs(), 30), (
            f"jobs left after the pool stopped: {slurm.jobs()}"
        )


@pytest.fixture()
def kernels():
    made = []
    yield made
    for k in made:
        k.shutdown(now=True)


def job_ids(spool) -> list[str]:
    return [j["job_id"] for j in spool.cluster()["jobs"]]


def state_of(slurm, job_id: str) -> str:
    return slurm.jobs().get(job_id, ("GONE", ""))[0]


def test_scale_up_from_zero_to_two_workers_and_down_without_losing_a_session(spool, slurm, kernels):
    assert spool.snapshot()["pool"]["workers"] == 0 and not spool.cluster()["jobs"]
    a, b = spool.kernel("alice"), spool.kernel("bob")
    kernels += [a, b]
    scaled = time.monotonic()
    res = a.run("%gpu scale 2")
    assert res.error is None and "The pool now has 2 worker(s)" in res.stdout, (
        res.stdout + res.error_text
    )
    first = job_ids(spool)
    assert len(first) == 2 and all(first), spool.cluster()
    assert set(first) <= set(slurm.jobs())  # real Slurm jobs, submitted with sbatch
    spool.wait_for(
        lambda: len(spool.snapshot()["gpus"]) == 2, 120, "two GPU workers from two Slurm jobs"
    )
    ran_a = a.run("%%gpu --gpus 1\nimport os\nx = 40\nprint('job', os.environ.get('SLURM_JOB_ID'))")
    usable = time.monotonic() - scaled
    ran_b = b.run("%%gpu --gpus 1\nimport os\nprint('job', os.environ.get('SLURM_JOB_ID'))")
    assert ran_a.error is None and ran_b.error is None, ran_a.error_text + ran_b.error_text
    ran_on = {ran_a.stdout.split()[-1], ran_b.stdout.split()[-1]}
    assert ran_on == set(first), (ran_on, first)  # a cell on each job
    print(f"from %gpu scale 2 to a cell done on a new Slurm job: {usable:.1f} s")

    # a third job waits for CPUs: Slurm's state and reason in the panel, and in a waiting request's
    # reason
    a.run("%gpu scale 3")
    third = next(j for j in job_ids(spool) if j not in first)
    spool.wait_for(
        lambda: any(
            j["job_id"] == third and j["state"] == "PENDING" and j["reason"] == "Resources"
            for j in spool.cluster()["jobs"]
        ),
        30,
        "the third job to be PENDING (Resources)",
    )
    # a shared pool takes requests of kernels connected to it (issue 20): carol's Dask client
    with connected_client(spool.address) as client:
        waiting = spool.call(
            "gpu_request", user="carol", kernel="k-carol", spec={"gpus": 1}, client=client.id
        )
        try:
            assert waiting["state"] == "queued", waiting
            status = spool.call("gpu_wait", id=waiting["id"], timeout=0.1, user="carol")
            assert f"waiting for a new worker (job {third} pending)" in status["reason"], status
            assert "Slurm: PENDING (Resources)" in status["reason"], status
            queue = spool.snapshot()["queue"]
            assert f"(job {third} pending)" in queue[0]["reason"], queue
        finally:
            spool.call("gpu_cancel", id=waiting["id"], user="carol")

    # down to 0 while a holds its session: the others go at once, a's job when a holds nothing there
    held = next(
        ls["worker"]
        for g in spool.snapshot()["gpus"]
        for ls in g["leases"]
        if ls["kernel"] == a.kernel_id
    )
    b.run("%gpu release")
    res = a.run("%gpu scale 0")
    assert "The pool now has 0 worker(s)" in res.stdout and "hold a session" in res.stdout, (
        res.stdout
    )
    a_job = next(j["job_id"] for j in spool.cluster()["jobs"] if j["workers"])
    assert wait_until(
        lambda: all(state_of(slurm, j) == "CANCELLED" for j in [*first, third] if j != a_job), 30
    ), slurm.jobs()
    assert state_of(slurm, a_job) == "RUNNING"
    assert [g["worker"] for g in spool.snapshot()["gpus"]] == [held]
    # no session lost (the idle timeout may have moved it to host memory)
    res = a.run("%%gpu\nprint(x + 2)")
    assert res.error is None and res.stdout == "42\n", res.stdout + res.error_text
    a.shutdown(now=True)  # its lease ends with its kernel: now nothing holds the job
    spool.wait_for(
        lambda: state_of(slurm, a_job) == "CANCELLED", 30, f"job {a_job} to be cancelled"
    )
    spool.wait_for(
        lambda: not spool.snapshot()["gpus"] and not spool.cluster()["jobs"], 30, "an empty pool"
    )


def test_adaptive_scaling_submits_a_job_for_a_waiting_cell_and_keeps_it_while_it_holds_anything(
    spool, slurm, kernels
):
    reply = spool.call("gpu_scale", minimum=0, maximum=1, user="admin")
    assert reply["adaptive"] == {"minimum": 0, "maximum": 1}, reply
    k = spool.kernel("alice")
    kernels.append(k)
    msg = k.submit(
        "%%gpu --gpus 1\nimport os, torch\nw = torch.ones(4)\nprint('on job', "
        "os.environ['SLURM_JOB_ID'])"
    )
    spool.wait_for(
        lambda: any(
            "waiting for a new worker (job " in q["reason"] for q in spool.snapshot()["queue"]
        ),
        30,
        "the waiting cell's reason to name the job submitted for it",
    )
    res = k.collect(msg, timeout=120)
    assert res.error is None, res.error_text
    job = res.stdout.split()[-1]
    assert job_ids(spool) == [job] and state_of(slurm, job) == "RUNNING"

    # idle between cells, then only its variables in host memory (the idle timeout): the job stays
    spool.wait_for(
        lambda: spool.snapshot()["in_host_memory"], 30, "the idle session to move to host memory"
    )
    time.sleep(2 * IDLE + 1)
    assert state_of(slurm, job) == "RUNNING" and job_ids(spool) == [job]
    res = k.run("%%gpu --gpus 1\nprint(float(w.sum()))")  # the variables come back from that worker
    assert res.error is None and res.stdout.endswith("4.0\n"), res.stdout + res.error_text

    # the kernel goes: nothing is held any more, and after the idle period the job is cancelled
    k.shutdown(now=True)
    spool.wait_for(lambda: state_of(slurm, job) == "CANCELLED", 30, f"job {job} to be cancelled")
    assert not spool.cluster()["jobs"]
    spool.call("gpu_scale", n=0, user="admin")


def test_a_job_killed_at_its_walltime_is_a_lost_worker_and_is_replaced(spool, slurm, kernels):
    spool.call("gpu_scale", n=1, user="admin")
    spool.wait_for(lambda: len(spool.snapshot()["gpus"]) == 1, 120, "a GPU worker from a Slurm job")
    (job,) = job_ids(spool)
    k = spool.kernel("bob")
    kernels.append(k)
    msg = k.submit("%%gpu --gpus 1\nimport time\nprint('training', flush=True)\ntime.sleep(600)")
    k.wait_for_output(msg, "training", timeout=60)
    # Slurm's walltime, brought forward: the job's end time is now, and slurmctld's time-limit check
    # (about every 30 s) kills it as it would at the end of its walltime (state TIMEOUT, reason
    # TimeLimit)
    slurm.run("scontrol", "update", f"JobId={job}", "EndTime=now")
    res = k.collect(msg, timeout=150)
    assert res.error is not None, res.stdout
    text = res.error_text
    assert "was lost" in text and f"Slurm job {job}" in text, text
    spool.wait_for(
        lambda: any(
            e["job_id"] == job and e["state"] == "TIMEOUT" and e["reason"] == "TimeLimit"
            for e in spool.cluster()["ended"]
        ),
        60,
        "the panel to list the job as TIMEOUT",
    )
    assert state_of(slurm, job) == "TIMEOUT"
    # the pool keeps 1 worker: a new job replaces it, and the next cell runs there
    spool.wait_for(
        lambda: len(spool.snapshot()["gpus"]) == 1 and job not in job_ids(spool),
        120,
        "a replacement job's worker",
    )
    res = k.run("%%gpu --gpus 1\nimport os\nprint(os.environ['SLURM_JOB_ID'])")
    assert res.error is None and res.stdout.strip() not in ("", job), res.stdout + res.error_text
    spool.call("gpu_scale", n=0, user="admin")
