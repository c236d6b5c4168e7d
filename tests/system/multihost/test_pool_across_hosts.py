"""A pool across machines: ``pool up`` on one host, ``jupyter-gpu worker`` on three others (one
virtual 4 GiB GPU each), kernels on a fifth, every host a network, mount and UTS namespace with
its own address, ``/dev/shm`` and ``/tmp`` (``hosts.py``), joined only by a bridge; the pool key
copied to each worker host.

- cells run on another machine and their outputs, displays, errors and values come back;
- the snapshot groups GPUs by host (what the panel draws);
- a session suspended on one host (its variables in that host's ``/dev/shm``) is restored on another: the
  new worker fetches the copy from the old one, over the network, with the pool key;
- ``%%gpu --workers 2`` puts its ranks on two hosts (gloo over the veth links) and reports each rank's
  progress while it trains;
- a host cut off (its link down) and a host killed mid-training: the run resumes from its last
  ``jupyter_gpu.checkpoint`` on the remaining hosts (the checkpoint folder is storage every host sees).
"""

from __future__ import annotations

import time

import pytest

from tests.system.multihost.hostpool import hosts_of

pytestmark = pytest.mark.system

TRAIN = """%%gpu --workers 2 --gpus 1 --name {name}
import os, socket, time, torch, jupyter_gpu, torch.distributed as dist
state = jupyter_gpu.restore(default={{'step': -1}})
if jupyter_gpu.rank() == 0 and state['step'] >= 0:
    print(f"resumed at step {{state['step']}} on {{socket.gethostname()}}", flush=True)
print(f"rank {{jupyter_gpu.rank()}} on {{socket.gethostname()}}", flush=True)
w = torch.zeros(1)
for step in range(state['step'] + 1, {steps}):
    grad = torch.ones(1) * (jupyter_gpu.rank() + 1)
    dist.all_reduce(grad)               # gloo, across the hosts
    w += grad
    jupyter_gpu.checkpoint({{'step': step}})
    jupyter_gpu.report(step=step, total={steps}, loss=1.0 / (step + 1))
    if jupyter_gpu.rank() == 0:
        print(f"step {{step}}", flush=True)
    time.sleep({pause})
final = step
"""


def rank_hosts(pool, name: str) -> list[str]:
    leases = [
        ls
        for ls in pool.leases()
        if ls["world_size"] == 2 and (ls.get("cell") or "").startswith(name)
    ]
    return hosts_of(pool, leases)


