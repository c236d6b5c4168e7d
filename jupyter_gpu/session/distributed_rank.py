"""One rank of a ``%%gpu --workers N`` run, inside its session process.

Before the cell: the torch.distributed environment (MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE),
the process group (nccl on real GPUs, gloo on CPU and virtual GPUs) with a start-up time limit, and
the cell's inputs, which the kernel sends to rank 0 only and rank 0 broadcasts to the others. During
the cell: ``jupyter_gpu.report`` metrics are batched to the broker (through the worker), which keeps
the run's stream for the panel. After the cell, whatever happened: the process group is destroyed.

The rendezvous store of rank 0 (``session/rendezvous_store.py``) listens on the socket its session
made when the kernel asked for a port (``server.free_port``): on the address the ranks use, not on
every interface, and from before the port was handed out. It answers only connections that prove,
by a challenge, that they know the run's secret (``store_key``, made by the kernel per attempt and
sent to each rank over its secret-checked comm): another account of the machine that connects reads
and writes nothing. gloo's (or NCCL's) own traffic between the ranks is not authenticated by torch
(docs/security.md, "What is not covered").
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import threading
import time
from typing import Any

from jupyter_gpu.session import api as session_api
from jupyter_gpu.session.worker_link import WorkerLink

log = logging.getLogger(__name__)

# seconds rank 0 of a run whose cell failed on it waits for the other ranks to let go of the store
LEAVE_AFTER_FAILURE = 2.0


def route_interface(peer: str) -> str | None:
    """The name of the network interface this machine uses to reach ``peer`` (an IP address), or
    None.

        Why: gloo binds to the address its host name resolves to, and on a machine whose name
        resolves to a loopback address (Debian's ``127.0.1.1``) or to nothing, it falls back to
        ``127.0.0.1``, which the other machines' ranks cannot reach: a run with ranks on two hosts
        then never starts. The interface that routes to rank 0 is the one every rank of the run can
        use (on one machine, that is loopback).
    """
    import socket

    import psutil

    try:
        with socket.socket(
            socket.AF_INET6 if ":" in peer else socket.AF_INET, socket.SOCK_DGRAM
        ) as sock:
            sock.connect((peer, 9))  # UDP: nothing is sent, the kernel only picks the route
            local = sock.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == local for a in addresses):
            return name
    return None


def _pin_interface(backend: str, master_addr: str) -> None:
    """Point gloo (or NCCL's socket bootstrap) at the interface that reaches rank 0, unless the
    admin chose one (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` in the workers'
    environment)."""
    variable = "GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME"
    if os.environ.get(variable):
        return
    name = route_interface(master_addr)
    if name is not None:
        os.environ[variable] = name
        log.info("%s=%s (the interface that reaches rank 0 at %s)", variable, name, master_addr)


class DistributedRun:
    """Sets up and tears down one rank; see the module docstring."""

    def __init__(self, dist: dict, gpus: list[dict], link: WorkerLink, listen: Any = None):
        self.dist, self.gpus, self.link = dist, gpus, link
        self.listen = listen  # rank 0: the store's listening socket (server.free_port)
        self.rank, self.world_size = int(dist["rank"]), int(dist["world_size"])
        self._buffer: list[dict] = []
        self._lock = threading.Lock()
        self._flusher: Any = None
        self._group = False
        self._server: Any = None  # rank 0: the rendezvous store it serves
        self._client: Any = None  # this rank's connection to it

    def start(self, inputs: dict) -> dict:
        import torch
        import torch.distributed as torch_dist

        d = self.dist
        virtual = all(g.get("virtual") for g in self.gpus) if self.gpus else True
        backend = "nccl" if (not virtual and torch.cuda.is_available()) else "gloo"
        os.environ.update(
            {
                "MASTER_ADDR": d["master_addr"],
                "MASTER_PORT": str(d["master_port"]),
                "RANK": str(self.rank),
                "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": "0",  # each rank sees only its own GPU, as device 0
                "JUPYTER_GPU_CHECKPOINT_DIR": d.get("checkpoint_dir") or "",
            }
        )
        if backend == "nccl":
            torch.cuda.set_device(0)
        _pin_interface(backend, d["master_addr"])
        timeout = float(d.get("startup_timeout", 60))
        started = time.monotonic()
        try:
            torch_dist.init_process_group(
                backend,
                store=self._store(datetime.timedelta(seconds=timeout)),
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=timeout),
            )
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes one clear error
            raise RuntimeError(
                f"rank {self.rank} could not join the process group ({backend}, {d['master_addr']}:"
                f"{d['master_port']}) within {timeout:.0f} s: {type(exc).__name__}: {exc}"
            ) from None
        self._group = True
        log.info(
            "rank %d/%d joined %s in %.2f s",
            self.rank,
            self.world_size,
            backend,
            time.monotonic() - started,
        )
        session_api._state.update(
            {
                "rank": self.rank,
                "world_size": self.world_size,
                "attempt": int(d.get("attempt", 0)),
                "run": d.get("run"),
                "run_sink": self._collect,
            }
        )
        self._flusher = asyncio.run_coroutine_threadsafe(self._flush_forever(), self.link.loop)
        return self._broadcast(inputs)

    def _store(self, timeout: datetime.timedelta) -> Any:
        """The run's rendezvous store (see the module docstring): rank 0 serves it on the socket
        its session made, to connections that prove they know the run's secret; every rank,
        rank 0 included, is a client of it."""
        from jupyter_gpu.session.rendezvous_store import RunStore, StoreServer

        d = self.dist
        secret = str(d.get("store_key") or "").encode()
        if not secret:
            raise RuntimeError("this run has no store secret (the kernel sends one per attempt)")
        host, port = d["master_addr"], int(d["master_port"])
        if self.listen is not None:
            listen, self.listen = self.listen, None  # the store's from now on
            self._server = StoreServer(listen, secret)
        self._client = RunStore(host, port, secret, timeout)
        return self._client

    def _broadcast(self, inputs: dict) -> dict:
        """Rank 0 holds the inputs as the kernel serialized them; every other rank gets the same
        bytes."""
        import torch.distributed as torch_dist
        from distributed.protocol.serialize import Serialized

        packed = [
            {name: (item.header, [bytes(f) for f in item.frames]) for name, item in inputs.items()}
            if self.rank == 0
            else None
        ]
        torch_dist.broadcast_object_list(packed, src=0)
        received = packed[0]
        assert received is not None  # the broadcast filled it on every rank
        return {name: Serialized(header, frames) for name, (header, frames) in received.items()}

    def _collect(self, msg: dict) -> None:
        with self._lock:
            self._buffer.append({k: msg.get(k) for k in ("step", "time", "metrics")})

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self._flush()

    async def _flush(self) -> None:
        with self._lock:
            items, self._buffer = self._buffer, []
        if not items or not self.link.connected:
            return
        try:
            self.link.tell("run_metrics", run=self.dist.get("run"), rank=self.rank, items=items)
        except Exception as exc:  # noqa: BLE001 - the panel misses a beat; training never waits for it
            log.debug("could not send metrics: %s", exc)

    def _take_leave(self, clean: bool, timeout: float) -> None:
        """Count this rank out at the rendezvous store, in an order that leaves the store to rank
        0 until the last: every rank counts itself in (``arrived``); a rank whose cell succeeded
        waits (bounded) until all have, so that no rank leaves its last collective early and
        closes connections a peer still finishing it needs; then every other rank says it is
        done with the store (``left``) and touches it no more, and rank 0 waits (bounded) for
        them before its group, and with it the store, goes.

            Why: the store is served by rank 0's process. A rank still asking it whether everyone
            had arrived when rank 0 destroyed it printed some 30 lines of a C++ "TCPStore
            recvValue failed ... Connection was likely closed" stack into the cell (whenever rank
            0 happened to finish last). The store is not the process group's transport, so this
            never interferes with a collective."""
        try:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
            key = f"jupyter-gpu/teardown/{self.dist.get('run')}/{self.dist.get('attempt', 0)}"
            arrived, left = f"{key}/arrived", f"{key}/left"
            store.add(arrived, 1)
            deadline = time.monotonic() + timeout
            if clean:
                while store.add(arrived, 0) < self.world_size and time.monotonic() < deadline:
                    time.sleep(0.02)
            if self.rank != 0:
                store.add(left, 1)  # the last time this rank uses the store
                return
            if not clean:  # this cell failed: wait only briefly for the others to let go
                deadline = min(deadline, time.monotonic() + LEAVE_AFTER_FAILURE)
            while store.add(left, 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        except Exception as exc:  # noqa: BLE001 - a peer failed or the store is gone: nothing to wait for
            log.debug("teardown rendezvous: %s", exc)

    def stop(self, clean: bool = False) -> None:
        """Tear down: the last metrics, then leave the rendezvous store in order
        (:meth:`_take_leave`: after a cell that succeeded on this rank, first wait, bounded, for
        every rank to get here), then destroy the process group."""
        if self.listen is not None:  # the run never got as far as its store
            self.listen.close()
            self.listen = None
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                asyncio.run_coroutine_threadsafe(self._flush(), self.link.loop).result(5)
            except Exception:  # noqa: BLE001 - the last metrics are best effort: tear down anyway
                pass
        session_api._state.update({"run_sink": None, "attempt": 0, "run": None})
        if self._group:
            import torch.distributed as torch_dist

            self._take_leave(clean, timeout=30.0)
            try:
                torch_dist.destroy_process_group()
            except Exception as exc:  # noqa: BLE001 - a broken group is torn down anyway
                log.debug("destroy_process_group: %s", exc)
            self._group = False
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None:
            self._server.close()
            self._server = None
