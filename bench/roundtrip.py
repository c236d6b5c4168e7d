"""Warm round trip of a no-op ``%%gpu`` cell, against ipyparallel and plain Dask measured in the
same run.

    python bench/roundtrip.py            # 200 timed runs per method (about 2 minutes on 2 cores)
    python bench/roundtrip.py --quick    # 30 runs per method, a smoke run for CI (< 60 s)

Methods (all warm: the session / engine / worker exists and has run the cell before):

  in a real kernel (jupyter_client KernelManager, ``kc.execute`` until the kernel reports idle)
    kernel: pass           a plain cell: the Jupyter protocol's own cost, the floor for the two below
    kernel: %%gpu pass     ours
    kernel: %%px pass      ipyparallel's cell magic (``rc[:].activate()``), the anchor
  in-process (no Jupyter protocol in the path)
    shell: %%gpu pass      IPython InteractiveShell with jupyter_gpu loaded, ``shell.run_cell``
    ipp: view.execute      ``rc[:].execute("pass", block=True)``, the anchor
    dask: submit/result    ``client.submit(noop, pure=False).result()`` on LocalCluster(processes=True, 1 worker)

All systems run at once and the methods are interleaved in rounds, so background load and
frequency drift hit every method alike. Ratios are ours / anchor from this run.
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
    dask_local_cluster,
    header,
    ipp_cluster,
    loadavg,
    log,
    ms,
    run_cell_checked,
    set_virtual,
    shell_with_extension,
    start_kernel,
    summary,
    table,
)


def noop() -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="a fast smoke variant (30 runs per method)"
    )
    ap.add_argument(
        "-n", type=int, default=None, help="timed runs per method (default 200, --quick 30)"
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="interleaving rounds (default 5, --quick 2)"
    )
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument(
        "--virtual-gpus",
        default=os.environ.get("JUPYTER_GPU_VIRTUAL_GPUS", DEFAULT_VIRTUAL),
        help="virtual GPUs for the pool ('' for the machine's real GPUs)",
    )
    args = ap.parse_args(argv)
    n = args.n or (30 if args.quick else 200)
    rounds = args.rounds or (2 if args.quick else 5)
    warmup = min(args.warmup, 5) if args.quick else args.warmup
    set_virtual(args.virtual_gpus)
    header("roundtrip: warm no-op cell", args.quick)

    t_all = time.perf_counter()
    with (
        Pool(args.virtual_gpus or None) as pool,
        ipp_cluster() as (_, rc, ipp_url),
        dask_local_cluster() as dc,
    ):
        log(f"pool up at {pool.address} in {pool.start_s:.2f} s; ipyparallel and Dask up")
        view = rc[:]
        view.block = True
        shell = shell_with_extension(pool.address)
        kernel = start_kernel(pool.address)
        try:
            check(kernel, "%load_ext jupyter_gpu")
            check(
                kernel,
                "import ipyparallel as _ipp\n"
                f"_rc = _ipp.Client({ipp_url!r})\n"
                "_rc.wait_for_engines(1, timeout=60)\n"
                "_rc[:].activate()\n"
                "_rc[:].block = True",
            )
            methods = {
                "kernel: pass": lambda: check(kernel, "pass"),
                "kernel: %%gpu pass": lambda: check(kernel, "%%gpu\npass"),
                "kernel: %%px pass": lambda: check(kernel, "%%px\npass"),
                "shell: %%gpu pass": lambda: run_cell_checked(shell, "%%gpu\npass"),
                "ipp: view.execute": lambda: view.execute("pass", block=True),
                "dask: submit/result": lambda: dc.submit(noop, pure=False).result(),
            }
            log("warming up (the first %%gpu cell starts the sessions)")
            for fn in methods.values():
                for _ in range(warmup):
                    fn()
            # taking a spare made each worker start a new one (imports torch): let that finish first
            log(f"spare sessions ready after {pool.wait_spares():.1f} s more")
            samples: dict[str, list[float]] = {k: [] for k in methods}
            per_round = [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]
            for r, count in enumerate(per_round):
                log(f"round {r + 1}/{rounds}: {count} runs per method")
                for name, fn in methods.items():
                    for _ in range(count):
                        t0 = time.perf_counter()
                        fn()
                        samples[name].append(time.perf_counter() - t0)
        finally:
            kernel.shutdown(now=True)
            ext = shell.magics_manager.registry.get("GpuMagics")
            if ext is not None and ext.conn is not None:
                ext.conn.close()

    stats = {k: summary(v) for k, v in samples.items()}
    rows = [
        [k, s["n"], ms(s["p50"]), ms(s["p95"]), ms(s["min"]), ms(s["mean"])]
        for k, s in stats.items()
    ]
    table(
        "Warm round trip of a no-op cell (ms)", ["method", "n", "p50", "p95", "min", "mean"], rows
    )

    def ratio(a: str, b: str, key: str) -> str:
        return f"{stats[a][key] / stats[b][key]:.2f}"

    kernel_floor = stats["kernel: pass"]["p50"]
    ratios = [
        [
            "kernel %%gpu / kernel %%px",
            ratio("kernel: %%gpu pass", "kernel: %%px pass", "p50"),
            ratio("kernel: %%gpu pass", "kernel: %%px pass", "p95"),
        ],
        [
            "shell %%gpu / ipp view.execute",
            ratio("shell: %%gpu pass", "ipp: view.execute", "p50"),
            ratio("shell: %%gpu pass", "ipp: view.execute", "p95"),
        ],
        [
            "shell %%gpu / dask submit",
            ratio("shell: %%gpu pass", "dask: submit/result", "p50"),
            ratio("shell: %%gpu pass", "dask: submit/result", "p95"),
        ],
    ]
    table("Ratios (ours / anchor; < 1 means we are faster)", ["ratio", "p50", "p95"], ratios)
    over = [
        ["%%gpu", ms(stats["kernel: %%gpu pass"]["p50"] - kernel_floor)],
        ["%%px", ms(stats["kernel: %%px pass"]["p50"] - kernel_floor)],
    ]
    table(
        "In-kernel p50 above a plain `pass` cell (ms): the magic's own cost",
        ["magic", "p50 - kernel floor"],
        over,
    )
    ok = stats["kernel: %%gpu pass"]["p50"] < stats["kernel: %%px pass"]["p50"]
    print(
        f"\nTarget (kernel %%gpu p50 below kernel %%px p50): {'met' if ok else 'NOT met'}; "
        "in-process: "
        f"{'met' if stats['shell: %%gpu pass']['p50'] < stats['ipp: view.execute']['p50'] else 'NOT met'}. "
        f"Total wall time {time.perf_counter() - t_all:.0f} s; {loadavg()} at the end."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
