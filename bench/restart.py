"""Restarting a team pool's scheduler while people work: what they lose and how long they wait.

    python bench/restart.py            # 4 users, scheduler down 5 s, SIGTERM and kill -9, 2 rounds each
    python bench/restart.py --quick    # 2 users, 1 round each (a smoke run, about 2 min)

``jupyter-gpu pool up`` and ``jupyter-gpu worker`` (two virtual GPUs) run as real processes
(``tests/support/services.py``, as in tests/system/faults). Each user's kernel has a session holding a
variable; the first user has a cell running (20 one-second steps). Then the scheduler is stopped
(``term``: SIGTERM, as systemd, a supervisor or Ctrl-C stop it; ``kill``: kill -9), stays down for
``--down`` seconds (a supervisor's restart delay, say), and ``jupyter-gpu pool up`` starts again on
the same port. While it is down, the second user runs a cell in their session, and the third asks
for a new one (``--fresh``: it needs the broker).

Reported per way of stopping: sessions kept and lost (the lease ids before and after, and each
variable read back), cells that failed (of all the cells run from the stop to the end), and the
longest a user waited for a cell beyond its own run time, beside the anchor: how long the scheduler
was away (from the stop until the new one answered).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from _common import header, loadavg, log, table

from tests.support.harness import GpuKernel, Kernel, leases
from tests.support.services import PoolServices

STEPS = 20  # the running cell: this many 1 s steps


def one_restart(how: str, users: int, down: float) -> dict:
    """One pool, ``users`` kernels with a session each, one restart; returns the figures."""
    root = Path(tempfile.mkdtemp(prefix="jupyter-gpu-bench-restart-"))
    with PoolServices(root) as pool:
        kernels = [Kernel(pool.address, user=f"user{i}") for i in range(users)]
        try:
            for i, k in enumerate(kernels):
                res = k.run(f"%%gpu --gpus 0.2\nvalue = {i}")
                assert res.error is None, res.error_text
            before = {ls["user"]: ls["id"] for ls in leases(pool.address)}
            t_running = time.monotonic()
            running = kernels[0].submit(
                f"%%gpu\nimport time\nprint('started', flush=True)\nfor i in range({STEPS}):\n"
                "    time.sleep(1)\nprint('done', value)"
            )
            kernels[0].wait_for_output(running, "started", timeout=60)
            time.sleep(2)
            stopped = time.monotonic()
            if how == "term":
                pool.stop_scheduler()
            else:
                pool.kill_scheduler()
            waits: dict[str, float] = {}
            results = []
            if users > 1:
                t0 = time.monotonic()
                in_session = kernels[1].run("%%gpu\nprint(value)", timeout=120)
                results.append(in_session)
                waits["a cell in a session while away"] = time.monotonic() - t0
            pending = [(kernels[0], running, t_running, "the running cell, beyond its own run")]
            if users > 2:
                t_fresh = time.monotonic()
                fresh = kernels[2].submit("%%gpu --fresh --gpus 0.1\nprint('fresh')")
                pending.append((kernels[2], fresh, t_fresh, "a cell that needed a new session"))
            done: dict[str, tuple] = {}

            def finish(kernel: GpuKernel, msg: str, since: float, key: str) -> None:
                res = kernel.collect(msg, timeout=300)
                done[key] = (res, time.monotonic() - since)  # when it ended, seen live

            collectors = [threading.Thread(target=finish, args=item) for item in pending]
            for thread in collectors:
                thread.start()
            time.sleep(max(0.0, down - (time.monotonic() - stopped)))
            pool.start_scheduler()
            back = time.monotonic()
            for thread in collectors:
                thread.join(330)
            for key, (res, took) in done.items():
                results.append(res)
                # the running cell: beyond its own STEPS seconds
                waits[key] = took - (STEPS if key.startswith("the running") else 0.0)
            assert len(done) == len(pending), "a cell did not end"
            kept = lost = 0
            after = {ls["user"]: ls["id"] for ls in leases(pool.address)}
            for i, k in enumerate(kernels):
                t0 = time.monotonic()
                res = k.run("%%gpu\nprint(value)", timeout=300)
                results.append(res)
                intact = res.error is None and res.stdout.strip() == str(i)
                same = after.get(f"user{i}") == before.get(f"user{i}")
                kept += bool(intact and same)
                lost += not (intact and same)
                waits[f"user{i}'s next cell"] = max(
                    waits.get(f"user{i}'s next cell", 0.0), time.monotonic() - t0
                )
            failed = sum(r.error is not None for r in results)
            log(", ".join(f"{k}: {v:.1f} s" for k, v in waits.items()))
            return {
                "kept": kept,
                "lost": lost,
                "cells": len(results),
                "failed": failed,
                "longest_wait": max(waits.values()),
                "longest": max(waits, key=waits.__getitem__),
                "away": back - stopped,
                "worker_up": pool.worker.poll() is None,
            }
        finally:
            for k in kernels:
                k.shutdown(now=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--down", type=float, default=5.0)
    parser.add_argument("--how", choices=["term", "kill", "both"], default="both")
    args = parser.parse_args(argv)
    users = args.users or (2 if args.quick else 4)
    rounds = args.rounds or (1 if args.quick else 2)
    header("restart: a team pool's scheduler restarted while people work", args.quick)
    rows = []
    for how in ("term", "kill") if args.how == "both" else (args.how,):
        for r in range(rounds):
            log(f"{how}, round {r + 1} of {rounds}")
            got = one_restart(how, users, args.down)
            rows.append(
                [
                    {"term": "SIGTERM", "kill": "kill -9"}[how],
                    f"{got['kept']} / {got['lost']}",
                    f"{got['failed']} of {got['cells']}",
                    f"{got['longest_wait']:.2f}",
                    f"{got['away']:.1f}",
                    f"{got['longest_wait'] / got['away']:.2f}",
                    "yes" if got["worker_up"] else "NO",
                ]
            )
    table(
        f"{users} users with a session each, one running a {STEPS} s cell; scheduler down "
        f"{args.down:g} s, then `pool up` again",
        [
            "stopped by",
            "sessions kept / lost",
            "cells failed",
            "longest wait s",
            "scheduler away s",
            "wait / away",
            "worker service stayed up",
        ],
        rows,
    )
    print(f"{loadavg()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
