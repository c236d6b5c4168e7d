"""A ``jupyter-gpu pool up`` that owns a dask-jobqueue ``SLURMCluster`` through
``jupyter-gpu.cluster-manager`` (its Dask config in a folder of its own, ``DASK_CONFIG``, as an
administrator would keep it in /etc), on the one-node Slurm of ``slurm.py``. Used by the Slurm tests
and ``bench/multihost.py``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.system.slurm.slurm import LocalSlurm


class SlurmPool:
    """``jupyter-gpu pool up`` with a SLURMCluster behind its Scale button; see the module
    docstring."""

    def __init__(
        self,
        root: Path,
        slurm: LocalSlurm,
        manager: dict,
        quotas: str = "",
        users: tuple[str, ...] = (),
    ):
        from jupyter_gpu.broker.identity import TokenStore
        from tests.support.services import free_port

        self._made = contextlib.ExitStack()
        self.service = None
        if os.geteuid() == 0:
            # started as root, `pool up` gives root up for the pool's service account (issue 20):
            # a fresh one, and the pool's files in a folder it can reach (pytest's are root's
            # alone); its Slurm jobs run as that account too
            from tests.support.service_account import ENV, service_account

            self.service = self._made.enter_context(service_account())
            root = Path(tempfile.mkdtemp(prefix="jgpusvc-slurm-", dir="/var/tmp"))
            self._made.callback(shutil.rmtree, root, True)
            os.chmod(root, 0o755)
            keys = Path(tempfile.mkdtemp(prefix="jgpusvc-keys-", dir="/var/tmp"))  # root's
            self._made.callback(shutil.rmtree, keys, True)
            self._service_env = {
                ENV: self.service.pw_name,
                "DASK_JUPYTER_GPU__GRANT_KEY_FILE": str(keys / "grant.key"),
            }
        else:
            self._service_env = {}
        # the jobs' logs go with the pool's other files (in the folder chosen above)
        manager.setdefault("options", {}).setdefault("log_directory", str(root / "jobs"))
        self.root, self.slurm = root, slurm
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        config = root / "dask"
        config.mkdir()
        settings: dict = {"cluster-manager": manager}
        if quotas:
            (root / "quotas.yaml").write_text(quotas)
            settings["pool-config"] = str(root / "quotas.yaml")
        self.tokens: dict[str, str] = {}
        # a pool shared by several people: tokens checked, Dask's generic API closed
        # (broker/gate.py)
        if users:
            store = TokenStore(str(root / "tokens.json"))
            self.tokens = {u: store.create(u) for u in users}
            # their sessions run as the pool's account: these users have no OS accounts here
            settings.update(
                {"token-file": str(root / "tokens.json"), "session": {"as-user": False}}
            )
        (config / "jupyter-gpu.yaml").write_text(yaml.safe_dump({"jupyter-gpu": settings}))
        if self.service is not None:
            from tests.support.service_account import give

            give(self.service, root)
        self.env = {**os.environ, **slurm.env(), "DASK_CONFIG": str(config), **self._service_env}
        self.proc: subprocess.Popen | None = None

    def start(self) -> SlurmPool:
        log = open(self.root / "scheduler.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_gpu.cli",
                "--log-level",
                "INFO",
                "pool",
                "up",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=str(self.root),
            start_new_session=True,
        )
        log.close()
        try:
            self.wait_for(self._answers, 60, "the pool's scheduler")
        except BaseException:
            self.stop()  # nobody else holds this pool yet: remove what it made
            raise
        return self

    def _answers(self) -> bool:
        try:
            self.snapshot()
            return True
        except Exception:  # noqa: BLE001 - the pool is not up (yet)
            return False

    def snapshot(self) -> dict:
        from tests.support.harness import snapshot

        return snapshot(self.address)

    def kernel(self, user: str | None = None):
        """A started kernel of ``user`` (with its token when the pool checks them)."""
        from tests.support.harness import Kernel

        env = {"JUPYTER_GPU_TOKEN": self.tokens[user]} if user in self.tokens else {}
        return Kernel(self.address, user=user, env=env)

    def call(self, op: str, **kwargs):
        from jupyter_gpu.common.security import pool_rpc

        if kwargs.get("user") in self.tokens:
            kwargs.setdefault("token", self.tokens[kwargs["user"]])

        async def go():
            async with pool_rpc(self.address) as r:
                return await getattr(r, op)(**kwargs)

        return asyncio.run(go())

    def cluster(self) -> dict:
        return self.snapshot()["pool"]["cluster"]

    def log(self) -> str:
        path = self.root / "scheduler.log"
        return "--- scheduler.log ---\n" + (
            path.read_text(errors="replace")[-5000:] if path.exists() else ""
        )

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.3) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"the pool exited ({self.proc.returncode}) waiting for {what}\n{self.log()}"
                )
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {what}\n{self.log()}\n{self.slurm.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the pool cancels its jobs as it stops
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._made.close()  # the service account and its folders, whatever happened


def slurm_pool(
    root: Path, slurm: LocalSlurm, quotas: str = "", users: tuple[str, ...] = (), **manager
):
    """A started SlurmPool whose jobs each start one worker with a virtual 4 GiB GPU (``users``: a
    pool that checks their tokens)."""
    settings = {
        "class": "dask_jobqueue.SLURMCluster",
        "virtual-gpus": "1x4GiB",
        "options": {"cores": 1, "memory": "1GiB"},
        "interval": "1s",
        **manager,
    }
    return SlurmPool(root, slurm, settings, quotas, users).start()
