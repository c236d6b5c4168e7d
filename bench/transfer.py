"""Shipping a large NumPy array into a ``%%gpu`` cell, against Dask scatter and ipyparallel push.

    python bench/transfer.py            # 256 MiB (6 rounds) and 2 GiB (3 rounds) (about 3 minutes)
    python bench/transfer.py --quick    # 64 MiB, 2 per method, a smoke run for CI (< 60 s)
    python bench/transfer.py --mib 512 -n 4

Methods, all measured in this process (no Jupyter kernel protocol in the path) on loopback:

  %%gpu input       IPython InteractiveShell with jupyter_gpu, ``x`` in the namespace, cell ``%%gpu\\nn = x.nbytes``:
                    serialize x, send it to the session process, rebuild it there, run the cell, return ``n``.
                    Same machine and account, so the buffer goes through pipes (common/local_transfer.py:
                    one copy, made by the session into its own memory)
  %%gpu via comm    the same with ``jupyter-gpu.local-transfer: false``: Dask frames on the pool's comm (what
                    a session on another machine gets)
  %%gpu no-op       the same cell without the array (``%%gpu\\nn = 0``): the fixed cost inside the figure above
  dask scatter      ``client.scatter(x, direct=True, hash=False)`` to the worker of a LocalCluster(processes=True)
  ipp push          ``rc[:].push({'x': x}, block=True)`` to a one-engine ipyparallel cluster
  raw TCP socket    the machine's ceiling for any socket transport: ``sendall`` of the array's buffer to a
                    child Python process that ``recv_into``s fresh memory (numpy.empty, as Dask does) and acks
  fresh memcpy      ``x.copy()`` in this process: the cost of touching fresh memory once (page faults + copy)

GB/s = array bytes / seconds (10^9 bytes). Methods are interleaved, one transfer each per round.
Ratios are ours / anchor (> 1 means we are faster).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    DEFAULT_VIRTUAL,
    Pool,
    dask_local_cluster,
    header,
    ipp_cluster,
    loadavg,
    log,
    ms,
    run_cell_checked,
    set_virtual,
    shell_with_extension,
    summary,
    table,
)

RECEIVER = r"""
import socket
import numpy
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
while True:
    hdr = c.recv(8, socket.MSG_WAITALL)
    if len(hdr) < 8:
        break
    n = int.from_bytes(hdr, "little")
    buf = memoryview(numpy.empty(n, "u1"))  # uninitialised, as Dask's host_array
    got = 0
    while got < n:
        got += c.recv_into(buf[got:], n - got)
    del buf
    c.sendall(b"k")
