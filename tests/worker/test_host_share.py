"""What a worker reports it leaves to sessions (``worker/host_share.py``), the cgroup limits a
lease's booking becomes (``launcher/cgroups.py: session_limits``), and what a session that ended
is told (``worker/session_manager.py: ended_reason``): only what its cgroup counted."""

from __future__ import annotations

import os
import signal

import dask
import psutil
import pytest

from jupyter_gpu.launcher.cgroups import MemoryUse, session_limits
from jupyter_gpu.worker.host_share import left_to_sessions
from jupyter_gpu.worker.session_manager import ended_reason

GiB = 2**30


@pytest.mark.parametrize(
    "memory,cpus,mine,machine",
    [("10%", 0.5, 1, 2), ("2GiB", 0, 1, 1), (0, 1, 3, 4)],
)
def test_a_worker_reports_its_part_of_the_machine_less_what_the_admin_keeps(
    memory, cpus, mine, machine
):
    total, cores = psutil.virtual_memory().total, len(os.sched_getaffinity(0))
    kept = {"10%": total // 10, "2GiB": 2 * GiB, 0: 0}[memory]
    with dask.config.set(
        {"jupyter-gpu.worker.reserved-memory": memory, "jupyter-gpu.worker.reserved-cpus": cpus}
    ):
        share = left_to_sessions(mine, machine)
    assert abs(share.memory - (total - kept) * mine / machine) <= 1
    assert share.cpus == int((cores - cpus) * mine / machine * 1000) / 1000
    # the parts of one machine's workers never add up to more than it leaves
    assert share.memory * machine / mine <= total - kept + machine


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("reserved-memory", "lots", "reserved-memory is 'lots'"),
        ("reserved-memory", "150%", "reserved-memory is '150%'"),
        ("reserved-cpus", 10**6, "below this machine's"),
        ("reserved-cpus", "one", "reserved-cpus is 'one'"),
    ],
)
def test_a_reserve_that_cannot_be_read_is_said_with_the_fix(key, value, needle):
    with dask.config.set({f"jupyter-gpu.worker.{key}": value}):
        with pytest.raises(ValueError, match=needle):
            left_to_sessions(1, 1)


def test_a_booking_becomes_memory_max_high_below_it_and_cpu_max():
    assert session_limits(GiB, 1500, None, 64) == {
        "memory.max": GiB,
        "memory.high": int(GiB * 0.9),
        "cpu.max": 150_000,  # 1.5 cores: 150 ms per 100 ms period
        "pids.max": 64,
    }
    # the admin's cap per session holds under a bigger booking; nothing booked: only the cap
    assert session_limits(4 * GiB, 0, GiB, None)["memory.max"] == GiB
    assert session_limits(0, 0, None, None) == dict.fromkeys(
        ("memory.max", "memory.high", "cpu.max", "pids.max")
    )
    assert session_limits(0, 1, None, None)["cpu.max"] == 1000  # the kernel's smallest quota
    # session.min-cpus: cpu.max never below it; nothing booked (an unbounded machine): no cpu.max
    assert session_limits(0, 250, None, None, min_cpu_milli=1000)["cpu.max"] == 100_000
    assert session_limits(0, 2500, None, None, min_cpu_milli=1000)["cpu.max"] == 250_000
    assert session_limits(0, 0, None, None, min_cpu_milli=1000)["cpu.max"] is None


def test_an_over_use_is_said_only_when_the_sessions_own_cgroup_counted_it():
    over = ended_reason(
        "L7",
        -signal.SIGKILL,
        MemoryUse(peak=310 * 2**20, limit=300 * 2**20, oom_kills=1, limit_hits=4),
    )
    assert "(lease L7) used more host memory than its limit of 300.0 MiB" in over
    assert "its peak was 310.0 MiB" in over and "%%gpu --host-memory 600MiB" in over
    # killed from outside (the machine's OOM killer): never told it went over its own limit
    outside = ended_reason("L8", -signal.SIGKILL, MemoryUse(peak=GiB, limit=2 * GiB, oom_kills=0))
    assert outside.startswith(
        "the session process was killed by SIGKILL from outside it (lease L8)"
    )
    assert "stayed within its own host-memory limit of 2.0 GiB (peak 1.0 GiB)" in outside
    assert "more host memory than its limit" not in outside
    # the machine's OOM killer picked it (counted in its group too) before it reached its limit
    machine = ended_reason("L8", -signal.SIGKILL, MemoryUse(peak=GiB, limit=2 * GiB, oom_kills=1))
    assert "from outside it" in machine and "more host memory than its limit" not in machine
    # no cgroup: nothing was counted, nothing is claimed
    assert ended_reason("L9", -signal.SIGKILL, None) == (
        "the session process was killed by SIGKILL (often the operating system's out-of-memory "
        "killer)"
    )
    assert ended_reason("L9", 3, None) == "the session process exited with code 3"


# a worker in a container or a Slurm job: it reads what its control groups allow, not the machine
REPORT_IN_GROUP = """
import json, sys
sys.stdin.readline()  # joined the group
import dask
from jupyter_gpu.worker.host_share import left_to_sessions
with dask.config.set({"jupyter-gpu.worker.reserved-memory": "10%",
                      "jupyter-gpu.worker.reserved-cpus": 0}):
    print(json.dumps(left_to_sessions(1, 2)._asdict()))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a control group (root)")
def test_a_worker_in_a_limited_cgroup_reports_its_part_of_that_limit_not_of_the_machine():
    """Before: the report came from /proc/meminfo and the affinity only, so a worker in a job
    limited to 3 GiB and 1.5 cores on this machine offered sessions ~10 GiB and ~1 core each."""
    import json
    import subprocess
    import sys

    from jupyter_gpu.launcher.cgroups import Containment

    containment = Containment(tag=f"jupyter-gpu-hostshare-{os.getpid()}")
    group = containment.group("job", {"memory.max": 3 * GiB, "cpu.max": 150_000})
    try:
        if group is None or "cpu.max" not in group.limits or "memory.max" not in group.limits:
            pytest.skip(f"this machine gives no memory and cpu limits ({containment.kind})")
        cores = len(os.sched_getaffinity(0))
        if cores <= 1.5:
            pytest.skip("the limit must be below the machine's cores to show")
        proc = subprocess.Popen(
            [sys.executable, "-c", REPORT_IN_GROUP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        group.add(proc.pid)
        out, _ = proc.communicate("joined\n", timeout=120)
        share = json.loads(out)
        assert share["memory"] == int(3 * GiB * 0.9 / 2), share  # 10 % of the job's 3 GiB kept
        assert share["cpus"] == 0.75, share  # half of the job's 1.5 cores
    finally:
        if group is not None:
            group.kill()
            group.remove()
        containment.close()
