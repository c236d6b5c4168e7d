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
stops within a few MiB of writing).

Then one large tensor (``--big-mib``, 2 GiB; 256 MiB with --quick), the case of issue 21 (a no-op
cell 8 s after a 2 GiB input stayed in its session took 0.44-0.99 s): how long a cell waits for the
copy of that one record when it arrives a third of the way through it, and for the copy to be
dropped when it arrives after the copy is complete; anchors: writing the record's bytes to a file
(what waiting for the whole record cost) and unlinking a file that size (what dropping it on the
cell's thread cost).

Last, the same in a real session (``--no-session`` skips it): a private pool and kernel, a
``--big-mib`` array sent as an input and left in the session, then a no-op ``%%gpu`` cell 3 s
later (the copy is being written) and 8 s later (it is done), against a no-op cell in a session
that holds nothing large (the anchor).
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
    parser.add_argument("--big-mib", type=int, default=None)
    parser.add_argument("--no-session", action="store_true")
    args = parser.parse_args(argv)
    mib = args.mib or (128 if args.quick else 512)
    rounds = args.rounds or (3 if args.quick else 5)
    big_mib = args.big_mib or (256 if args.quick else 2048)
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
    one_record(big_mib, rounds)
    if not args.no_session:
        in_a_session(big_mib, rounds)
    move = 1 / (1 / gbps["save_namespace"] + 1 / gbps["load_namespace"])
    print(
        f"\nA whole move (out and back) here: {move:.2f} GB/s. bench/pool_sim.py charges 2.0 GB/s "
        "out and "
        "7.5 GB/s back (docs/benchmarks.md)."
    )
    print(f"{loadavg()} at the end")
    return 0


def one_record(mib: int, rounds: int) -> None:
    """A cell and the standby copy of a namespace that is one ``mib`` MiB tensor (see the module
    docstring)."""
    import numpy as np
    import torch

    folder = offload_dir("bench-big")
    ns = {"x": torch.ones(mib * 2**20 // 4)}
    flat = ns["x"].numpy().view(np.uint8)
    times: dict[str, list[float]] = {
        "a cell arrives mid-record: waits for the copy to stop": [],
        "a cell arrives after the copy: waits for it to be dropped": [],
        "anchor: write the record's bytes": [],
        "anchor: unlink a file of that size": [],
    }
    keys = list(times)
    try:
        for _ in range(rounds):
            raw = os.path.join(folder, "raw.bin")
            t0 = time.perf_counter()
            with open(raw, "wb") as f:
                f.write(memoryview(flat))
            record_s = time.perf_counter() - t0
            times[keys[2]].append(record_s)
            t0 = time.perf_counter()
            os.unlink(raw)
            times[keys[3]].append(time.perf_counter() - t0)

            copy = StandbyCopy(os.path.join(folder, "L3.standby"), 0.0)
            copy.changed()
            copy.idle()
            cell = threading.Event()
            stopped = threading.Event()

            def write(c: StandbyCopy = copy) -> None:
                c.take(ns, {}, flat.nbytes, cell.is_set)
                stopped.set()

            writer = threading.Thread(target=write)
            writer.start()
            time.sleep(record_s / 3)
            t0 = time.perf_counter()
            cell.set()
            stopped.wait()
            times[keys[0]].append(time.perf_counter() - t0)
            writer.join()

            copy.idle()
            assert copy.take(ns, {}, flat.nbytes, lambda: False)
            t0 = time.perf_counter()
            copy.changed()  # what a cell does first: the copy is of the namespace before it
            times[keys[1]].append(time.perf_counter() - t0)
            deadline = time.monotonic() + 30
            while os.listdir(folder) and time.monotonic() < deadline:
                time.sleep(0.01)  # its pages are freed on a thread: wait before the next round
    finally:
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
    p50 = {k: percentile(v, 50) for k, v in times.items()}
    table(
        f"standby copy of one {mib} MiB tensor and a cell that arrives, {rounds} rounds, p50 "
        "(the cell's wait)",
        ["what", "ms", "/ write the record", "/ unlink"],
        [
            [
                k,
                f"{p50[k] * 1e3:.2f}",
                f"{p50[k] / p50[keys[2]]:.4f}",
                f"{p50[k] / p50[keys[3]]:.3f}",
            ]
            for k in keys
        ],
    )


def in_a_session(mib: int, rounds: int) -> None:
    """The issue's case in a real session: a no-op cell 3 s and 8 s after a ``mib`` MiB input was
    left in the session, against a no-op cell in a session that holds nothing large."""
    from _common import Pool, check, start_kernel

    times: dict[str, list[float]] = {
        "no-op cell, nothing large in the session (anchor)": [],
        f"no-op cell 3 s after a {mib} MiB input stayed (copy being written)": [],
        f"no-op cell 8 s after a {mib} MiB input stayed (copy done)": [],
    }
    keys = list(times)
    with Pool() as pool:
        pool.wait_spares()
        kernel = start_kernel(pool.address)
        try:
            check(kernel, "%load_ext jupyter_gpu")
            check(kernel, "%%gpu\npass")
            for _ in range(rounds):
                check(kernel, "%%gpu\npass")
                time.sleep(3)  # idle past session.standby-after (2 s): nothing to copy
                times[keys[0]].append(check(kernel, "%%gpu\npass"))
                for key, wait in ((keys[1], 3.0), (keys[2], 8.0)):
                    check(kernel, f"import numpy as np\nbig = np.ones({mib * 2**20 // 8})")
                    check(kernel, "%%gpu\nn = len(big)")  # an input that stays in the session
                    time.sleep(wait)
                    times[key].append(check(kernel, "%%gpu\npass"))
                    # (a cell that names ``big`` would send it again; a last expression's value
                    # would stay in the session's output history)
                    check(kernel, "%%gpu\ndel globals()['big']")
                    check(kernel, "del big")
        finally:
            kernel.shutdown(now=True)
    p50 = {k: percentile(v, 50) for k, v in times.items()}
    worst = {k: max(v) for k, v in times.items()}
    table(
        f"in a real session (private pool, virtual GPUs), {rounds} rounds",
        ["cell", "p50 ms", "max ms", "p50 / anchor"],
        [
            [k, f"{p50[k] * 1e3:.0f}", f"{worst[k] * 1e3:.0f}", f"{p50[k] / p50[keys[0]]:.2f}"]
            for k in keys
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