"""


class RawSocket:
    """A child process that receives length-prefixed buffers over loopback TCP into fresh memory."""

    def __init__(self) -> None:
        import socket
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True
        )
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))

    def send(self, x) -> None:
        view = memoryview(x).cast("B")
        self.sock.sendall(len(view).to_bytes(8, "little"))
        self.sock.sendall(view)
        assert self.sock.recv(1) == b"k"

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)


def measure(
    mib: int, n: int, pool: Pool, shell, view, raw: RawSocket, dc
) -> dict[str, list[float]]:
    """One size: every method warmed once, then ``n`` interleaved rounds; seconds per transfer by
    method."""
    import numpy as np

    x = np.random.default_rng(0).random(mib * 2**20 // 8)
    nbytes = x.nbytes
    shell.user_ns["x"] = x
    conn = shell.magics_manager.registry["GpuMagics"].conn

    def ours() -> None:
        run_cell_checked(shell, "%%gpu\nn = x.nbytes")
        assert shell.user_ns["n"] == nbytes, shell.user_ns["n"]

    def ours_comm() -> None:  # the same cell, as a session on another machine would get it
        session = conn.session
        session.local = False
        try:
            ours()
        finally:
            session.local = True

    def noop() -> None:
        run_cell_checked(shell, "%%gpu\nn = 0")

    def scatter() -> None:
        fut = dc.scatter(x, direct=True, hash=False)
        assert fut.status == "finished"
        fut.release()

    def push() -> None:
        view.push({"x": x}, block=True)

    def copy() -> None:
        y = x.copy()
        del y

    methods = {
        "%%gpu input": ours,
        "%%gpu via comm": ours_comm,
        "%%gpu no-op": noop,
        "dask scatter": scatter,
        "ipp push": push,
        "raw TCP socket": lambda: raw.send(x),
        "fresh memcpy": copy,
    }
    samples: dict[str, list[float]] = {k: [] for k in methods}
    for fn in methods.values():  # warm every path once
        fn()
    for r in range(n):
        log(f"{mib} MiB: round {r + 1}/{n}")
        for name, fn in methods.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    shell.user_ns.pop("x", None)
    view.execute("x = None", block=True)
    return samples


def report(mib: int, nbytes: int, samples: dict[str, list[float]]) -> float:
    stats = {k: summary(v) for k, v in samples.items()}
    rows = []
    for name, s in stats.items():
        gbs = "" if name == "%%gpu no-op" else f"{nbytes / s['p50'] / 1e9:.2f}"
        best = "" if name == "%%gpu no-op" else f"{nbytes / s['min'] / 1e9:.2f}"
        rows.append([name, s["n"], ms(s["p50"]), ms(s["min"]), gbs, best])
    table(
        f"{mib} MiB array into a cell ({nbytes / 1e9:.3f} GB)",
        ["method", "n", "p50 ms", "min ms", "GB/s (p50)", "GB/s (best)"],
        rows,
    )
    ours_p50 = stats["%%gpu input"]["p50"]
    table(
        f"{mib} MiB: ratios (throughput, ours / anchor; > 1 means we are faster)",
        ["anchor", "p50"],
        [
            [k, f"{stats[k]['p50'] / ours_p50:.2f}"]
            for k in (
                "fresh memcpy",
                "dask scatter",
                "ipp push",
                "raw TCP socket",
                "%%gpu via comm",
            )
        ],
    )
    return stats["fresh memcpy"]["p50"] / ours_p50


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a fast smoke variant (64 MiB, 2 runs)")
    ap.add_argument(
        "--mib", type=int, default=None, help="one array size in MiB (default: 256 and 2048)"
    )
    ap.add_argument(
        "-n",
        type=int,
        default=None,
        help="timed transfers per method (default 6 at 256 MiB and 3 at 2 GiB, --quick 2)",
    )
    ap.add_argument(
        "--virtual-gpus", default=os.environ.get("JUPYTER_GPU_VIRTUAL_GPUS", DEFAULT_VIRTUAL)
    )
    args = ap.parse_args(argv)
    if args.quick:
        sizes = [(args.mib or 64, args.n or 2)]
    elif args.mib:
        sizes = [(args.mib, args.n or 6)]
    else:
        sizes = [(256, args.n or 6), (2048, args.n or 3)]
    set_virtual(args.virtual_gpus)
    header(
        "transfer: a NumPy array into a cell, " + " and ".join(f"{m} MiB" for m, _ in sizes),
        args.quick,
    )
    t_all = time.perf_counter()
    results = []
    with (
        Pool(args.virtual_gpus or None) as pool,
        ipp_cluster() as (_, rc, _url),
        dask_local_cluster() as dc,
    ):
        view = rc[:]
        raw = RawSocket()
        shell = shell_with_extension(pool.address)
        try:
            run_cell_checked(shell, "%%gpu\nn = 0")
            log(f"spares ready after {pool.wait_spares():.1f} s")
            for mib, n in sizes:
                results.append((mib, mib * 2**20, measure(mib, n, pool, shell, view, raw, dc)))
        finally:
            raw.close()
            ext = shell.magics_manager.registry.get("GpuMagics")
            if ext is not None and ext.conn is not None:
                ext.conn.close()
    verdicts = []
    for mib, nbytes, samples in results:
        ratio = report(mib, nbytes, samples)
        verdicts.append(f"{mib} MiB {ratio:.2f}x")
    print(
        f"\nTarget (same-host input at least 0.8x a fresh memcpy of the same bytes, p50): "
        f"{'met' if all(float(v.split()[-1][:-1]) >= 0.8 for v in verdicts) else 'NOT met'} "
        f"({', '.join(verdicts)}). Total wall time {time.perf_counter() - t_all:.0f} s; "
        f"{loadavg()} at the end."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
