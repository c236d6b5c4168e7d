"""Session starts under load: forked from the worker's zygote, against today's spare-process
path.

    python bench/session_start.py           # 1, 4 and 8 kernels at once, both paths (about 4 minutes)
    python bench/session_start.py --quick   # 1 and 4 kernels, both paths (about 2 minutes)

For each path (``fork``: ``session.fork-server: true``, the default; ``spare``: ``false``, one
pre-warmed spare session process per worker and a new interpreter for every other start) a
private embedded pool (2 virtual GPUs, one worker) is started and warmed (its zygote, or its
spare, has imported torch). Then:

  first cell, N at once   N real kernels (jupyter_client), each with ``%load_ext jupyter_gpu`` done, send
                          their first ``%%gpu`` cell at the same moment; each figure is one kernel's cell,
                          execute to idle (lease, session start, run). p50/p95/max over the N
  PSS per idle session    after the 8-kernel round: the proportional set size (``/proc/<pid>/smaps_rollup``)
                          of each idle session process, mean, and the zygote's own
  --workers 2, first step a 2-rank ``%%gpu --workers 2`` cell (DDP on a Linear) in a fresh kernel: from
                          execute until rank 0 prints its first finished step

Targets (issue 16): 8 first cells at once all succeed with p95 < 1 s on 2 cores; first DDP step <
3 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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

FIRST = "%%gpu\nimport numpy as np\nx = np.arange(10).sum()"
DDP = """%%gpu --workers 2
import time, torch, jupyter_gpu
from torch.nn.parallel import DistributedDataParallel as DDP
model = DDP(torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss = model(torch.ones(8, 4)).sum()
loss.backward()
opt.step()
if jupyter_gpu.rank() == 0:
    print("first step done", flush=True)
"""


def sessions_pss(starter_info: list[dict]) -> tuple[list[int], list[int]]:
    """PSS (bytes) of this pool's session processes (children of its zygotes, or of its workers),
    and of its zygotes."""
    import psutil

    sessions, zygotes = [], []
    for info in starter_info:
        parent = info.get("pid") if info["kind"] == "fork" else info["worker_pid"]
        try:
            children = psutil.Process(parent).children()
            if info["kind"] == "fork":
                zygotes.append(psutil.Process(parent).memory_full_info().pss)
        except psutil.NoSuchProcess:
            continue
        for p in children:
            try:
                if info["kind"] == "spare" and "jupyter_gpu.session" not in " ".join(p.cmdline()):
                    continue
                sessions.append(p.memory_full_info().pss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return sessions, zygotes


def starters(pool: Pool) -> dict:
    from distributed import Client

    from jupyter_gpu.common.security import client_security

    with Client(
        pool.address, set_as_default=False, timeout=30, security=client_security(pool.address)
    ) as c:
        return {w: c.sync(c.rpc(w).gpu_session_starter) for w in c.scheduler_info()["workers"]}


def first_cells_at_once(pool: Pool, n: int) -> tuple[list[float], int]:
    """N kernels send their first cell at once; (each cell's seconds, failures)."""
    kernels = [start_kernel(pool.address, user=f"student{i}") for i in range(n)]
    times: list[float] = []
    failures = 0
    try:
        for k in kernels:
            check(k, "%load_ext jupyter_gpu")
        results = run_at_once(kernels, FIRST)
        for r in results:
            if r is None or r.status != "ok":
                failures += 1
            else:
                times.append(r.elapsed)
        return times, failures
    finally:
        if n == 8:
            pss = sessions_pss(list(starters(pool).values()))
            first_cells_at_once.pss = pss  # type: ignore[attr-defined]
        for k in kernels:
            k.shutdown(now=True)


def ddp_first_step(pool: Pool) -> float:
    k = start_kernel(pool.address, user="trainer")
    try:
        check(k, "%load_ext jupyter_gpu")
        msg = k.submit(DDP)
        t0 = time.perf_counter()
        k.wait_for_output(msg, "first step done", timeout=300)
        took = time.perf_counter() - t0
        res = k.collect(msg, timeout=300)
        if res.status != "ok":
            raise RuntimeError(f"the --workers 2 cell failed: {res.ename}: {res.evalue}")
        return took
    finally:
        k.shutdown(now=True)


def run_path(kind: str, virtual: str, counts: list[int]) -> dict:
    os.environ["DASK_JUPYTER_GPU__SESSION__FORK_SERVER"] = "True" if kind == "fork" else "False"
    out: dict = {"first": {}, "failures": {}}
    with Pool(virtual) as pool:
        out["warm_s"] = pool.wait_spares(timeout=300)
        log(f"{kind}: pool up in {pool.start_s:.1f} s, warm {out['warm_s']:.1f} s later")
        for n in counts:
            pool.wait_idle(timeout=120)
            pool.wait_spares(timeout=300)
            times, failures = first_cells_at_once(pool, n)
            out["first"][n], out["failures"][n] = times, failures
            log(f"{kind}: {n} at once: p50 {summary(times)['p50'] * 1e3:.0f} ms, {failures} failed")
        out["pss"] = getattr(first_cells_at_once, "pss", ([], []))
        first_cells_at_once.pss = ([], [])  # type: ignore[attr-defined]
        pool.wait_idle(timeout=120)
        pool.wait_spares(timeout=300)
        out["ddp"] = ddp_first_step(pool)
        log(f"{kind}: --workers 2 first step after {out['ddp']:.2f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 4 kernels only")
    ap.add_argument(
        "--virtual-gpus", default=os.environ.get("JUPYTER_GPU_VIRTUAL_GPUS", DEFAULT_VIRTUAL)
    )
    args = ap.parse_args(argv)
    counts = [1, 4] if args.quick else [1, 4, 8]
    set_virtual(args.virtual_gpus)
    header("session_start: first cells at once, forked sessions vs spare processes", args.quick)
    t_all = time.perf_counter()
    saved = os.environ.get("DASK_JUPYTER_GPU__SESSION__FORK_SERVER")
    try:
        results = {kind: run_path(kind, args.virtual_gpus, counts) for kind in ("fork", "spare")}
    finally:
        if saved is None:
            os.environ.pop("DASK_JUPYTER_GPU__SESSION__FORK_SERVER", None)
        else:
            os.environ["DASK_JUPYTER_GPU__SESSION__FORK_SERVER"] = saved

    rows = []
    for n in counts:
        for kind in ("fork", "spare"):
            s = summary(results[kind]["first"][n])
            rows.append(
                [
                    n,
                    kind,
                    s["n"],
                    results[kind]["failures"][n],
                    ms(s["p50"]),
                    ms(s["p95"]),
                    ms(max(results[kind]["first"][n], default=float("nan"))),
                ]
            )
    table(
        "First %%gpu cell, N kernels at once (ms, execute to idle)",
        ["N", "path", "ok", "failed", "p50", "p95", "max"],
        rows,
    )
    if 8 in counts:
        mib = 2**20
        table(
            "Memory of idle sessions after the 8-kernel round (PSS, MiB)",
            ["path", "sessions", "mean per session", "zygote"],
            [
                [
                    kind,
                    len(results[kind]["pss"][0]),
                    f"{sum(results[kind]['pss'][0]) / max(1, len(results[kind]['pss'][0])) / mib:.0f}",
                    f"{sum(results[kind]['pss'][1]) / mib:.0f}" if results[kind]["pss"][1] else "-",
                ]
                for kind in ("fork", "spare")
            ],
        )
    table(
        "--workers 2: execute to rank 0's first finished step (s)",
        ["path", "seconds"],
        [[kind, f"{results[kind]['ddp']:.2f}"] for kind in ("fork", "spare")],
    )
    top = max(counts)
    fork = summary(results["fork"]["first"][top])
    print(
        f"\nTargets: {top} first cells at once all succeed with p95 < 1 s: "
        f"{'met' if results['fork']['failures'][top] == 0 and fork['p95'] < 1 else 'NOT met'} "
        f"(p95 {fork['p95']:.2f} s, {results['fork']['failures'][top]} failed); --workers 2 first "
        "step < 3 s: "
        f"{'met' if results['fork']['ddp'] < 3 else 'NOT met'} ({results['fork']['ddp']:.2f} s). "
        f"Total wall time {time.perf_counter() - t_all:.0f} s; {loadavg()} at the end."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
