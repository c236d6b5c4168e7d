"""Scale-out training from a cell: time to the first training step and samples/s for 1 vs 2 ranks.

Measured from a real kernel against a private embedded pool (2 virtual GPUs: gloo on CPU here; nccl
on a GPU machine with ``--virtual ''``). The anchor is the same training loop run in the notebook
kernel itself, in the same run. On a CPU-only machine two ranks share the same cores as one, so CPU
samples/s shows the overhead of data parallelism, not GPU scaling; on real GPUs the same script
reports scaling efficiency.

    python bench/scaleout.py [--quick] [--virtual 2x16GiB]
"""

from __future__ import annotations

import argparse
import re
import time

from _common import GpuKernel, Pool, capture, check, header, loadavg, log, start_kernel, table

TRAIN = """{magic}
import time, torch, jupyter_gpu
from torch.nn.parallel import DistributedDataParallel as DDP
dev = jupyter_gpu.device()
r, w = jupyter_gpu.rank(), jupyter_gpu.world_size()
torch.manual_seed(r)
net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(dev)
model = DDP(net) if w > 1 and torch.distributed.is_initialized() else net
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn({batch}, 64, device=dev)
y = torch.randint(0, 10, ({batch},), device=dev)
for step in range({steps}):
    if step == 0 and r == 0:
        print(f"FIRST_STEP {{time.time():.6f}}", flush=True)
    if step == {warmup}:
        t0 = time.perf_counter()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
if r == 0:
    rate = w * {batch} * ({steps} - {warmup}) / (time.perf_counter() - t0)
    print(f"SAMPLES_PER_S {{rate:.1f}}", flush=True)
"""


def measure(
    kernel: GpuKernel, magic: str, batch: int, steps: int, warmup: int
) -> tuple[float, float]:
    code = TRAIN.format(magic=magic, batch=batch, steps=steps, warmup=warmup)
    sent = time.time()
    out, errors = capture(kernel, code, timeout=600)
    if errors:
        raise RuntimeError(f"{magic!r} failed: {errors[0]['ename']}: {errors[0]['evalue']}")
    first = float(re.search(r"FIRST_STEP (\S+)", out).group(1)) - sent
    rate = float(re.search(r"SAMPLES_PER_S (\S+)", out).group(1))
    return first, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--virtual", default="2x16GiB", help="virtual GPUs; '' for the machine's real GPUs"
    )
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    from _common import set_virtual

    set_virtual(args.virtual or None)
    header("scaleout", args.quick)
    steps, warmup, batch = (30, 5, 256) if args.quick else (200, 20, 512)
    repeats = args.repeats or (1 if args.quick else 3)
    with Pool(args.virtual or None) as pool:
        log(f"pool started in {pool.start_s:.1f} s")
        pool.wait_spares()
        kernel = start_kernel(pool.address)
        try:
            check(kernel, "%load_ext jupyter_gpu")
            check(kernel, "%%gpu\npass")  # the notebook's own session: the 1-rank runs use it warm
            rows = []
            local = measure(
                kernel, "# anchor: the same loop in the notebook kernel", batch, steps, warmup
            )
            rows.append(["kernel, local (anchor)", f"{local[0]:.2f}", f"{local[1]:.0f}", "1.00"])
            results = {}
            for label, magic in (
                ("%%gpu --workers 1", "%%gpu --workers 1"),
                ("%%gpu --workers 2", "%%gpu --workers 2"),
            ):
                firsts, rates = [], []
                for _ in range(repeats):
                    pool.wait_spares()
                    first, rate = measure(kernel, magic, batch, steps, warmup)
                    firsts.append(first)
                    rates.append(rate)
                results[label] = (sorted(firsts)[len(firsts) // 2], sorted(rates)[len(rates) // 2])
                rows.append(
                    [
                        label,
                        f"{results[label][0]:.2f}",
                        f"{results[label][1]:.0f}",
                        f"{results[label][1] / local[1]:.2f}",
                    ]
                )
        finally:
            kernel.shutdown(now=True)
    table(
        f"Time to first training step and throughput (batch {batch}/rank, {steps} steps, median of "
        f"{repeats})",
        ["run", "first step (s)", "samples/s", "vs local"],
        rows,
    )
    one, two = results["%%gpu --workers 1"], results["%%gpu --workers 2"]
    print(
        "\n2-rank scaling efficiency (samples/s of 2 ranks / (2 x 1 rank)): "
        f"{two[1] / (2 * one[1]):.2f}"
    )
    print(f"at end: {loadavg()}")


if __name__ == "__main__":
    main()
