"""Where the time of a warm no-op ``%%gpu`` round trip goes: an ablation, measured in-process.

    python bench/profile_roundtrip.py [--quick] [-n 300]

Each variant switches off one piece of per-cell work at run time (monkeypatched in this process
or, through a ``%%gpu`` cell, inside the session process; no file is changed) and the variants
are interleaved in rounds, so their differences from the baseline are the cost of that piece on
this machine:

  baseline           as shipped
  no lease notes     the session's per-cell notes to the broker through its worker are skipped: "idle" after
                     every cell, and "running" for a cell still running after 50 ms
                     (jupyter_gpu/session/worker_link.py, WorkerLink.tell_lease_state and tell_later, called
                     by the executor around every cell)
  no fd sync         the per-cell FdCapture.sync() (marker through both fd pipes) is skipped
                     (jupyter_gpu/session/output.py, FdCapture.sync, called in Executor._execute)
  cached parser      the kernel-side argparse parser is built once instead of per cell
                     (jupyter_gpu/kernelext/options.py, _parser(), called by parse_cell_options)
  all three          all of the above

Variants that skip work the product needs are for measurement only; they are not proposals to
drop it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    DEFAULT_VIRTUAL,
    Pool,
    header,
    log,
    ms,
    run_cell_checked,
    set_virtual,
    shell_with_extension,
    summary,
    table,
)

FIND = (
    "import gc as _gc\n"
    "_S = [o for o in _gc.get_objects() if type(o).__name__ == 'Executor' and hasattr(o, "
    "'link')][0]\n"
)
SET_TELL = {
    True: "_S.link.__dict__.pop('tell_lease_state', None); _S.link.__dict__.pop('tell_later', None)",
    False: "_S.link.tell_lease_state = lambda **kw: None; _S.link.tell_later = lambda *a, **kw: "
    "None",
}
SET_SYNC = {
    True: "_S.capture.__dict__.pop('sync', None)",
    False: "_S.capture.sync = lambda *a, **k: None",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "-n", type=int, default=None, help="timed runs per variant (default 300, --quick 40)"
    )
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--virtual-gpus", default=os.environ.get("JUPYTER_GPU_VIRTUAL_GPUS", DEFAULT_VIRTUAL)
    )
    args = ap.parse_args(argv)
    n = args.n or (40 if args.quick else 300)
    rounds = args.rounds or (2 if args.quick else 6)
    set_virtual(args.virtual_gpus)
    header("profile_roundtrip: ablation of a warm no-op %%gpu cell (in-process)", args.quick)

    from jupyter_gpu.kernelext import options

    real_parser = options._parser
    cached_parser = functools.lru_cache(maxsize=1)(real_parser)

    with Pool(args.virtual_gpus or None) as pool:
        shell = shell_with_extension(pool.address)
        for _ in range(20):
            run_cell_checked(shell, "%%gpu\npass")
        log(f"spares ready after {pool.wait_spares():.1f} s")

        def configure(tell: bool, sync: bool, parser: bool) -> None:
            run_cell_checked(
                shell,
                "%%gpu --out ''\n" + FIND + SET_TELL[tell] + "\n" + SET_SYNC[sync] + "\n"
                "del _S, _gc",
            )
            options._parser = real_parser if parser else cached_parser

        variants = {
            "baseline": (True, True, True),
            "no lease notes": (False, True, True),
            "no fd sync": (True, False, True),
            "cached parser": (True, True, False),
            "all three": (False, False, False),
        }
        samples: dict[str, list[float]] = {k: [] for k in variants}
        per_round = [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]
        try:
            for r, count in enumerate(per_round):
                log(f"round {r + 1}/{rounds}")
                for name, flags in variants.items():
                    configure(*flags)
                    for _ in range(5):
                        run_cell_checked(shell, "%%gpu\npass")
                    for _ in range(count):
                        t0 = time.perf_counter()
                        run_cell_checked(shell, "%%gpu\npass")
                        samples[name].append(time.perf_counter() - t0)
        finally:
            configure(True, True, True)
            ext = shell.magics_manager.registry.get("GpuMagics")
            if ext is not None and ext.conn is not None:
                ext.conn.close()

    stats = {k: summary(v) for k, v in samples.items()}
    base = stats["baseline"]
    rows = [
        [
            k,
            s["n"],
            ms(s["p50"]),
            ms(s["p95"]),
            ms(s["p50"] - base["p50"]),
            f"{s['p50'] / base['p50']:.2f}",
        ]
        for k, s in stats.items()
    ]
    table(
        "Warm %%gpu no-op, in-process, by variant (ms)",
        ["variant", "n", "p50", "p95", "p50 - baseline", "p50 / baseline"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
