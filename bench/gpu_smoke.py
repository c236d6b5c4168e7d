"""Checks of the paths that need a real NVIDIA GPU: NVML inventory, pinning, the memory cap,
sharing one GPU.

    python bench/gpu_smoke.py [--gpu 0] [--quick]

On a machine where NVML finds no GPU it prints "no GPU: skipped" and exits 0. Otherwise it starts
a private embedded pool on ONE real GPU (``CUDA_VISIBLE_DEVICES=<--gpu>`` for the pool, so both
sessions below must share it; ``JUPYTER_GPU_VIRTUAL_GPUS`` is ignored here), runs two real
kernels against it, prints PASS/FAIL per check and exits 1 if any check failed:

  nvml-inventory   jupyter_gpu.common.inventory.nvml_gpus() lists the GPU(s) with a GPU-/MIG- UUID, a name and
                   memory, and the pool offers exactly the selected GPU, not virtual, with the same UUID
  session-pinned   inside a ``%%gpu --gpus 0.5`` cell: CUDA_VISIBLE_DEVICES == the leased GPU's UUID,
                   torch.cuda.device_count() == 1, and the lease's isolation is enforced (not "none")
  oom-names-lease  allocating 1.25x the lease's bytes in that session raises a CUDA out-of-memory error whose
                   message carries "[jupyter-gpu] This session holds lease L..." with the session's lease id
                   (the allocation would fit the physical GPU: the error comes from the lease's cap)
  two-sessions     a second kernel's ``%%gpu --gpus 0.5`` session runs beside the first: both leases on the same
                   GPU in gpu_snapshot, and both sessions hold ~40% of the GPU's memory at the same time
                   (torch.cuda.memory_allocated in each, and NVML's used memory >= 80% while both hold it)
  offload-cuda     (in this process, after the pool) a namespace of 1 GiB of CUDA tensors plus a model and its
                   optimizer on the GPU: a standby copy (standby.py, what an idle session writes) and
                   load_namespace bring it back on the GPU, equal and still linked; prints the GB/s of the copy
                   (GPU to host memory) and of the load (host to GPU), the rates bench/pool_sim.py charges

--quick changes nothing (the checks are already short); it exists so every bench script takes the flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import GpuKernel, Pool, capture, check, header, log, set_virtual, start_kernel

MARK = "JGPU-SMOKE "

# remote: report what the session sees (run as the first cell, so the session's CUDA is initialised
# here)
PIN_CELL = """%%gpu --gpus 0.5 --out ''
import json as _json, os as _os, torch as _torch
print({mark!r} + _json.dumps({{
    "cvd": _os.environ.get("CUDA_VISIBLE_DEVICES"),
    "lease_env": _os.environ.get("JUPYTER_GPU_LEASE"),
    "available": _torch.cuda.is_available(),
    "count": _torch.cuda.device_count(),
    "total": _torch.cuda.get_device_properties(0).total_memory if _torch.cuda.is_available() else None,
}}))
"""

# local: the lease this kernel's session holds
LEASE_CELL = """import json as _json
from jupyter_gpu.kernelext import magics as _m
print({mark!r} + _json.dumps(_m._magics.conn.session.lease, default=str))
"""

OOM_CELL = """%%gpu --out ''
import torch as _torch
_x = _torch.empty({nbytes}, dtype=_torch.uint8, device="cuda")
"""

HOLD_CELL = """%%gpu --out ''
import json as _json, torch as _torch
_held = _torch.ones({nbytes}, dtype=_torch.uint8, device="cuda")
_torch.cuda.synchronize()
print({mark!r} + _json.dumps({{"allocated": _torch.cuda.memory_allocated()}}))
"""

FREE_CELL = """%%gpu --out ''
import torch as _torch
_held = None
_torch.cuda.empty_cache()
"""


class Checks:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def record(self, name: str, ok: bool, detail: str) -> bool:
        self.results.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        return ok

    @property
    def failed(self) -> bool:
        return any(not ok for _, ok, _ in self.results)


def marked(stdout: str) -> dict | None:
    for line in stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    return None


def error_text(errors: list[dict]) -> str:
    import re

    return "\n".join(
        re.sub(
            r"\x1b\[[0-9;]*m",
            "",
            f"{e.get('ename')}: {e.get('evalue')}\n" + "\n".join(e.get("traceback") or []),
        )
        for e in errors
    )


def snapshot(address: str) -> dict:
    from distributed import Client

    from jupyter_gpu.common.security import client_security

    with Client(
        address, set_as_default=False, timeout=30, security=client_security(address)
    ) as client:
        return client.sync(client.scheduler.gpu_snapshot)


def nvml_used(uuid: str) -> tuple[int, int] | None:
    """(used, total) bytes of the GPU (or the MIG parent) with this UUID, from NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            return int(mem.used), int(mem.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - an optional extra check
        log(f"NVML memory query failed: {exc}")
        return None


def offload_cuda(checks: Checks) -> None:
    """CUDA tensors through a standby copy and back (what suspending a session on a real GPU
    moves)."""
    import tempfile

    import torch

    from jupyter_gpu.session.offload import load_namespace
    from jupyter_gpu.session.standby import StandbyCopy

    net = torch.nn.Linear(256, 256).cuda()
    ns = {
        "w": torch.randn(2**28, device="cuda"),
        "net": net,
        "opt": torch.optim.SGD(net.parameters(), lr=0.1),
    }
    nbytes = ns["w"].nbytes
    folder = tempfile.mkdtemp(
        prefix="jgpu-smoke-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    try:
        copy = StandbyCopy(os.path.join(folder, "L1.standby"), 0.0)
        copy.changed()
        copy.idle()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        written = copy.take(ns, {}, nbytes, lambda: False)
        t_copy = time.perf_counter() - t0
        moved = copy.hand_over(os.path.join(folder, "L1.pkl")) if written else None
        back: dict = {}
        t0 = time.perf_counter()
        failed = load_namespace(back, moved["path"])["failed"] if moved else ["no copy was written"]
        torch.cuda.synchronize()
        t_load = time.perf_counter() - t0
        ok = (
            not failed
            and back["w"].is_cuda
            and torch.equal(back["w"], ns["w"])
            and back["opt"].param_groups[0]["params"][0] is back["net"].weight
            and back["net"].weight.is_cuda
        )
        checks.record(
            "offload-cuda",
            ok,
            f"{nbytes / 2**30:.1f} GiB of CUDA tensors: standby copy "
            f"{nbytes / t_copy / 1e9:.2f} GB/s, load back to the GPU {nbytes / t_load / 1e9:.2f} "
            "GB/s" + (f"; failed: {failed}" if failed else ""),
        )
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--gpu", default="0", help="the GPU to test (an index or UUID for CUDA_VISIBLE_DEVICES)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="accepted for uniformity; the run is the same"
    )
    args = ap.parse_args(argv)

    from jupyter_gpu.common.inventory import nvml_gpus

    set_virtual(None)  # real GPUs only, whatever the environment says
    all_gpus = nvml_gpus()
    if not all_gpus:
        print(
            "gpu_smoke: no GPU: skipped (NVML finds no NVIDIA GPU on this machine; nothing was "
            "checked)"
        )
        return 0
    header("gpu_smoke: real-GPU checks", args.quick)
    checks = Checks()

    # ---------------------------------------------------------------- nvml-inventory
    problems = []
    for g in all_gpus:
        if not (g.uuid.startswith("GPU-") or g.uuid.startswith("MIG-")):
            problems.append(f"GPU {g.index} has UUID {g.uuid!r}")
        if g.total_bytes <= 0 or not g.name or g.virtual:
            problems.append(f"GPU {g.index} looks wrong: {g.to_dict()}")
    if len({g.uuid for g in all_gpus}) != len(all_gpus):
        problems.append("duplicate UUIDs")
    # the pool (and this process's NVML view) get one GPU
    os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    chosen = nvml_gpus()
    if len(chosen) != 1:
        problems.append(
            f"CUDA_VISIBLE_DEVICES={args.gpu} selects {len(chosen)} GPU(s), expected 1 "
            "(a GPU in MIG mode with several slices: pass one slice's MIG- UUID with --gpu)"
        )
    inventory = "; ".join(
        f"{g.index}: {g.name} {g.uuid} {g.total_bytes / 2**30:.1f} GiB" for g in all_gpus
    )
    if (
        not checks.record("nvml-inventory (NVML)", not problems, "; ".join(problems) or inventory)
        or not chosen
    ):
        return 1
    gpu = chosen[0]

    kernels: list[GpuKernel] = []
    with Pool(virtual=None) as pool:
        log(f"pool on {gpu.name} ({gpu.uuid}) up in {pool.start_s:.1f} s")
        try:
            log(f"spare sessions ready after {pool.wait_spares(timeout=300):.1f} s")
            snap = snapshot(pool.address)
            offered = [(g["uuid"], g["virtual"]) for g in snap["gpus"]]
            checks.record(
                "nvml-inventory (pool)",
                offered == [(gpu.uuid, False)],
                f"pool offers {offered}, expected [({gpu.uuid!r}, False)]",
            )

            # ---------------------------------------------------------- session-pinned
            a = start_kernel(pool.address, user="smoke-a")
            kernels.append(a)
            check(a, "%load_ext jupyter_gpu")
            out, errors = capture(a, PIN_CELL.format(mark=MARK))
            seen = marked(out)
            lease_out, lease_err = capture(a, LEASE_CELL.format(mark=MARK))
            lease_a = marked(lease_out)
            if seen is None or lease_a is None:
                checks.record(
                    "session-pinned",
                    False,
                    f"the cell failed: {error_text(errors + lease_err)[-2000:]}",
                )
                return 1
            snap = snapshot(pool.address)
            holder = next(
                (g for g in snap["gpus"] if any(ls["id"] == lease_a["id"] for ls in g["leases"])),
                None,
            )
            want_uuid = holder["uuid"] if holder else None
            iso = lease_a.get("isolation")
            ok = (
                seen["cvd"] == want_uuid == gpu.uuid
                and seen["count"] == 1
                and seen["available"]
                and seen["lease_env"] == lease_a["id"]
                and iso in ("torch-cap", "mps", "mig")
            )
            checks.record(
                "session-pinned",
                ok,
                f"lease {lease_a['id']} on {want_uuid}: CUDA_VISIBLE_DEVICES={seen['cvd']!r}, "
                f"device_count={seen['count']}, cuda available={seen['available']}, "
                f"JUPYTER_GPU_LEASE={seen['lease_env']!r}, isolation={iso!r}",
            )
            total = int(seen["total"] or gpu.total_bytes)

            # ---------------------------------------------------------- oom-names-lease
            over = min(int(lease_a["bytes"] * 1.25), int(total * 0.9))
            out, errors = capture(a, OOM_CELL.format(nbytes=over))
            text = error_text(errors)
            oom = (
                any("OutOfMemoryError" in (e.get("ename") or "") for e in errors)
                or "out of memory" in text.lower()
            )
            names = f"This session holds lease {lease_a['id']}" in text
            checks.record(
                "oom-names-lease",
                bool(errors) and oom and names,
                f"allocating {over / 2**30:.2f} GiB against a lease of "
                f"{lease_a['bytes'] / 2**30:.2f} GiB: "
                + (
                    "no error was raised (the cap is not enforced)"
                    if not errors
                    else f"{errors[0].get('ename')}, out-of-memory={oom}, names lease "
                    f"{lease_a['id']}={names}"
                ),
            )

            # ---------------------------------------------------------- two-sessions
            share = int(total * 0.4)
            out_a, err_a = capture(a, HOLD_CELL.format(nbytes=share, mark=MARK))
            b = start_kernel(pool.address, user="smoke-b")
            kernels.append(b)
            check(b, "%load_ext jupyter_gpu")
            out_b, err_b = capture(b, "%%gpu --gpus 0.5 --out ''\npass")
            out_b, err_b2 = capture(b, HOLD_CELL.format(nbytes=share, mark=MARK))
            lease_b = marked(capture(b, LEASE_CELL.format(mark=MARK))[0])
            used = nvml_used(gpu.parent_uuid or gpu.uuid) if not gpu.mig else None
            snap = snapshot(pool.address)
            held_a, held_b = marked(out_a), marked(out_b)
            on = {ls["id"]: g["uuid"] for g in snap["gpus"] for ls in g["leases"]}
            same = (
                lease_b is not None and on.get(lease_a["id"]) == on.get(lease_b["id"]) == gpu.uuid
            )
            both = (
                held_a is not None
                and held_b is not None
                and held_a["allocated"] >= share
                and held_b["allocated"] >= share
            )
            nvml_ok = used is None or used[0] >= 0.8 * total
            detail = (
                f"leases {lease_a['id']} and {(lease_b or {}).get('id')} on "
                f"{on.get(lease_a['id'])} / {on.get((lease_b or {}).get('id'))}; allocated "
                f"{(held_a or {}).get('allocated', 0) / 2**30:.2f} + "
                f"{(held_b or {}).get('allocated', 0) / 2**30:.2f} "
                f"GiB of {total / 2**30:.2f} GiB"
                + (f"; NVML used {used[0] / 2**30:.2f} GiB" if used else "")
                + (
                    f"; errors: {error_text(err_a + err_b + err_b2)[-1500:]}"
                    if (err_a or err_b or err_b2)
                    else ""
                )
            )
            checks.record("two-sessions", same and both and nvml_ok, detail)
            for k in kernels:
                capture(k, FREE_CELL)
        finally:
            for k in kernels:
                k.shutdown(now=True)
            time.sleep(0.5)

    offload_cuda(checks)
    failed = [name for name, ok, _ in checks.results if not ok]
    print(
        f"\ngpu_smoke: {len(checks.results) - len(failed)} passed, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
