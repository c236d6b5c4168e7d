"""Fair share in a real pool (2 virtual 16 GiB GPUs) with quotas, tokens and an audit database, and
real kernels of several users: guarantees honoured by reclaiming borrowed capacity,
another user's cancel refused, and audit rows that outlive the scheduler."""

from __future__ import annotations

import asyncio
import glob
import os
import subprocess
import sys

import pytest

from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.identity import TokenStore
from jupyter_gpu.common.refusals import NotAuthorized
from tests.support.harness import GpuKernel, Kernel, leases, wait_until

pytestmark = pytest.mark.integration

QUOTAS = """
reserve-after: 5s
min-run-time: 0s
teams:
  ml:  {guarantee: 1.0, members: [alice, bob]}
  viz: {guarantee: 1.0, limit: 1.5, members: [carol]}
"""
ENV = {
    "DASK_JUPYTER_GPU__POOL_CONFIG": "pool.yaml",
    "DASK_JUPYTER_GPU__AUDIT_DB": "audit.sqlite",
    "DASK_JUPYTER_GPU__TOKEN_FILE": "tokens.json",
}
# fair share is what these pools test: their users' sessions run as the pool's account (alice, bob
# and carol have no accounts here); sessions as their users are tests/system/security/'s
AS_POOL = {"DASK_JUPYTER_GPU__SESSION__AS_USER": "false"}


class QuotaPool:
    """A pool process of its own, started with the quota, audit and token settings in its
    environment."""

    def __init__(self, root, quotas: str = QUOTAS, env: dict | None = None):
        self.root = root
        self.env = dict(env or {})  # more settings for the pool process (DASK_JUPYTER_GPU__...)
        (root / "pool.yaml").write_text(quotas)
        store = TokenStore(str(root / "tokens.json"))
        self.tokens = {u: store.create(u) for u in ("alice", "bob", "carol")}
        self.path = str(root / "pool.json")
        self.address = None

    def start(self) -> str:
        from jupyter_gpu.pool.launcher import ensure_embedded_pool

        saved = {k: os.environ.get(k) for k in [*ENV, *AS_POOL, *self.env]}
        os.environ.update({k: str(self.root / v) for k, v in ENV.items()})
        os.environ.update({**AS_POOL, **self.env})
        try:
            self.address = ensure_embedded_pool(keep=True, path=self.path, timeout=120)
        finally:  # only the pool process sees these settings
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        return self.address

    def stop(self) -> None:
        from jupyter_gpu.pool.launcher import stop_embedded_pool

        stop_embedded_pool(self.path)

    def kernel(self, user: str) -> GpuKernel:
        return Kernel(self.address, user=user, env={"JUPYTER_GPU_TOKEN": self.tokens[user]})


def call(address: str, op: str, **kwargs):
    # the embedded pool's own TLS, found from its address
    from jupyter_gpu.common.security import pool_rpc

    async def go():
        async with pool_rpc(address) as r:
            return await getattr(r, op)(**kwargs)

    return asyncio.run(go())


def connected_client(address: str):
    """A kernel's Dask client (synchronous), to name in requests: a shared pool takes requests of
    connected kernels only, for as long as they stay connected."""
    from distributed import Client

    from jupyter_gpu.common.security import client_security

    return Client(address, security=client_security(address), set_as_default=False, timeout=60)


def with_client(address: str, op: str, **kwargs):
    """``call``, as a connected kernel: with its Dask client (a shared pool takes requests of
    connected kernels only)."""
    from distributed import Client

    from jupyter_gpu.common.security import client_security, pool_rpc

    async def go():
        async with Client(
            address, security=client_security(address), asynchronous=True, set_as_default=False
        ) as client:
            async with pool_rpc(address) as r:
                return await getattr(r, op)(client=client.id, **kwargs)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def qpool(tmp_path_factory):
    pool = QuotaPool(tmp_path_factory.mktemp("quota-pool"))
    pool.start()
    yield pool
    pool.stop()


