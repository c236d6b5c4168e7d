"""The first ``%%gpu`` cell of a new kernel, against a running pool whose pre-warmed spare
sessions exist.

    python bench/first_cell.py           # 5 kernels in sequence, then 8 at once quiet and loaded
    python bench/first_cell.py --quick   # 2 kernels, 4 at once: a smoke run (about 1 minute)
    python bench/first_cell.py --kernels 0 --rounds 3   # only the bursts, 3 of each

Reported, per kernel (each a new jupyter_client KernelManager kernel pointed at the pool with
JUPYTER_GPU_SCHEDULER; before each, the benchmark waits until every worker holds a spare session
again):

  kernel start      start_kernel .. wait_for_ready (not ours; for scale)
  %load_ext         ``%load_ext jupyter_gpu`` from execute to idle
  first %%gpu       ``%%gpu\\npass`` from execute to idle: connect to the scheduler, lease request and grant,
                    hand the spare session its lease, run the cell (what the 1 s target is about)
  second %%gpu      the next ``%%gpu\\npass`` in the same kernel: the warm anchor for the ratio

and once: the pool's start time (ensure_embedded_pool until it is advertised) and how long after
that the spare sessions were ready (they import torch, so this is most of a cold start).

Then bursts (issue 24 item 3): ``--at-once`` real kernels (8; each with ``%load_ext`` done and idle)
send their first ``%%gpu`` cell at the same moment, ``--rounds`` times quiet and as many times loaded
(a CPU hog on every core, ``stress-ng --cpu <cores>`` or a Python busy loop per core, started by the
benchmark once the kernels are ready and stopped after the burst). Reported: p50/p95/max of the cells'
execute-to-idle times, and the CPU-seconds (user + system, ``psutil``) each process spent during the
burst, per first cell, split by process: the kernels, the pool process (Dask scheduler with the
broker, and the nannies), the workers, the zygotes and the sessions (new forks counted whole; a
process that ended is counted through its parent's reaped-children times). The hog's CPU is not
counted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    DEFAULT_VIRTUAL,
    Pool,
    check,
    header,
    loadavg,
    log,
    ms,
    run_at_once,
    set_virtual,
    start_kernel,
    summary,
    table,
)

FIRST = "%%gpu\npass"
PARTS = ("kernel", "pool (scheduler, broker, nannies)", "worker", "zygote", "session")


def pool_processes(pool_pid: int) -> dict[int, str]:
    """The pool's processes by pid: which part each is (see PARTS); helpers such as Dask's resource
    tracker count with the pool process."""
    import psutil

    parts: dict[int, str] = {pool_pid: PARTS[1]}
    root = psutil.Process(pool_pid)
    for child in root.children():
        try:
            is_worker = "spawn_main" in " ".join(child.cmdline())
        except psutil.Error:
            continue
        parts[child.pid] = PARTS[2] if is_worker else PARTS[1]
        if not is_worker:
            continue
        for grand in child.children():
            try:
                cmd = " ".join(grand.cmdline())
            except psutil.Error:
                continue
            if "session.zygote" in cmd or "zygote" in cmd:
                parts[grand.pid] = PARTS[3]
                for s in grand.children(recursive=True):
                    parts[s.pid] = PARTS[4]
            else:
                parts[grand.pid] = PARTS[4]
                for s in grand.children(recursive=True):
                    parts[s.pid] = PARTS[4]
    return parts


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its reaped children so far (0 if it is gone)."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system + t.children_user + t.children_system


def cpu_snapshot(pool_pid: int, kernel_pids: list[int]) -> dict[int, tuple[str, float]]:
    parts = pool_processes(pool_pid)
    parts.update({pid: PARTS[0] for pid in kernel_pids})
    return {pid: (part, cpu_seconds(pid)) for pid, part in parts.items()}


def cpu_by_part(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between the snapshots, by part; a process new in ``after`` counts whole
    (a session forked during the burst starts at 0)."""
    out = dict.fromkeys(PARTS, 0.0)
    for pid, (part, secs) in after.items():
        out[part] += secs - before.get(pid, (part, 0.0))[1]
    return out


