"""The embedded pool is private to its user (issue 12, item 6), tested with a real second account.

An embedded pool runs as root (its user here), with its runtime folder where every account can
enter, so that only the pool's own file modes keep its secrets. Another account, told everything but
the key (the pool's address, its workers' and a live session's addresses, the paths of its files),
tries to read them and to use the pool through jupyter_gpu's client, a Dask Client, and Dask rpcs
with no certificate and with one of its own CA: it must get nowhere, while the owner's kernel, CLI
and panel work with nothing configured.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.harness import Kernel, snapshot, wait_until
from tests.system.security.outsider import outsider, why_not

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(why_not() is not None, reason=str(why_not())),
]

INTRUDER = str(Path(__file__).with_name("intruder.py"))


@pytest.fixture(scope="module")
def shared_runtime():
    """A Jupyter runtime folder every account can enter (0755): here only the pool's own modes
    protect it. Set for this process (clients find the pool's certificate there) and the kernels it
    starts."""
    root = tempfile.mkdtemp(prefix="jgpu-private-")
    os.chmod(root, 0o755)
    runtime = os.path.join(root, "runtime")
    os.mkdir(runtime, 0o755)
    os.chmod(runtime, 0o755)
    saved = os.environ.get("JUPYTER_RUNTIME_DIR")
    os.environ["JUPYTER_RUNTIME_DIR"] = runtime
    try:
        yield runtime
    finally:
        if saved is None:
            os.environ.pop("JUPYTER_RUNTIME_DIR", None)
        else:
            os.environ["JUPYTER_RUNTIME_DIR"] = saved
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def owner_pool(shared_runtime):
    """This user's embedded pool (two virtual GPUs), as a kernel would start it; stopped at the
    end."""
    from jupyter_gpu.pool.discovery import read_record
    from jupyter_gpu.pool.launcher import ensure_embedded_pool, stop_embedded_pool

    path = os.path.join(shared_runtime, "jupyter-gpu-pool-owner.json")
    try:
        ensure_embedded_pool(keep=True, path=path, timeout=120)
        yield read_record(path), path
    finally:
        stop_embedded_pool(path)


@pytest.fixture(scope="module")
def other_account():
    with outsider() as account:
        yield account


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_pool_runs_on_tls_with_credentials_only_its_user_can_read(owner_pool, shared_runtime):
    from jupyter_gpu.common.pool_credentials import credentials_dir, entry_path, index_dirs

    record, path = owner_pool
    assert record.address.startswith("tls://127.0.0.1:"), record
    # next to it
    assert record.tls == credentials_dir(path) and os.path.dirname(record.tls) == shared_runtime
    files = sorted(os.listdir(record.tls))
    # the CA's private key is never written
    assert files == ["ca.pem", "pool.crt", "pool.key"], files
    assert _mode(record.tls) == 0o700 and os.lstat(record.tls).st_uid == os.geteuid()
    for name in files:
        full = os.path.join(record.tls, name)
        assert _mode(full) == 0o600 and os.lstat(full).st_uid == os.geteuid(), full
    assert _mode(path) == 0o600  # the runtime file
    assert _mode(path[: -len(".json")] + ".log") == 0o600
    # how clients find the folder from the address: in the user's home
    entry = entry_path(record.address)
    assert entry is not None and os.path.dirname(entry) == index_dirs()[0], entry
    assert _mode(os.path.dirname(entry)) == 0o700 and _mode(entry) == 0o600
    assert json.loads(Path(entry).read_text())["credentials"] == record.tls


def test_another_account_cannot_use_the_pool_or_read_its_key(owner_pool, other_account):
    from jupyter_gpu.common.pool_credentials import entry_path

    record, path = owner_pool
    # the owner's kernel holds a session, so that a live session is among the targets
    k = Kernel(record.address, user="owner")
    try:
        res = k.run("%%gpu\nimport os\nsecret = 'owner data'\nprint('pid', os.getpid())")
        assert res.error is None and res.stdout.startswith("pid"), res.error_text
        # the session's address, which the kernel knows (the broker does not show it to others)
        session = k.run(
            "print(get_ipython().find_magic('gpu').__self__.conn.session.address)"
        ).stdout.strip()
        assert session.startswith("tls://127.0.0.1:"), session
        workers = sorted({g["worker"] for g in snapshot(record.address)["gpus"]})
        secrets = [
            path,
            path[: -len(".json")] + ".log",
            record.tls,
            *(os.path.join(record.tls, f) for f in ("ca.pem", "pool.crt", "pool.key")),
            os.path.dirname(entry_path(record.address)),
            entry_path(record.address),
        ]
        config = json.dumps(
            {"address": record.address, "others": [*workers, session], "secrets": secrets}
        )
        # it even looks for credentials in the owner's runtime folder
        run = other_account.run(
            INTRUDER,
            config,
            env={"JUPYTER_RUNTIME_DIR": os.environ["JUPYTER_RUNTIME_DIR"]},
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        results = json.loads(run.stdout.strip().splitlines()[-1])
        report = "\n".join(
            f"{'GOT IN' if r['got_in'] else 'refused'}: {r['name']}: {r['detail']}" for r in results
        )
        controls = [r for r in results if r["name"].startswith("control:")]
        assert len(controls) == 2 and all(r["got_in"] for r in controls), report
        attacks = [r for r in results if not r["name"].startswith("control:")]
        others = len(workers) + 1
        assert len(attacks) == len(secrets) + 4 + 2 * (2 + others), report  # every attempt was made
        assert not [r for r in attacks if r["got_in"]], report
        client_attempt = next(
            r for r in attacks if r["name"].startswith("jupyter_gpu's own client")
        )
        assert "TlsConfigError" in client_attempt["detail"], report  # no certificate found for it
        # the owner's session and pool are untouched and still answer
        res = k.run("%%gpu\nprint(secret)")
        assert res.error is None and res.stdout == "owner data\n", res.error_text
    finally:
        k.shutdown(now=True)


def test_the_owners_cli_and_panel_need_no_configuration(owner_pool):
    import asyncio

    from jupyter_gpu.labext.pool_link import GpuPanelConfig, PoolLink

    record, _ = owner_pool
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_DISTRIBUTED__COMM")}
    for command in (["status"], ["usage"]):
        out = subprocess.run(
            [sys.executable, "-m", "jupyter_gpu.cli", *command, "--pool", record.address],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert out.returncode == 0, out.stderr
    assert (
        "Virtual GPU 0"
        in subprocess.run(
            [sys.executable, "-m", "jupyter_gpu.cli", "status", "--pool", record.address],
            capture_output=True,
            text=True,
            env=env,
        ).stdout
    )

    async def panel() -> dict:
        link = PoolLink(GpuPanelConfig())
        try:
            return await link.snapshot()
        finally:
            await link.close()

    saved = os.environ.get("JUPYTER_GPU_SCHEDULER")
    os.environ["JUPYTER_GPU_SCHEDULER"] = record.address
    try:
        snap = asyncio.run(panel())
    finally:
        os.environ.pop("JUPYTER_GPU_SCHEDULER") if saved is None else os.environ.__setitem__(
            "JUPYTER_GPU_SCHEDULER", saved
        )
    assert snap["state"] == "ok" and len(snap["gpus"]) == 2, snap


def test_a_plain_gpu_cell_starts_a_private_pool_with_nothing_configured(tmp_path):
    """Zero configuration: a kernel with no pool address and no TLS settings runs a %%gpu cell; the
    pool it starts is on TLS, and its credentials go with it."""
    from jupyter_gpu.common.pool_credentials import entry_path
    from jupyter_gpu.pool.discovery import read_record
    from jupyter_gpu.pool.launcher import stop_embedded_pool

    runtime = tmp_path / "runtime"
    env = {
        "JUPYTER_GPU_SCHEDULER": "",
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "JUPYTER_GPU_VIRTUAL_GPUS": "1x8GiB",
    }
    k = Kernel(None, env=env)
    record = None
    try:
        res = k.run("%%gpu\nx = 6 * 7")
        assert res.error is None, res.error_text
        assert k.run("x").result == "42"
        (path,) = runtime.glob("jupyter-gpu-pool-*.json")
        record = read_record(str(path))
        assert record.address.startswith("tls://127.0.0.1:") and os.path.isdir(record.tls), record
        assert k.run("%gpu status").error is None
    finally:
        k.shutdown(now=True)
        for path in runtime.glob("jupyter-gpu-pool-*.json"):
            stop_embedded_pool(str(path))
    assert record is not None
    assert wait_until(lambda: not os.path.exists(record.tls), timeout=30), (
        "the pool's credentials outlived it"
    )
    assert entry_path(record.address) is None, "its index entry outlived it"
