"""Real work on the test pool, as notebook kernels would create it, for the panel's browser tests.

``python pool_helper.py load``  asks the broker for leases and queued requests of two users and
prints their ids as JSON; ``python pool_helper.py peak LEASE BYTES`` reports a peak memory for a
lease, as its session does after a cell (here the leases run no cells, so the test sets one);
``python pool_helper.py cancel ID...`` ends them; ``python pool_helper.py clear`` cancels every
lease and queued request of the test user (what notebook tests leave behind) and waits until the
pool holds none; ``python pool_helper.py stop`` stops the embedded pool advertised in
JUPYTER_RUNTIME_DIR (the tests' teardown). It talks to the scheduler with the same handlers the
``%%gpu`` magic and the session processes use, so the panel shows exactly what users would see.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time

log = logging.getLogger("jupyter_gpu.ui_tests.pool_helper")

ME = os.environ.get("JUPYTER_GPU_USER", "panel-tester")
OTHER = "someone-else"


async def _call(handler: str, **kwargs):
    from jupyter_gpu.common.security import pool_rpc
    from jupyter_gpu.pool.discovery import pool_address

    address = pool_address()
    if not address:
        raise SystemExit("no pool is running in JUPYTER_RUNTIME_DIR")
    async with pool_rpc(address) as r:  # the pool's TLS (the embedded pool's own certificate)
        return await getattr(r, handler)(**kwargs)


async def _until_settled(req: dict, timeout: float = 120.0) -> dict:
    """A granted lease first starts its session process ("starting"): wait until it is granted or
    fails."""
    deadline = time.monotonic() + timeout
    while req["state"] in ("starting", "queued") and time.monotonic() < deadline:
        req = await _call("gpu_wait", id=req["id"], timeout=1.0)
    return req


async def load() -> dict:
    """Two GPUs of 16 GiB: my 0.5 on one, someone else's whole GPU on the other, then two
    waiting."""
    mine = await _call(
        "gpu_request",
        user=ME,
        kernel="ui-k1",
        spec={"fraction": 0.5},
        notebook="analysis.ipynb",
        cell="train",
    )
    other = await _call(
        "gpu_request", user=OTHER, kernel="ui-k2", spec={"fraction": 1.0}, notebook="their.ipynb"
    )
    mine, other = await _until_settled(mine), await _until_settled(other)
    waiting_other = await _call("gpu_request", user=OTHER, kernel="ui-k3", spec={"fraction": 1.0})
    waiting_mine = await _call(
        "gpu_request", user=ME, kernel="ui-k4", spec={"fraction": 0.75}, notebook="analysis.ipynb"
    )
    return {
        "mine": mine,
        "other": other,
        "waiting_other": waiting_other,
        "waiting_mine": waiting_mine,
    }


async def peak(request: str, peak_bytes: int, timeout: float = 60.0) -> dict:
    """Run a cell in the session of ``request`` (granted) that holds ``peak_bytes`` of memory at
    its peak, as a kernel runs one (the session's ``execute``, with the lease's secret); the
    session measures the peak and reports it through its worker (nobody else may: issue 20). Then
    wait until the broker has it and return the lease as the broker now has it."""
    from distributed.comm import connect

    from jupyter_gpu.common.security import client_security
    from jupyter_gpu.pool.discovery import pool_address

    status = await _call("gpu_wait", id=request, timeout=1.0)
    lease = status["leases"][0]
    args = client_security(pool_address()).get_connection_args("client")
    comm = await connect(lease["address"], deserialize=False, timeout=30, **args)
    try:
        code = f"_held = bytearray({int(peak_bytes)})\n_held[::4096] = b'x' * len(_held[::4096])\n"
        code += "del _held"
        await comm.write(
            {"op": "execute", "reply": True, "secret": lease["secret"], "code": code, "inputs": {}}
        )
        while True:  # batches of output, then the cell's outcome (a dict)
            msg = await comm.read()
            if isinstance(msg, dict):
                if msg.get("status") != "ok":
                    raise SystemExit(f"the cell in {lease['id']}'s session failed: {msg}")
                break
    finally:
        await comm.close()
    deadline = time.monotonic() + timeout
    info = await _call("gpu_lease_info", lease=lease["id"])
    while (info.get("peak_bytes") or 0) < peak_bytes and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        info = await _call("gpu_lease_info", lease=lease["id"])
    return info


async def cancel(ids: list[str]) -> list:
    """Cancel each of ``ids``; one that ended meanwhile (the broker refuses: no such request) is
    reported as None rather than failing the test's teardown."""
    from jupyter_gpu.common.refusals import Refused

    done: list = []
    for i in ids:
        try:
            done.append(await _call("gpu_cancel", id=i, user=None))
        except Refused as exc:
            log.info("%s: %s", i, exc)
            done.append(None)
    return done


async def clear(user: str = ME, timeout: float = 30.0) -> list:
    """Cancel everything ``user`` holds or waits for, then wait until the broker shows none of it (a
    lease whose session is being killed is still listed for a moment). Returns the ids cancelled."""
    try:
        snap = await _call("gpu_snapshot")
    except SystemExit as exc:  # no pool: nothing to clear
        log.info("%s", exc)
        return []

    def mine(snap: dict) -> list[str]:
        leases = {ls["id"] for g in snap["gpus"] for ls in g["leases"] if ls.get("user") == user}
        return sorted(leases) + [q["id"] for q in snap["queue"] if q.get("user") == user]

    ids = mine(snap)
    await cancel(ids)  # one that ended meanwhile is passed over
    deadline = time.monotonic() + timeout
    while mine(snap) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        snap = await _call("gpu_snapshot")
    left = mine(snap)
    if left:
        raise SystemExit(f"{user} still holds {left} {timeout:.0f} s after they were cancelled")
    return ids


def stop() -> None:
    """Stop the pool the tests started (it was started with keep=True, so it would otherwise stay
    up)."""
    from jupyter_gpu.pool.launcher import stop_embedded_pool

    if stop_embedded_pool():
        log.info("stopped the tests' embedded pool")
    else:
        log.info("no embedded pool was running in %s", os.environ.get("JUPYTER_RUNTIME_DIR"))


async def _cancel_quietly(ids: list[str]) -> list:
    try:
        return await cancel(ids)
    except SystemExit as exc:  # the pool is already gone: nothing left to cancel
        log.info("%s", exc)
        return []


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    command, args = sys.argv[1], sys.argv[2:]
    if command == "load":
        json.dump(asyncio.run(load()), sys.stdout)
    elif command == "peak":
        json.dump(asyncio.run(peak(args[0], int(args[1]))), sys.stdout)
    elif command == "cancel":
        json.dump(asyncio.run(_cancel_quietly(args)), sys.stdout)
    elif command == "clear":
        json.dump(asyncio.run(clear()), sys.stdout)
    elif command == "stop":
        stop()
    else:
        raise SystemExit(
            f"unknown command {command!r}: use load, peak LEASE BYTES, cancel ID..., clear or stop"
        )


if __name__ == "__main__":
    main()
