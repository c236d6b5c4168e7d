"""One user's flood of requests against another user's first cell (issue 20, "bounded per user").

    python bench/flood.py              # 10,000 requests with the cap; 2,000 without it (anchor)
    python bench/flood.py --quick      # 2,000 requests, with the cap only

A private embedded pool (2 virtual GPUs); carol holds GPU 0 whole and dave half of GPU 1, so
alice's requests for a whole GPU wait in the queue. The figure is bob's first ``%%gpu --gpus 0.1`` cell in a fresh
kernel (lease, session start, run: execute to idle), timed:

  quiet          no flood (the anchor, measured in the same run)
  flood          while alice sends N ``gpu_request`` through raw rpc (64 at a time in flight);
                 ``jupyter-gpu.max-queued-per-user`` at its default (64): the rest are refused
  flood, no cap  the cap off (``max-queued-per-user: 0``), ``--uncapped`` requests (2,000): what
                 the cap prevents (every scheduling pass walks the queue: with 10,000 a cell
                 waits minutes). Not with --quick

Target (issue 20): the flood moves bob's first cell by less than a second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import DEFAULT_VIRTUAL, Pool, check, header, log, ms, start_kernel, summary, table

CELL = "%%gpu --gpus 0.1\nx = 1"
IN_FLIGHT = 64


async def _flood(address: str, n: int) -> dict[str, int]:
    from distributed.core import rpc

    from jupyter_gpu.common.security import client_security

    args = client_security(address).get_connection_args("client")
    counts = {"queued": 0, "refused": 0}
    sem = asyncio.Semaphore(IN_FLIGHT)
    ids: list[str] = []

    async with rpc(address, connection_args=args, timeout=60) as r:

        async def one(i: int) -> None:
            async with sem:
                try:
                    reply = await r.gpu_request(user="alice", kernel="flood", spec={"gpus": 1})
                    ids.append(reply["id"])
                    counts["queued" if reply["state"] == "queued" else "refused"] += 1
                except Exception:  # noqa: BLE001 - a refusal is what is counted
                    counts["refused"] += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        for rid in ids:  # leave the pool as it was
            try:
                await r.gpu_cancel(id=rid, user="alice")
            except Exception:  # noqa: BLE001 - gone already
                pass
    return counts


def first_cell(address: str) -> float:
    k = start_kernel(address, user="bob")
    try:
        check(k, "%load_ext jupyter_gpu")
        return check(k, CELL)
    finally:
        k.shutdown(now=True)


def measure(address: str, flood: int, rounds: int) -> tuple[list[float], dict[str, int], float]:
    """bob's first cells (``rounds`` of them), while alice floods (``flood`` requests, 0: none)."""
    result: dict[str, object] = {}

    def run_flood() -> None:
        t0 = time.perf_counter()
        result["counts"] = asyncio.run(_flood(address, flood))
        result["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=run_flood, daemon=True) if flood else None
    if thread is not None:
        thread.start()
        time.sleep(1.0)  # the flood is under way
    cells = [first_cell(address) for _ in range(rounds)]
    if thread is not None:
        thread.join()
    counts = result.get("counts") or {"queued": 0, "refused": 0}
    return cells, counts, float(result.get("seconds") or 0.0)  # type: ignore[arg-type]


def scenario(cap: int, floods: list[int], rounds: int) -> list[list[str]]:
    os.environ["DASK_JUPYTER_GPU__MAX_QUEUED_PER_USER"] = str(cap)
    rows = []
    with Pool(DEFAULT_VIRTUAL) as pool:
        assert pool.address is not None
        pool.wait_spares()
        holders = [start_kernel(pool.address, user=u) for u in ("carol", "dave")]
        try:
            for k, share in zip(holders, ("1", "0.5")):  # no whole GPU free: alice's requests wait
                check(k, "%load_ext jupyter_gpu")
                check(k, f"%%gpu --gpus {share}\nheld = 1")
            quiet = None
            for n in floods:
                log(f"cap {cap}: {n} requests")
                cells, counts, seconds = measure(pool.address, n, rounds)
                s = summary(cells)
                quiet = s["p50"] if n == 0 else quiet
                shift = "-" if n == 0 or quiet is None else f"{s['p50'] - quiet:+.2f} s"
                rows.append(
                    [
                        "quiet" if n == 0 else f"flood of {n:,}",
                        str(cap) if cap else "off",
                        ms(s["p50"]),
                        ms(max(cells)),
                        shift,
                        f"{counts['queued']:,} / {counts['refused']:,}" if n else "-",
                        f"{seconds:.1f}" if n else "-",
                    ]
                )
        finally:
            for k in holders:
                k.shutdown(now=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uncapped", type=int, default=2_000, help="requests of the no-cap run")
    opts = parser.parse_args()
    header("flood", opts.quick)
    runs = [(64, 2_000 if opts.quick else 10_000)]
    if not opts.quick:
        runs.append((0, opts.uncapped))
    for cap, n in runs:  # each table as soon as it is measured
        table(
            f"bob's first cell (ms, {opts.rounds} fresh kernels each) while alice floods the queue",
            ["phase", "cap", "p50", "max", "p50 - quiet", "queued / refused", "flood s"],
            scenario(cap, [0, n], opts.rounds),
        )
    print("\ntarget: a flood moves bob's first cell by less than a second (p50 - quiet < 1 s)")


if __name__ == "__main__":
    main()
