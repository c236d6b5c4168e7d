"""Test harness: a real embedded pool and real IPython kernels (jupyter_client), with their outputs
collected.

Kernels are the project's one kernel driver, :class:`jupyter_gpu.headless.kernel.GpuKernel` (the
same that users' tests get as ``gpu_kernel`` and the benchmarks use); nothing here stands in for a
real part.
"""

from __future__ import annotations

import time

from jupyter_gpu.headless.kernel import CellResult, GpuKernel, KernelCellError, strip_ansi

__all__ = [
    "CellResult",
    "GpuKernel",
    "Kernel",
    "KernelCellError",
    "leases",
    "session_starters",
    "snapshot",
    "strip_ansi",
    "wait_until",
]


def Kernel(
    pool: str | None, user: str | None = None, load: bool = True, env: dict | None = None
) -> GpuKernel:
    """A started :class:`GpuKernel` with ``%load_ext jupyter_gpu`` run, acting for ``user``: the
    harness's defaults (tests call ``run``, which never raises for a cell's error, and
    ``shutdown(now=True)``, which leaves freeing the kernel's leases to the broker, so that tests
    can check it does)."""
    return GpuKernel(pool, user=user, env=env, load_extension=load).start()


def snapshot(pool: str) -> dict:
    """The broker's view of the pool, read through its scheduler handler (with the pool's TLS: an
    embedded pool's own certificate is found from its address, see ``client_security``)."""
    import asyncio

    from jupyter_gpu.common.security import pool_rpc

    async def go() -> dict:
        async with pool_rpc(pool) as r:
            return await r.gpu_snapshot()

    return asyncio.run(go())


def session_starters(pool: str) -> dict[str, dict]:
    """Each worker's ``gpu_session_starter``: how it starts sessions (its zygote's pid) and whether
    it is warm."""
    import asyncio

    from jupyter_gpu.common.security import client_security, pool_rpc

    workers = sorted({g["worker"] for g in snapshot(pool)["gpus"]})

    async def go() -> dict[str, dict]:
        out = {}
        for address in workers:
            async with pool_rpc(address, security=client_security(pool)) as r:
                out[address] = await r.gpu_session_starter()
        return out

    return asyncio.run(go())


def leases(pool: str) -> list[dict]:
    return [ls for g in snapshot(pool)["gpus"] for ls in g["leases"]]


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds (polled): a bound for a hung
    pool, wide enough for a loaded 2-core machine; a test that passes returns as soon as it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def worker_pid(address: str) -> int:
    """The pid of the process that listens at a worker's comm ``address`` (as the machine's admin
    sees it: a GPU worker answers no ``run`` to find out; docs/security.md)."""
    import psutil
    from distributed.comm import get_address_host_port

    host, port = get_address_host_port(address)
    for conn in psutil.net_connections(kind="tcp"):
        if (
            conn.status == psutil.CONN_LISTEN
            and conn.laddr
            and conn.laddr.port == port
            and conn.pid
        ):
            return conn.pid
    raise LookupError(f"nothing listens at {address}")


def own_lease(kernel: GpuKernel) -> dict:
    """The kernel's own session's lease, as the broker gave it to that kernel (with its address and
    secret: the snapshot shows other users neither)."""
    import json

    res = kernel.run(
        "import json as _json\n"
        "print(_json.dumps(get_ipython().find_magic('gpu').__self__.conn.session.lease))"
    )
    return json.loads(res.stdout)
