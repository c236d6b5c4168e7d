"""A rolling upgrade of a pool across machines (docs/administration.md, "Draining a worker, and
rolling upgrades"): each GPU host's `jupyter-gpu worker` stopped as systemd stops it (SIGTERM to
the service), which drains it, then started again, one host after the other, while two users keep
running cells. Nothing is lost: every session's variables (kept only on the pool: ``--out`` sends
back nothing else) are there at the end, and no cell fails.

Prints what the issue asks for: sessions kept and lost, cells failed, the longest a cell took.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.system.multihost.hostpool import HostPool
from tests.system.multihost.hosts import Hosts, missing_tools, sweep_stale

pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]

WORKERS = {"w1": "1x4GiB", "w2": "1x4GiB"}
SETUP = (
    "%%gpu --gpus 0.25 --out ready\nimport socket, torch\nn = 0\nhist = []\n"
    "big = torch.zeros(2**18)\nready = socket.gethostname()"
)
STEP = (
    "%%gpu --gpus 0.25 --out step\nn += 1\nhist.append(n)\nbig += 1\n"
    "step = (n, socket.gethostname())\nprint('step', n, 'on', step[1], flush=True)"
)
CHECK = (
    "%%gpu --gpus 0.25 --out final\n"
    "final = (n, hist == list(range(1, n + 1)), float(big[0]))\nprint('final', final)"
)


@pytest.fixture(scope="module")
def hosts():
    why = missing_tools()
    if why:
        pytest.skip(why)
    sweep_stale()
    with Hosts(["pool", *WORKERS, "desk"]) as made:
        yield made


@pytest.fixture(scope="module")
def hpool(hosts):
    pool = HostPool(
        hosts,
        scheduler="pool",
        workers=WORKERS,
        client="desk",
        scheduler_env={"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "10s"},
    )
    try:
        yield pool.start()
    finally:
        pool.stop()


@dataclass
class User:
    """One user running cells in a loop on a thread of its own; what each cell did."""

    name: str
    kernel: object
    done: int = 0
    failed: list[str] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            res = self.kernel.run(STEP, timeout=600)
            self.waits.append(time.monotonic() - started)
            if res.error is not None:
                self.failed.append(res.error_text[-2000:] + res.stdout[-2000:])
            else:
                self.done += 1
                found = re.search(r"step (\d+) on (\S+)", res.stdout)
                if found:
                    self.hosts.append(found.group(2))
                self.notes += [ln for ln in res.stdout.splitlines() if "[jupyter-gpu]" in ln]
            time.sleep(0.3)


def _worker_of(hpool: HostPool, host: str) -> str | None:
    ip = hpool.hosts[host].ip
    return next((g["worker"] for g in hpool.gpus() if f"//{ip}:" in g["worker"]), None)


def _wait_cells(users: list[User], more: int, timeout: float, hpool: HostPool) -> None:
    goal = {u.name: u.done + len(u.failed) + more for u in users}
    hpool.wait_for(
        lambda: all(u.done + len(u.failed) >= goal[u.name] for u in users),
        timeout,
        f"{more} more cells of each user",
    )


def test_every_worker_host_upgraded_in_turn_while_two_users_work_loses_nothing(hpool):
    users = [User(name, hpool.kernel(name)) for name in ("alice", "bob")]
    for u in users:
        res = u.kernel.run(SETUP, timeout=300)
        assert res.error is None, res.error_text + hpool.logs()
    stop = threading.Event()
    threads = [threading.Thread(target=u.loop, args=(stop,), daemon=True) for u in users]
    for t in threads:
        t.start()
    drains = []
    try:
        _wait_cells(users, 3, 300, hpool)
        for host in WORKERS:  # the rolling upgrade: one host after the other
            before = _worker_of(hpool, host)
            proc = hpool.worker_procs[host]
            os.kill(proc.pid, signal.SIGTERM)  # `systemctl restart`: SIGTERM to the service only
            assert proc.wait(400) == 0, hpool.hosts.log(host, "worker")
            hpool.start_worker(host)  # the upgraded service
            hpool.wait_for(
                lambda host=host, before=before: (
                    _worker_of(hpool, host) not in (None, before) and len(hpool.gpus()) == 2
                ),
                180,
                f"{host}'s worker back",
            )
            _wait_cells(users, 3, 300, hpool)
            drains += re.findall(
                r"drained in ([\d.]+) s: (\d+) session\(s\) moved .*?, (\d+) ended",
                hpool.hosts.log(host, "worker", tail=200_000),
            )
    finally:
        stop.set()
        for t in threads:
            t.join(660)
    finals = {}
    for u in users:
        res = u.kernel.run(CHECK, timeout=300)
        assert res.error is None, res.error_text
        found = re.search(r"final \((\d+), (True|False), ([\d.]+)\)", res.stdout)
        assert found, res.stdout
        finals[u.name] = (int(found.group(1)), found.group(2) == "True", float(found.group(3)))
    kept = [
        u.name
        for u in users
        if finals[u.name] == (u.done, True, float(u.done))  # every step, in order, in one state
    ]
    failed = sum(len(u.failed) for u in users)
    longest = max(w for u in users for w in u.waits)
    moved = sum(int(m) for _, m, _ in drains)
    ended = sum(int(e) for _, _, e in drains)
    print(
        f"\nrolling upgrade of {len(WORKERS)} worker hosts, 2 users: sessions kept "
        f"{len(kept)}, lost {len(users) - len(kept)}; cells run {sum(u.done for u in users)}, "
        f"failed {failed}; longest cell {longest:.1f} s (median "
        f"{sorted(w for u in users for w in u.waits)[len(users[0].waits)]:.2f} s); drains: "
        f"{', '.join(f'{float(s):.1f} s, {m} moved, {e} ended' for s, m, e in drains)}"
    )
    for u in users:
        print(f"  {u.name}: hosts {' '.join(dict.fromkeys(u.hosts))}; told: {u.notes}")
    assert len(drains) == len(WORKERS), drains
    assert failed == 0, [f for u in users for f in u.failed]
    assert len(kept) == len(users), (finals, {u.name: u.done for u in users})
    assert moved >= len(users) and ended == 0, drains
    for u in users:
        assert any("Your session moved from worker " in n for n in u.notes), u.notes