def test_borrowing_is_preemptible_and_a_guarantee_reclaims_it(qpool):
    alice, bob, carol = qpool.kernel("alice"), qpool.kernel("bob"), qpool.kernel("carol")
    try:
        assert alice.run("%%gpu --gpus 1\nx = 1").error is None
        # team ml is at its guarantee: bob borrows the idle GPU, and builds state there
        res = bob.run(
            "%%gpu --gpus 1\ny = 2\nimport torch\nnet = torch.nn.Linear(2, 1)\n"
            "w0 = float(net.weight.sum())\nsteps = (i for i in range(3))"
        )
        assert res.error is None, res.error_text
        # net lives in the session
        assert bob.run("print(type(net).__name__)").stdout == "RemoteObject\n"
        held = {ls["user"]: ls for ls in leases(qpool.address)}
        assert held["alice"]["preemptible"] is False and held["alice"]["team"] == "ml"
        assert held["bob"]["preemptible"] is True
        # a wrong token in the kernel is refused at once, with the fix
        res = carol.run("import os\nos.environ['JUPYTER_GPU_TOKEN'] = 'bad'")
        res = carol.run("%%gpu --gpus 0.5\nz = 3")
        assert res.error["ename"] == "RequestRefused" and "JUPYTER_GPU_TOKEN" in res.error["evalue"]
        carol.run(f"os.environ['JUPYTER_GPU_TOKEN'] = {qpool.tokens['carol']!r}")
        # carol may not cancel bob's work
        res = carol.run(f"%gpu cancel {held['bob']['id']}")
        assert "belongs to bob" in res.stderr + res.stdout
        # carol's team is owed its guarantee: bob's idle, borrowed session is reclaimed for her
        res = carol.run("%%gpu --gpus 0.5\nz = 3\nprint('carol ran')")
        assert res.error is None and "carol ran" in res.stdout, res.error_text
        assert wait_until(
            lambda: held["bob"]["id"] not in {ls["id"] for ls in leases(qpool.address)}
        )
        # his variables wait in host memory on the worker
        assert glob.glob(
            f"/dev/shm/jupyter-gpu-*/{held['bob']['id']}/offload.pkl"
        ) or not os.path.isdir("/dev/shm")
        # bob sees why in his next cell, which runs in a new (borrowed) session with his variables:
        # they were moved to host memory when his idle session was reclaimed; the generator could
        # not be, and he is told
        res = bob.run("%%gpu\nprint('bob again', float(net.weight.sum()) == w0)")
        assert "reclaimed for a request within team viz's guarantee" in res.stdout, (
            res.stdout + res.error_text
        )
        assert (
            "were moved to host memory" in res.stdout
            and "Starting a new one with its variables" in res.stdout
        )
        assert "Restored 4 variable(s) from host memory: net, torch, w0, y." in res.stdout, (
            res.stdout
        )
        assert (
            "Not restored (they could not be moved to host memory): steps (generator)" in res.stdout
        )
        assert "bob again True" in res.stdout, res.stdout + res.error_text
        usage = call(qpool.address, "gpu_usage")
        assert {"alice", "bob", "carol"} <= {u["user"] for u in usage["users"]} and usage[
            "preemptions"
        ] == 1
    finally:
        for k in (alice, bob, carol):
            k.shutdown(now=True)