def wait_ranks(pool, name: str, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hosts = rank_hosts(pool, name)
        if len(hosts) == 2:
            return hosts
        time.sleep(0.2)
    raise AssertionError(f"the ranks of {name} did not show in the snapshot\n{pool.logs()}")


def test_cells_run_on_another_machine_and_their_outputs_come_back(hpool):
    k = hpool.kernel()
    try:
        k.execute(
            "import numpy as np\nlocal = np.arange(6)\nimport socket\nmine = socket.gethostname()"
        )
        res = k.run(
            "%%gpu --gpus 1\nimport os, socket\nfrom IPython.display import HTML, display\n"
            "there = socket.gethostname()\nshm = sorted(os.listdir('/dev/shm'))\n"
            "print('on', there, 'sum', int(local.sum()))\ndisplay(HTML('<b>remote</b>'))\n"
            "doubled = local * 2\nthere"
        )
        assert res.error is None, res.error_text + hpool.logs()
        there = res.stdout.split()[1]
        assert there in ("w1", "w2", "w3") and "sum 15" in res.stdout
        assert "<b>remote</b>" in res.data("text/html") and res.result == repr(there)
        assert (
            k.run("print(doubled.tolist(), mine != there)").stdout == "[0, 2, 4, 6, 8, 10] True\n"
        )
        err = k.run(
            "%%gpu --gpus 1\ndef f():\n    raise ValueError('from ' + socket.gethostname())\nf()"
        )
        assert err.error["ename"] == "ValueError" and err.error["evalue"] == f"from {there}"
        # the cell's own line
        assert "raise ValueError('from ' + socket.gethostname())" in err.error_text
        lease = next(ls for ls in hpool.leases() if ls["kernel"] == k.kernel_id)
        assert hpool.host_of(lease["worker"]) == there
    finally:
        k.stop()


def test_the_snapshot_groups_gpus_by_host(hpool, hosts):
    snap = hpool.snapshot()
    workers = {hosts[name].ip: name for name in ("w1", "w2", "w3")}
    assert [h["host"] for h in snap["hosts"]] == sorted(
        workers, key=lambda ip: int(ip.rsplit(".", 1)[1])
    )
    for h in snap["hosts"]:
        assert h["workers"] == 1 and h["total_bytes"] == 4 * 2**30 and len(h["gpus"]) == 1
    assert [g["host"] for g in snap["gpus"]] == [h["host"] for h in snap["hosts"]]
    assert all(g["worker"].startswith(f"tcp://{g['host']}:") for g in snap["gpus"])


def test_a_session_suspended_on_one_host_is_restored_on_another(hpool, hosts):
    alice, bob, carol = hpool.kernel("alice"), hpool.kernel("bob"), hpool.kernel("carol")
    flag = hosts.shared / "bob-may-stop"
    try:
        res = alice.run(
            "%%gpu --gpus 1\nimport socket, torch\nwhere = socket.gethostname()\n"
            "big = torch.arange(32 * 2**20 // 4, dtype=torch.float32)\nnotes = {'epoch': 3}\nwhere"
        )
        assert res.error is None, res.error_text
        first = res.result.strip("'")
        # bob's two ranks hold the two other hosts' GPUs until the test lets them stop
        bob_run = bob.submit(
            f"%%gpu --workers 2 --gpus 1\nimport os, time\nprint('bob holds', flush=True)\n"
            f"while not os.path.exists({str(flag)!r}):\n    time.sleep(0.2)"
        )
        bob.wait_for_output(bob_run, "bob holds", timeout=120)
        time.sleep(3)  # alice has been idle longer than suspend-idle-after (2 s)
        res = carol.run("%%gpu --gpus 1\nimport socket\nprint(socket.gethostname())", timeout=120)
        # alice's GPU
        assert res.error is None and res.stdout.strip() == first, res.stdout + res.error_text
        parked = [p for p in hpool.snapshot()["in_host_memory"] if p["user"] == "alice"]
        assert parked and parked[0]["state"] == "saved" and "big" in parked[0]["saved"], parked
        flag.touch()
        assert bob.collect(bob_run, timeout=60).error is None
        # alice's next cell: her GPU is carol's now, so it lands on another host and fetches her
        # variables
        started = time.monotonic()
        res = alice.run(
            "%%gpu --gpus 1\nimport socket\nprint(where, socket.gethostname(), float(big[-1]), "
            "notes)",
            timeout=120,
        )
        took = time.monotonic() - started
        assert res.error is None, res.error_text + hpool.logs()
        was, now, last, notes = res.stdout.splitlines()[-1].split(" ", 3)
        assert was == first and now != first and now in ("w1", "w2", "w3"), res.stdout
        assert float(last) == float(32 * 2**20 // 4 - 1) and "'epoch': 3" in notes
        assert (
            "suspended after" in res.stdout
            and "Restored 5 variable(s) from host memory" in res.stdout
        )
        print(f"restore of a 32 MiB namespace across hosts: {took:.2f} s")
    finally:
        flag.touch()
        for k in (alice, bob, carol):
            k.stop(now=True)


def test_two_ranks_train_on_two_hosts_with_live_progress_per_rank(hpool):
    k = hpool.kernel()
    try:
        msg = k.submit(TRAIN.format(name="across", steps=16, pause=0.4))
        # what the cell showed before it ended
        early = k.wait_for_output(msg, "step 3", timeout=120)
        hosts = wait_ranks(hpool, "across")
        assert len(set(hosts)) == 2, hosts  # one rank per host: the all_reduce crosses the bridge
        # while it trains, each rank's metrics grow in the pool's run record (what the panel draws)
        # ...
        seen = []
        for _ in range(2):
            run = next(r for r in hpool.snapshot()["runs"] if r["id"].startswith("across"))
            assert run["state"] == "running" and set(run["ranks"]) == {"0", "1"}, run
            seen.append(len(run["ranks"]["1"]))
            time.sleep(1.5)
        assert 0 < seen[0] < seen[1], seen
        res = k.collect(msg, timeout=120)
        assert res.error is None, res.error_text + hpool.logs()
        assert k.run("print(final)").stdout == "15\n"
        assert (
            f"rank 0 on {hosts[0]}" in early.stdout
            and f"[rank 1] rank 1 on {hosts[1]}" in early.stdout
        )
        # ... and the cell's progress display showed rank 1 before the cell ended, and its last step
        # at the end
        assert any("rank 1:" in d for d in early.data() if not d.startswith("%%gpu")), early.data()
        assert any("rank 1:" in d and "16" in d.split("rank 1:")[1] for d in res.data()), res.data()
        run = next(r for r in hpool.snapshot()["runs"] if r["id"].startswith("across"))
        assert run["state"] == "done" and len(run["ranks"]["1"]) == 16
    finally:
        k.stop(now=True)


def all_hosts_up(hpool, hosts) -> None:
    """A host a previous test took away comes back: its link up, the machine "rebooted" (a fresh
    worker)."""
    up = {hpool.host_of(g["worker"]) for g in hpool.gpus()}
    for name in hpool.workers:
        if name not in up:
            hosts.power_off(name)
            hosts.reconnect(name)
            hpool.start_worker(name)
    hpool.wait_for(lambda: len(hpool.gpus()) == len(hpool.workers), 120, "every worker host")


@pytest.mark.parametrize("failure", ["cut", "power_off"])
def test_training_resumes_on_the_other_hosts_when_a_host_is_lost(hpool, hosts, failure):
    all_hosts_up(hpool, hosts)
    k = hpool.kernel()
    try:
        msg = k.submit(TRAIN.format(name=f"lose-{failure}", steps=20, pause=0.25))
        k.wait_for_output(msg, "step 4", timeout=120)
        lost = wait_ranks(hpool, f"lose-{failure}")[1]  # rank 1's host
        getattr(hosts, failure)(lost)  # its link down, or every process on it killed
        res = k.collect(msg, timeout=180)
        assert res.error is None, res.stdout + res.error_text + hpool.logs()
        assert "rank 1's session was lost" in res.stdout and "retry 1 of" in res.stdout, res.stdout
        resumed = res.stdout.split("resumed at step ")[1]
        step, where = int(resumed.split()[0]), resumed.split()[2]
        # from the last checkpoint, on a remaining host
        assert step >= 4 and where != lost, res.stdout
        assert k.run("print(final)").stdout == "19\n"
        assert lost not in {hpool.host_of(g["worker"]) for g in hpool.gpus()}
    finally:
        k.stop(now=True)
