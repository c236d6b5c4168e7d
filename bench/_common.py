"""Shared helpers for the benchmarks in bench/: pools, kernels, timing statistics and tables.

Every benchmark starts and stops what it measures (a private embedded pool advertised at a temporary
runtime file, ipyparallel and Dask clusters) so nothing is left running and no user pool is touched.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from jupyter_gpu.headless.kernel import GpuKernel

DEFAULT_VIRTUAL = "2x16GiB"


# ---------------------------------------------------------------------- statistics and printing
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "min": min(values) if values else float("nan"),
        "mean": sum(values) / len(values) if values else float("nan"),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    """Print a plain-text table (also valid Markdown)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    sys.stdout.flush()


def machine() -> str:
    try:
        import torch

        gpu = "CUDA" if torch.cuda.is_available() else "CPU only"
    except Exception:  # noqa: BLE001 - only a label
        gpu = "no torch"
    return (
        f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, {gpu}, "
        f"{platform.platform(terse=True)}"
    )


def header(name: str, quick: bool) -> None:
    print(f"== {name}{' (--quick)' if quick else ''} -- {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"   machine: {machine()}")
    print(f"   virtual GPUs: {os.environ.get('JUPYTER_GPU_VIRTUAL_GPUS') or '(none: real GPUs)'}")
    print(
        "   load average at start: "
        + ", ".join(f"{v:.2f}" for v in os.getloadavg())
        + " (other work on the machine skews every figure; anchors run interleaved with ours)"
    )
    sys.stdout.flush()


def loadavg() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def log(msg: str) -> None:
    print(f"   .. {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the jupyter-gpu pool
def set_virtual(spec: str | None) -> None:
    """Use virtual GPUs ``spec`` (e.g. 2x16GiB) for pools started from here; '' or None: the real
    GPUs."""
    if spec:
        os.environ["JUPYTER_GPU_VIRTUAL_GPUS"] = spec
    else:
        os.environ.pop("JUPYTER_GPU_VIRTUAL_GPUS", None)


class Pool:
    """A private embedded pool (its own runtime file in a temp dir), stopped on exit."""

    def __init__(self, virtual: str | None = DEFAULT_VIRTUAL):
        set_virtual(virtual)
        self.dir = tempfile.mkdtemp(prefix="jupyter-gpu-bench-")
        self.path = os.path.join(self.dir, "pool.json")
        self.address: str | None = None
        self.start_s = float("nan")

    def __enter__(self) -> Pool:
        from jupyter_gpu.pool.launcher import ensure_embedded_pool

        t0 = time.perf_counter()
        # keep=True: the pool must not shut itself down between phases while no client is connected
        self.address = ensure_embedded_pool(timeout=120, keep=True, path=self.path)
        self.start_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        from jupyter_gpu.pool.launcher import stop_embedded_pool

        stop_embedded_pool(self.path)
        if exc[0] is None:  # keep the pool's log (in self.dir) when something failed
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            log(f"the pool's log is kept at {self.dir}/pool.log")

    def wait_spares(self, timeout: float = 120.0) -> float:
        """Wait until every worker can start a session warm (its zygote has imported torch, or its
        spare session process is up); return the seconds waited."""
        from distributed import Client

        from jupyter_gpu.common.security import client_security

        t0 = time.perf_counter()
        with Client(
            self.address, set_as_default=False, timeout=30, security=client_security(self.address)
        ) as client:
            while True:
                ready = {
                    w: client.sync(client.rpc(w).gpu_session_starter)["ready"]
                    for w in client.scheduler_info()["workers"]
                }
                if ready and all(ready.values()):
                    return time.perf_counter() - t0
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"spare sessions not ready after {timeout:.0f} s: {ready}")
                time.sleep(0.1)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until the broker holds no lease (a kernel that went away has been cleaned up)."""
        from distributed import Client

        from jupyter_gpu.common.security import client_security

        t0 = time.perf_counter()
        with Client(
            self.address, set_as_default=False, timeout=30, security=client_security(self.address)
        ) as client:
            while True:
                snap = client.sync(client.scheduler.gpu_snapshot)
                if not any(g["leases"] for g in snap["gpus"]):
                    return
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError("leases still held after the kernels went away")
                time.sleep(0.1)


def _by_value() -> None:
    """Ship this module's functions to workers by value (they cannot import ``_common``)."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


_by_value()


# ---------------------------------------------------------------------- real kernels
def start_kernel(pool: str | None, user: str | None = None, env: dict | None = None) -> GpuKernel:
    """A started real IPython kernel pointed at ``pool``, *without* ``%load_ext`` (the benchmarks
    time it).

        The project's one kernel driver (:class:`jupyter_gpu.headless.kernel.GpuKernel`, as in the
        tests): ``kernel.start_s`` is its start-up time, ``check(kernel, code)`` times a cell from
        ``kc.execute`` to the idle status, ``kernel.run(code)`` returns its outputs,
        ``kernel.shutdown(now=True)`` ends it.
    """
    return GpuKernel(pool, user=user, env=env, load_extension=False).start()


def check(kernel: GpuKernel, code: str, timeout: float = 120) -> float:
    """Run ``code``; return the seconds from ``kc.execute`` to the idle status; raise if the cell
    raised.

        Outputs are not parsed (``record=False``): only the idle status and the execute reply are
        read.
    """
    res = kernel.run(code, timeout, record=False)
    if res.status != "ok":
        raise RuntimeError(f"cell failed: {code!r}: {res.ename}: {res.evalue}")
    return res.elapsed


def run_at_once(kernels: list[GpuKernel], code: str, timeout: float = 600) -> list[Any]:
    """``code`` sent to every kernel at the same moment, then each reply collected in a thread of
    its own (so that no kernel's cell waits for another's to be read): the replies, in order."""
    results: list[Any] = [None] * len(kernels)
    msgs = [k.submit(code) for k in kernels]

    def collect(i: int) -> None:
        results[i] = kernels[i].collect(msgs[i], timeout=timeout, record=False)

    threads = [threading.Thread(target=collect, args=(i,)) for i in range(len(kernels))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def capture(kernel: GpuKernel, code: str, timeout: float = 180) -> tuple[str, list[dict]]:
    """Run ``code``; return (its stdout text, its error outputs: nbformat dicts with ename, evalue,
    traceback)."""
    res = kernel.run(code, timeout)
    return res.stdout, [o for o in res.log if o["output_type"] == "error"]


def time_cells(run: Any, code: str, n: int, warmup: int) -> list[float]:
    """Time ``run(code)`` n times after ``warmup`` untimed runs; ``run`` returns seconds or None."""
    for _ in range(warmup):
        run(code)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = run(code)
        out.append(r if isinstance(r, float) else time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------- in-process IPython
def shell_with_extension(address: str) -> Any:
    """An in-process IPython InteractiveShell with jupyter_gpu loaded, pointed at ``address``."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    os.environ["JUPYTER_GPU_SCHEDULER"] = address
    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=cfg)
    shell.run_line_magic("load_ext", "jupyter_gpu")
    return shell


def run_cell_checked(shell: Any, code: str) -> None:
    result = shell.run_cell(code, silent=False, store_history=True)
    if not result.success:
        raise RuntimeError(
            f"cell failed: {code!r}: {result.error_before_exec or result.error_in_exec!r}"
        )


# ---------------------------------------------------------------------- anchors
@contextlib.contextmanager
def ipp_cluster(quiet: bool = True) -> Iterator[tuple[Any, Any, str]]:
    """An in-process-managed ipyparallel cluster with one engine: (cluster, client, client url
    file)."""
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=1, log_level=40)
    client = cluster.start_and_connect_sync()
    try:
        client.wait_for_engines(1, timeout=120)
        url = os.path.join(
            cluster.profile_dir, "security", f"ipcontroller-{cluster.cluster_id}-client.json"
        )
        yield cluster, client, url
    finally:
        with contextlib.suppress(Exception):
            client.close()
        cluster.stop_cluster_sync()


@contextlib.contextmanager
def dask_local_cluster() -> Iterator[Any]:
    """A Dask LocalCluster with one worker process (one thread) and a client to it."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            host="127.0.0.1",
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.wait_for_workers(1)
        yield client