def test_audit_rows_are_correct_after_a_scheduler_restart(qpool):
    # a refusal of a caller who proved who they are (over a team's limit) is audited; a wrong
    # token or an unknown user is refused without a row (anyone could fill the store with those)
    a, spec = qpool.address, {"fraction": 0.25}
    with pytest.raises(NotAuthorized, match="token sent for user 'alice' is wrong"):
        call(a, "gpu_request", user="alice", kernel="t", spec=spec, token="not-it")
    with pytest.raises(NotAuthorized, match="does not know the user 'mallory'"):
        call(a, "gpu_request", user="mallory", kernel="t", spec=spec, token="x")
    over = {"fraction": 1.0, "workers": 2}
    reply = with_client(
        a, "gpu_request", user="carol", kernel="t", spec=over, token=qpool.tokens["carol"]
    )
    assert reply["state"] == "refused" and "limit is 1.5 GPU" in reply["reason"]
    db = str(qpool.root / "audit.sqlite")
    qpool.stop()
    store = AuditStore(db)
    rows = store.rows("leases")
    assert all(r["ended"] is not None and r["gpu_seconds"] is not None for r in rows)
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user"], []).append(r)
    assert {"alice", "bob", "carol"} <= set(by_user)
    reclaimed = [r for r in by_user["bob"] if (r["end_reason"] or "").startswith("reclaimed")]
    assert len(reclaimed) == 1 and reclaimed[0]["preemptible"] == 1 and reclaimed[0]["team"] == "ml"
    assert reclaimed[0]["fraction"] == 1.0
    preemptions = store.rows("preemptions")
    assert (
        len(preemptions) == 1
        and preemptions[0]["user"] == "bob"
        and preemptions[0]["for_user"] == "carol"
    )
    refused = {r["user"] for r in store.rows("refused")}
    assert "carol" in refused and not {"alice", "mallory"} & refused
    store.close()
    # the restarted scheduler reads the same history
    qpool.start()
    usage = call(qpool.address, "gpu_usage")
    assert {"alice", "bob", "carol"} <= {u["user"] for u in usage["users"]}
    out = subprocess.run(
        [sys.executable, "-m", "jupyter_gpu.cli", "usage", "--db", db],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "alice" in out.stdout and "viz" in out.stdout, out.stderr


def test_running_batch_work_is_preempted_told_why_and_requeued(qpool):
    """After the restart above: a batch cell running on borrowed capacity is stopped for a
    guarantee, its owner is told why, and the cell reruns from its start once the pool has room
    again."""
    alice, bob, carol = qpool.kernel("alice"), qpool.kernel("bob"), qpool.kernel("carol")
    try:
        assert alice.run("%%gpu --gpus 1\nx = 1").error is None  # team ml at its guarantee
        cell = bob.submit(
            "%%gpu --gpus 1 --priority batch\nimport time\nprint('bob starts', flush=True)\n"
            "time.sleep(5)\nprint('bob finished')"
        )
        bob.wait_for_output(cell, "bob starts", timeout=180)
        # the session tells the broker "running" on its own, one-way channel: it may trail the
        # cell's output
        assert wait_until(
            lambda: (
                {ls["user"]: ls["state"] for ls in leases(qpool.address)}.get("bob") == "running"
            )
        )
        held = {ls["user"]: ls for ls in leases(qpool.address)}
        assert held["bob"]["preemptible"]
        # carol is owed her guarantee: bob's running, borrowed batch cell is preempted for her
        res = carol.run("%%gpu --gpus 0.5\nprint('carol ran')")
        assert res.error is None and "carol ran" in res.stdout, res.error_text
        ended = call(
            qpool.address,
            "gpu_lease_info",
            lease=held["bob"]["id"],
            user="bob",
            token=qpool.tokens["bob"],
        )
        assert (
            ended["state"] == "ended"
            and ended["preempted"]
            and ended["end_reason"].startswith("reclaimed")
        )
        assert carol.run("%gpu release").error is None
        # bob's cell was requeued and reruns from its start once carol's half GPU is free again
        res = bob.collect(cell, timeout=120)
        assert res.error is None, res.error_text
        assert (
            "This batch cell was preempted" in res.stdout
            and "reclaimed for a request within team viz" in res.stdout
        )
        # (the first run's "bob starts" was read above): the cell ran again from its start, to its
        # end
        assert res.stdout.count("bob starts") == 1 and "bob finished" in res.stdout, res.stdout
        assert res.stdout.index("This batch cell was preempted") < res.stdout.index("bob starts")
        # an interactive cell is not rerun: it fails, saying why
        cell = bob.submit("%%gpu\nimport time\nprint('again', flush=True)\ntime.sleep(30)")
        bob.wait_for_output(cell, "again", timeout=180)
        assert carol.run("%%gpu --gpus 1\nprint('carol again')").error is None
        res = bob.collect(cell, timeout=180)
        assert res.error["ename"] == "SessionLost" and "reclaimed" in res.error["evalue"], (
            res.error_text
        )
    finally:
        for k in (alice, bob, carol):
            k.shutdown(now=True)


def test_offloaded_variables_are_dropped_when_their_kernel_goes_away(qpool):
    alice, bob, carol = qpool.kernel("alice"), qpool.kernel("bob"), qpool.kernel("carol")
    try:
        assert alice.run("%%gpu --gpus 1\nx = 1").error is None
        assert bob.run("%%gpu --gpus 1\nimport torch\nnet = torch.nn.Linear(2, 1)").error is None
        lease = next(ls for ls in leases(qpool.address) if ls["user"] == "bob")
        # reclaims bob's idle, borrowed session
        assert carol.run("%%gpu --gpus 0.5\nz = 1").error is None
        pattern = f"/dev/shm/jupyter-gpu-*/{lease['id']}/offload.pkl"
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm on this machine")
        assert wait_until(lambda: glob.glob(pattern), timeout=90)
        bob.shutdown(now=True)  # bob's kernel ends without another cell: nobody will restore them
        assert wait_until(lambda: not glob.glob(pattern), timeout=90)
    finally:
        for k in (alice, carol):
            k.shutdown(now=True)
        try:
            bob.shutdown(now=True)
        except Exception:  # noqa: BLE001 - cleanup: the kernel may be gone already
            pass
