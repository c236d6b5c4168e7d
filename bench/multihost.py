"""A pool across machines: what crossing a machine costs, and how long the Scale button takes
with Slurm.

    python bench/multihost.py            # 512 MiB namespace, 3 rounds; 60 training steps; 3 Slurm scale-ups
    python bench/multihost.py --quick    # 128 MiB, 1 round; 20 steps; 1 scale-up (a smoke run)

Hosts are Linux network, mount and UTS namespaces joined by a bridge
(``tests/system/multihost/hosts.py``, as in the tests): ``pool up`` on one, workers on two (``w1`` with
three virtual GPUs, ``w2`` with one), kernels on a fourth. Needs root, ``ip`` and ``unshare``;
the Slurm part needs Slurm (``apt-get install slurm-wlm munge``, done when missing, as in
tests/system/slurm) and dask-jobqueue.

1. **Restore of a session's variables** (``big``: a float32 tensor of the size asked, plus a small dict) after
   the admin's idle timeout moved them to the host memory (``/dev/shm``) of the worker that ran the session;
   the time is the next ``%%gpu`` cell's, from the kernel (grant, session start, the copy fetched, loaded,
   the cell run). Where the new session lands is arranged with other users' running cells:

   - ``same worker``: the session comes back on its GPU (the copy is renamed into the new session's folder);
   - ``same host``: another worker of the same machine (fetched over that machine's loopback);
   - ``other host``: a worker on the other machine (fetched over the bridge: ``gpu_offload_fetch``, pool key).

2. **2-rank training** (``%%gpu --workers 2``: a 4-layer MLP of 1024 units, DDP on gloo, batch 256 per rank):
   samples/s over both ranks, after 5 warm-up steps, with the ranks on one host (two workers of ``w1``) and on
   two (``w1`` and ``w2``: every step's gradients, 12.6 MiB, cross the bridge).

3. **Scale to a usable Slurm worker**: a ``jupyter-gpu pool up`` owning a SLURMCluster, from ``%gpu scale 1``
   (0 workers) to the end of a ``%%gpu`` cell on the new job's worker, split into sbatch-to-RUNNING (Slurm),
   RUNNING-to-joined (our worker starting) and joined-to-cell-done (the cell's session starting and running).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [
    str(HERE),
    str(HERE.parent),
    str(HERE.parent / "tests"),
    str(HERE.parent / "tests" / "multihost"),
    str(HERE.parent / "tests" / "slurm"),
]

from _common import header, loadavg, log, table

# the pool's idle timeout: an idle session's variables go to host memory after this long
IDLE_TIMEOUT = 3


def _blocker(pool, flag: Path):
    """A kernel whose running cell holds one whole GPU until ``flag`` exists (another user's
    work)."""
    k = pool.kernel()
    msg = k.submit(
        f"%%gpu --gpus 1\nimport os, time\nprint('holding', flush=True)\n"
        f"while not os.path.exists({str(flag)!r}):\n    time.sleep(0.1)"
    )
    k.wait_for_output(msg, "holding", timeout=180)
    return k, msg


def _release(blockers: list, flag: Path) -> None:
    flag.touch()
    for k, msg in blockers:
        k.collect(msg, timeout=60)
        k.stop(now=True)
    flag.unlink()


def _parked(pool, user_kernel) -> bool:
    return any(
        p["kernel"] == user_kernel.kernel_id and p["state"] == "saved"
        for p in pool.snapshot()["in_host_memory"]
    )


def restore_rounds(pool, hosts, mib: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of the restoring cell, per placement (see the module docstring)."""
    flag = hosts.shared / "release"
    times: dict[str, list[float]] = {"same worker": [], "same host": [], "other host": []}
    for r in range(rounds):
        for where, before, after in (
            ("same worker", 0, 0),
            ("same host", 1, 1),
            ("other host", 2, 1),
        ):
            alice = pool.kernel("alice")
            try:
                res = alice.run(
                    f"%%gpu --gpus 1\nimport torch\nbig = torch.ones({mib} * 2**20 // 4)\n"
                    "notes = {'round': 1}\nimport socket\nfirst = socket.gethostname()",
                    timeout=180,
                )
                assert res.error is None, res.error_text
                first_worker = next(
                    ls["worker"] for ls in pool.leases() if ls["kernel"] == alice.kernel_id
                )
                # other users' running cells take the GPUs the session must not come back to
                blockers = [_blocker(pool, flag) for _ in range(before)]
                pool.wait_for(lambda: _parked(pool, alice), 120, "alice's variables in host memory")
                blockers += [_blocker(pool, flag) for _ in range(after)]
                t0 = time.perf_counter()
                res = alice.run(
                    "%%gpu --gpus 1\nimport socket\nprint(first, socket.gethostname(), "
                    "float(big.sum()))",
                    timeout=300,
                )
                took = time.perf_counter() - t0
                assert res.error is None and "Restored" in res.stdout, res.stdout + res.error_text
                was, now, total = res.stdout.splitlines()[-1].split()
                assert float(total) == mib * 2**20 // 4
                worker = next(
                    ls["worker"] for ls in pool.leases() if ls["kernel"] == alice.kernel_id
                )
                landed = (
                    "same worker"
                    if worker == first_worker
                    else "same host"
                    if now == was
                    else "other host"
                )
                assert landed == where, (where, landed, was, now)
                times[where].append(took)
                log(f"round {r + 1}: restore {mib} MiB, {where}: {took:.2f} s")
                _release(blockers, flag)
            finally:
                alice.stop(now=True)
    return times