@contextlib.contextmanager
def cpu_hog(on: bool) -> Iterator[str]:
    """A busy loop on every core while inside (``stress-ng --cpu N`` if installed), or nothing."""
    if not on:
        yield "none"
        return
    cores = os.cpu_count() or 1
    if shutil.which("stress-ng"):
        procs = [
            subprocess.Popen(
                ["stress-ng", "--cpu", str(cores), "--quiet"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        ]
        what = f"stress-ng --cpu {cores}"
    else:
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
        what = f"{cores} Python busy loops"
    try:
        time.sleep(0.5)  # let the hog reach every core
        yield what
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def burst(pool: Pool, pool_pid: int, n: int, loaded: bool, env: dict[str, str]) -> dict:
    """``n`` kernels (``%load_ext`` done) send their first ``%%gpu`` cell at once; the cells'
    seconds, failures, and the CPU seconds by part during the burst."""
    pool.wait_idle(timeout=120)
    pool.wait_spares(timeout=300)
    kernels = []
    try:
        for i in range(n):
            kernels.append(start_kernel(pool.address, user=f"j5d-student{i}", env=env))
        for k in kernels:
            check(k, "%load_ext jupyter_gpu")
        pids = [k.km.provisioner.process.pid for k in kernels]
        with cpu_hog(loaded):
            before = cpu_snapshot(pool_pid, pids)
            results = run_at_once(kernels, FIRST)
            after = cpu_snapshot(pool_pid, pids)
    finally:
        for k in kernels:
            k.shutdown(now=True)
        settle(pool_pid)
    times = [r.elapsed for r in results if r is not None and r.status == "ok"]
    return {"times": times, "failed": n - len(times), "cpu": cpu_by_part(before, after)}


def settle(pool_pid: int, timeout: float = 120.0) -> None:
    """Wait until the pool's sessions of the kernels that just ended have exited (their ending,
    standby copies included, would otherwise fall into the next burst, on this pool or another)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if PARTS[4] not in pool_processes(pool_pid).values():
            break
        time.sleep(0.2)
    time.sleep(1.0)


@contextlib.contextmanager
def code_from(tree: str | None) -> Iterator[dict[str, str]]:
    """Processes started inside (the pool, its workers and sessions, kernels) run the package in
    ``tree`` (None: this one's): ``PYTHONPATH`` set and the working folder ``tree`` while inside
    (``python -m`` puts the working folder first on the path); yields the kernels' extra
    environment."""
    if tree is None:
        yield {}
        return
    tree = os.path.abspath(tree)
    saved, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
    os.environ["PYTHONPATH"] = tree
    os.chdir(tree)
    try:
        yield {"PYTHONPATH": tree}
    finally:
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def bursts(
    pools: dict[str, tuple[Pool, str | None]], n: int, rounds: int
) -> dict[tuple[str, str], list[dict]]:
    """Quiet and loaded bursts on each pool (its code tree), interleaved (round by round: each
    pool quiet, then loaded; the pools' order alternating) so that drift in the machine's other
    load falls on all of them."""
    import json

    out: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        # each round in the other order (ABBA...): what one pool leaves behind falls on both
        order = list(pools.items()) if r % 2 == 0 else list(reversed(pools.items()))
        for code, (pool, tree) in order:
            with open(pool.path) as f:
                pool_pid = json.load(f)["pid"]
            for cond in ("quiet", "loaded"):
                with code_from(tree) as env:
                    res = burst(pool, pool_pid, n, cond == "loaded", env)
                out.setdefault((code, cond), []).append(res)
                s = summary(res["times"])
                log(
                    f"burst {r + 1}/{rounds} {code} {cond}: p50 {s['p50'] * 1e3:.0f} ms, p95 "
                    f"{s['p95'] * 1e3:.0f} ms, {res['failed']} failed, "
                    f"{sum(res['cpu'].values()) / n:.3f} CPU-s per first cell"
                )
    return out


def report_bursts(out: dict[tuple[str, str], list[dict]], n: int) -> bool:
    """Print the burst tables; whether the target (p95 < 1 s loaded, none failed) is met by the
    code of this tree ("after")."""
    rows = []
    for (code, cond), results in out.items():
        times = [t for res in results for t in res["times"]]
        failed = sum(res["failed"] for res in results)
        s = summary(times)
        rows.append(
            [
                code,
                cond,
                len(results),
                s["n"],
                failed,
                ms(s["p50"]),
                ms(s["p95"]),
                ms(max(times, default=float("nan"))),
            ]
        )
    table(
        f"First %%gpu cell, {n} kernels at once (ms, execute to idle; all rounds pooled)",
        ["code", "load", "rounds", "cells ok", "failed", "p50", "p95", "max"],
        rows,
    )
    keys = list(out)
    cpu_rows = []
    for part in (*PARTS, "total"):
        row = [part]
        for key in keys:
            cells = n * len(out[key])
            if part == "total":
                secs = sum(sum(res["cpu"].values()) for res in out[key])
            else:
                secs = sum(res["cpu"][part] for res in out[key])
            row.append(f"{secs / cells:.3f}")
        cpu_rows.append(row)
    table(
        f"CPU-seconds per first cell by process ({n} at once; user + system)",
        ["process", *(f"{code} {cond}" for code, cond in keys)],
        cpu_rows,
    )
    loaded = [t for res in out.get(("after", "loaded"), []) for t in res["times"]]
    p95 = summary(loaded)["p95"]
    met = bool(loaded) and p95 < 1.0 and not any(res["failed"] for res in out[("after", "loaded")])
    if ("before", "loaded") in out:
        before = [t for res in out[("before", "loaded")] for t in res["times"]]
        print(
            f"\nLoaded p95, after / before: {p95 / summary(before)['p95']:.2f} "
            f"({p95:.2f} s / {summary(before)['p95']:.2f} s)."
        )
    print(
        f"\nTarget ({n} first cells at once, p95 < 1 s with a CPU hog on every core): "
        f"{'met' if met else 'NOT met'} (p95 {p95:.2f} s)."
    )
    return met


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a fast smoke variant (2 kernels)")
    ap.add_argument(
        "--kernels", type=int, default=None, help="kernels in sequence (default 5, --quick 2)"
    )
    ap.add_argument(
        "--virtual-gpus",
        default=os.environ.get("JUPYTER_GPU_VIRTUAL_GPUS", DEFAULT_VIRTUAL),
        help="virtual GPUs for the pool ('' for the machine's real GPUs)",
    )
    ap.add_argument(
        "--at-once", type=int, default=None, help="kernels per burst (default 8, --quick 4)"
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="bursts of each kind, quiet and loaded (default 1)"
    )
    ap.add_argument(
        "--baseline",
        default=None,
        help="a checkout of other code (e.g. `git worktree add /var/tmp/base <commit>`): its own "
        "pool and kernels run it, bursts interleaved with this tree's, reported as 'before'",
    )
    args = ap.parse_args(argv)
    count = args.kernels if args.kernels is not None else (2 if args.quick else 5)
    at_once = args.at_once or (4 if args.quick else 8)
    set_virtual(args.virtual_gpus)
    header(
        "first_cell: first %%gpu cell of a new kernel (warm pool, spare session ready)", args.quick
    )

    t_all = time.perf_counter()
    rows, firsts, loads, seconds = [], [], [], []
    with Pool(args.virtual_gpus or None) as pool:
        spare_s = pool.wait_spares()
        log(f"pool up in {pool.start_s:.2f} s, spares ready {spare_s:.2f} s later")
        for i in range(count):
            pool.wait_idle()
            waited = pool.wait_spares()
            kernel = start_kernel(pool.address)
            try:
                load = check(kernel, "%load_ext jupyter_gpu")
                first = check(kernel, "%%gpu\npass")
                second = check(kernel, "%%gpu\npass")
            finally:
                kernel.shutdown(now=True)
            log(
                f"kernel {i + 1}/{count}: first %%gpu {first * 1e3:.0f} ms (spares were ready "
                f"after {waited:.1f} s)"
            )
            rows.append(
                [
                    i + 1,
                    ms(kernel.start_s),
                    ms(load),
                    ms(first),
                    ms(second),
                    f"{first / second:.0f}x",
                ]
            )
            firsts.append(first)
            loads.append(load)
            seconds.append(second)
        burst_out = None
        if args.rounds > 0:
            with contextlib.ExitStack() as stack:
                pools: dict[str, tuple[Pool, str | None]] = {}
                if args.baseline:
                    with code_from(args.baseline):
                        base = stack.enter_context(Pool(args.virtual_gpus or None))
                    pools["before"] = (base, args.baseline)
                pools["after"] = (pool, None)
                burst_out = bursts(pools, at_once, args.rounds)

    if burst_out is not None:
        report_bursts(burst_out, at_once)
    if not count:
        print(f"\nTotal wall time {time.perf_counter() - t_all:.0f} s; {loadavg()} at the end.")
        return 0
    table(
        "Per kernel (ms)",
        ["kernel", "kernel start", "%load_ext", "first %%gpu", "second %%gpu", "first / second"],
        rows,
    )
    f, lo, s = summary(firsts), summary(loads), summary(seconds)
    table(
        "Summary (ms)",
        ["what", "p50", "max"],
        [
            ["%load_ext jupyter_gpu", ms(lo["p50"]), ms(max(loads))],
            ["first %%gpu cell", ms(f["p50"]), ms(max(firsts))],
            ["second %%gpu cell (warm anchor)", ms(s["p50"]), ms(max(seconds))],
            ["pool start (ensure_embedded_pool)", ms(pool.start_s), ""],
            ["spare sessions ready after pool start", ms(spare_s), ""],
        ],
    )
    print(
        f"\nfirst / warm (p50): {f['p50'] / s['p50']:.1f}x. Target (first %%gpu cell under 1 s): "
        f"{'met' if max(firsts) < 1.0 else 'NOT met'} (worst {max(firsts):.2f} s). "
        f"Total wall time {time.perf_counter() - t_all:.0f} s; {loadavg()} at the end."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
