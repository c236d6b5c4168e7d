"""Moving an idle session's variables to host memory and back: what suspension and reclaim cost.

    python bench/offload.py            # 512 MiB namespace, 5 rounds (about 30 s)
    python bench/offload.py --quick    # 128 MiB, 3 rounds, a smoke run for CI (< 20 s)

A namespace of half torch tensors, half numpy arrays (plus a model and its optimizer, which must
stay linked) is written with ``save_namespace`` to the offload folder (``/dev/shm`` where there is
one) and read back with ``load_namespace`` (plus reading every restored byte once: CPU data comes
back mapped, not copied), as a suspended session and its owner's next session do. Anchors measured
in the same rounds: ``fresh memcpy`` (copy the same bytes into freshly allocated memory, the
machine's floor for any path that lands in new memory) and ``raw write`` (the bytes written to a
file in the same folder, no pickling). On a real GPU, CUDA tensors also cross the host link each
way; that part is not measured here without a GPU (``bench/gpu_smoke.py`` is the place for it).
``bench/pool_sim.py`` charges its moves at the rates this script measured on the machine of
docs/benchmarks.md (2.0 GB/s out, 7.5 GB/s back).

GB/s = namespace bytes / seconds (10^9 bytes); methods are interleaved, one each per round.

Then the standby copy (``standby.py``): what suspending a session costs once it has copied its
variables while idle (the hand-over, a rename), and how long a cell that arrives while the copy is
being written waits for it to stop (the copy is told to stop a third of the way through a save; it
stops at its next write).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _common import header, loadavg, percentile, table

from jupyter_gpu.common.hostmem import offload_dir
from jupyter_gpu.session.offload import load_namespace, save_namespace
from jupyter_gpu.session.standby import StandbyCopy


def namespace(mib: int) -> tuple[dict, int]:
    """Half tensors, half arrays, plus a small model and its optimizer; returns it and its bytes."""
    import numpy as np
    import torch

    half = mib * 2**20 // 2
    net = torch.nn.Linear(64, 64)
    ns = {
        "weights": torch.randn(half // 4),
        "features": np.random.default_rng(0).random(half // 8),
        "net": net,
        "opt": torch.optim.Adam(net.parameters()),
        "config": {"lr": 1e-3},
    }
    return ns, 2 * half


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mib", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    mib = args.mib or (128 if args.quick else 512)
    rounds = args.rounds or (3 if args.quick else 5)
    header("offload: a session's variables to host memory and back", args.quick)
    import numpy as np

    folder = offload_dir("bench")
    ns, nbytes = namespace(mib)
    flat = np.concatenate([ns["weights"].numpy().view(np.uint8), ns["features"].view(np.uint8)])
    times: dict[str, list[float]] = {
        "save_namespace": [],
        "load_namespace": [],
        "fresh memcpy": [],
        "raw write": [],
    }
    path = os.path.join(folder, "L1.pkl")
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            saved = save_namespace(ns, {}, path)
            times["save_namespace"].append(time.perf_counter() - t0)
            back: dict = {}
            t0 = time.perf_counter()
            load_namespace(back, path)
            # restored CPU data is mapped, not copied: reading every byte once is part of the cost
            float(back["weights"].sum()) + float(back["features"].sum())
            times["load_namespace"].append(time.perf_counter() - t0)
            assert back["opt"].param_groups[0]["params"][0] is back["net"].weight, (
                "model and optimizer unlinked"
            )
            del back
            t0 = time.perf_counter()
            copy = flat.copy()
            times["fresh memcpy"].append(time.perf_counter() - t0)
            del copy
            raw = os.path.join(folder, "raw.bin")
            t0 = time.perf_counter()
            with open(raw, "wb") as f:
                f.write(memoryview(flat))
            times["raw write"].append(time.perf_counter() - t0)
            os.unlink(raw)
        standby = {"hand-over (a rename)": [], "a cell stops a copy mid-write": []}
        for _ in range(rounds):
            copy = StandbyCopy(os.path.join(folder, "L2.standby"), 0.0)
            copy.changed()
            copy.idle()
            assert copy.take(ns, {}, nbytes, lambda: False)
            t0 = time.perf_counter()
            moved = copy.hand_over(os.path.join(folder, "L2.pkl"))
            standby["hand-over (a rename)"].append(time.perf_counter() - t0)
            os.unlink(moved["path"])
            copy.changed()
            copy.idle()
            cell = threading.Event()
            writer = threading.Thread(target=copy.take, args=(ns, {}, nbytes, cell.is_set))
            writer.start()
            time.sleep(percentile(times["save_namespace"], 50) / 3)
            t0 = time.perf_counter()
            cell.set()
            writer.join()
            standby["a cell stops a copy mid-write"].append(time.perf_counter() - t0)
            assert not os.path.exists(copy.path), "a stopped copy left its file"
    finally:
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
    p50 = {k: percentile(v, 50) for k, v in times.items()}
    gbps = {k: nbytes / v / 1e9 for k, v in p50.items()}
    rows = [
        [
            k,
            f"{p50[k] * 1e3:.0f}",
            f"{gbps[k]:.2f}",
            f"{gbps[k] / gbps['fresh memcpy']:.2f}",
            f"{gbps[k] / gbps['raw write']:.2f}",
        ]
        for k in times
    ]
    table(
        f"{mib} MiB namespace ({saved['bytes'] / 2**20:.0f} MiB file in "
        f"{os.path.dirname(folder)}), "
        f"{rounds} rounds, p50",
        ["method", "ms", "GB/s", "/ fresh memcpy", "/ raw write"],
        rows,
    )
    table(
        "standby copy: suspension once copied, and a cell that arrives mid-copy, p50",
        ["what", "ms", "/ save_namespace"],
        [
            [
                k,
                f"{percentile(v, 50) * 1e3:.2f}",
                f"{percentile(v, 50) / p50['save_namespace']:.3f}",
            ]
            for k, v in standby.items()
        ],
    )
    move = 1 / (1 / gbps["save_namespace"] + 1 / gbps["load_namespace"])
    print(
        f"\nA whole move (out and back) here: {move:.2f} GB/s. bench/pool_sim.py charges 2.0 GB/s "
        "out and "
        "7.5 GB/s back (docs/benchmarks.md)."
    )
    print(f"{loadavg()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