TRAIN = """%%gpu --workers 2 --gpus 1
import time, torch, jupyter_gpu, socket
from torch.nn.parallel import DistributedDataParallel as DDP
torch.manual_seed(0)
torch.set_num_threads(1)
net = DDP(torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(3)], torch.nn.Linear(1024, 10)))
opt = torch.optim.SGD(net.parameters(), lr=0.01)
x, y = torch.randn(256, 1024), torch.randint(0, 10, (256,))
for step in range({steps}):
    if step == 5:
        t0 = time.perf_counter()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
rate = 2 * 256 * ({steps} - 5) / (time.perf_counter() - t0)
if jupyter_gpu.rank() == 0:
    print('rate', rate)
print('host', socket.gethostname())
"""


def train(pool, hosts, steps: int, spread: bool) -> tuple[float, list[str]]:
    flag = hosts.shared / "release"
    # two of w1's three GPUs taken: the ranks land on w1's third and on w2
    blockers = [_blocker(pool, flag) for _ in range(2)] if spread else []
    k = pool.kernel()
    try:
        res = k.run(TRAIN.format(steps=steps), timeout=600)
        assert res.error is None, res.error_text
        rate = float(res.stdout.split("rate ")[1].split()[0])
        where = sorted(
            {
                line.split("host ")[1].split()[0]
                for line in res.stdout.splitlines()
                if "host " in line
            }
        )
        return rate, where
    finally:
        k.stop(now=True)
        _release(blockers, flag)


def slurm_scale(root: Path, rounds: int) -> list[tuple[float, float, float, float]] | str:
    """(total, sbatch -> RUNNING, RUNNING -> joined, joined -> cell done) per scale-up, or why not
    measured."""
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue is not installed (pip install 'jupyter-gpu[slurm]')"
    from harness import Kernel
    from slurm import LocalSlurm, unavailable
    from slurmpool import slurm_pool

    why = unavailable()
    if why:
        return why
    out = []
    with LocalSlurm(cpus=2) as slurm:
        pool = slurm_pool(root, slurm, interval="0.5s")
        k = Kernel(pool.address)
        try:
            for r in range(rounds):
                t0 = time.perf_counter()
                k.run("%gpu scale 1")
                msg = k.submit("%%gpu --gpus 1\nx = 1")
                running = joined = None
                while joined is None:
                    job = (pool.cluster()["jobs"] or [{}])[0]
                    if running is None and job.get("state") == "RUNNING":
                        running = time.perf_counter() - t0
                    if job.get("workers"):
                        joined = time.perf_counter() - t0
                    time.sleep(0.1)
                res = k.collect(msg, timeout=300)
                total = time.perf_counter() - t0
                assert res.error is None, res.error_text
                running = running if running is not None else joined
                out.append((total, running, joined - running, total - joined))
                log(
                    f"scale-up {r + 1}: a cell done on the new Slurm worker {total:.2f} s after "
                    "%gpu scale 1"
                )
                k.run("%gpu release")
                k.run("%gpu scale 0")
                pool.wait_for(lambda: not pool.cluster()["jobs"], 60, "the job to be cancelled")
        finally:
            k.shutdown(now=True)
            pool.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mib", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-slurm", action="store_true", help="skip the Slurm scale-up")
    args = parser.parse_args(argv)
    mib = args.mib or (128 if args.quick else 512)
    rounds = args.rounds or (1 if args.quick else 3)
    steps = 20 if args.quick else 60
    os.environ.setdefault("JUPYTER_GPU_VIRTUAL_GPUS", "1x16GiB")
    header("multihost", args.quick)

    from hostpool import HostPool
    from hosts import Hosts, missing_tools, sweep_stale

    why = missing_tools()
    if why:
        print(f"skipped: {why}")
        return 0
    sweep_stale()
    with Hosts(["pool", "w1", "w2", "desk"]) as hosts:
        quotas = hosts["pool"].folder / "quotas.yaml"
        quotas.write_text(f"idle-timeout: {IDLE_TIMEOUT}s\nmin-run-time: 0s\n")
        pool = HostPool(
            hosts,
            "pool",
            {"w1": "3x4GiB", "w2": "1x4GiB"},
            "desk",
            scheduler_env={"DASK_JUPYTER_GPU__POOL_CONFIG": str(quotas)},
        )
        try:
            pool.start()
            times = restore_rounds(pool, hosts, mib, rounds)
            rates = {}
            for spread in (False, True):
                results = [train(pool, hosts, steps, spread) for _ in range(rounds)]
                rates[spread] = (statistics.median(r for r, _ in results), results[0][1])
        finally:
            pool.stop()

    rows = [
        [where, f"{statistics.median(ts):.2f}", f"{min(ts):.2f}", len(ts)]
        for where, ts in times.items()
    ]
    base = statistics.median(times["same worker"])
    for row, ts in zip(rows, times.values()):
        row.append(f"{statistics.median(ts) / base:.2f}x")
    table(
        f"Restore of a {mib} MiB namespace moved to host memory (the next %%gpu cell, seconds)",
        ["where the new session lands", "median", "min", "rounds", "vs same worker"],
        rows,
    )
    one, two = rates[False], rates[True]
    table(
        f"2-rank DDP training (gloo, MLP 1024x4, batch 256 per rank, {steps - 5} timed steps)",
        ["ranks on", "hosts", "samples/s (median)", "vs one host"],
        [
            ["one host", ", ".join(one[1]), f"{one[0]:.0f}", "1.00x"],
            ["two hosts", ", ".join(two[1]), f"{two[0]:.0f}", f"{two[0] / one[0]:.2f}x"],
        ],
    )
    if not args.no_slurm:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="jgpu-bench-slurm-") as root:
            scale = slurm_scale(Path(root), 1 if args.quick else 3)
        if isinstance(scale, str):
            print(f"\nScale to a usable Slurm worker: not measured ({scale})")
        else:
            med = [statistics.median(col) for col in zip(*scale)]
            table(
                "From %gpu scale 1 (0 workers) to a %%gpu cell done on the new Slurm job's worker "
                "(seconds)",
                [
                    "total (median)",
                    "sbatch -> RUNNING",
                    "RUNNING -> worker joined",
                    "joined -> cell done",
                    "rounds",
                ],
                [[f"{med[0]:.2f}", f"{med[1]:.2f}", f"{med[2]:.2f}", f"{med[3]:.2f}", len(scale)]],
            )
    print(f"\n   {loadavg()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
