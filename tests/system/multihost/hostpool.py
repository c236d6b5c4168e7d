"""A pool across hosts (``hosts.py``): ``jupyter-gpu pool up`` on one host, ``jupyter-gpu worker``
on others, kernels on yet another, as an administrator and users would run them on separate
machines.

The pool key is made by the administrator (here: this class) as a 0600 file and copied to each
worker host, which points ``DASK_JUPYTER_GPU__POOL_KEY_FILE`` at its copy (docs/administration.md).
Kernels run on their host through a kernelspec whose argv starts with ``ip netns exec``
(``Hosts.kernelspec``), so they are real kernels started by ``jupyter_client`` with their network on
that host.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from jupyter_gpu.headless.kernel import GpuKernel
from tests.system.multihost.hosts import Hosts

PORT = 8786


class HostPool:
    """See the module docstring. ``workers``: worker host name -> its
    ``JUPYTER_GPU_VIRTUAL_GPUS``."""

    def __init__(
        self,
        hosts: Hosts,
        scheduler: str,
        workers: dict[str, str],
        client: str,
        scheduler_env: dict[str, str] | None = None,
        worker_env: dict[str, str] | None = None,
        pool_files: list[Path] | None = None,
    ):
        self.hosts, self.scheduler_host, self.workers, self.client = (
            hosts,
            scheduler,
            dict(workers),
            client,
        )
        self.address = f"tcp://{hosts[scheduler].ip}:{PORT}"
        self.scheduler_env = dict(scheduler_env or {})
        self.worker_env = dict(worker_env or {})
        self.pool_files = list(pool_files or [])  # the pool's own (a quota file): its account's
        self.checkpoints = hosts.shared / "checkpoints"
        self.checkpoints.mkdir(exist_ok=True)
        self._spec_dir = hosts.root / "jupyter-path"
        self._kernel_name = hosts.kernelspec(client, self._spec_dir)
        self._old_path = os.environ.get("JUPYTER_PATH")
        self.kernels: list[GpuKernel] = []
        self.worker_procs: dict[str, subprocess.Popen] = {}  # each worker host's service, now
        self._account: contextlib.ExitStack | None = None
        self.service: pwd.struct_passwd | None = None  # the account the services run as (root)

    # ------------------------------------------------------------------ the services
    def _service_account(self) -> None:
        """Run as root, the services give root up for the pool's service account (made here,
        removed at ``stop``): the pool key copies are its, and the worker hosts find the broker's
        grant public key where the scheduler host made it (the hosts share that folder)."""
        if os.geteuid() != 0 or self.service is not None:
            return
        from tests.support.service_account import ENV, service_account

        self._account = contextlib.ExitStack()
        self.service = self._account.enter_context(service_account())
        for path in self.pool_files:
            os.chown(path, self.service.pw_uid, self.service.pw_gid)
            os.chmod(path, 0o600)
        # without a token file sessions run as that account too: the checkpoints are its
        os.chown(self.checkpoints, self.service.pw_uid, self.service.pw_gid)
        grant = str(self.hosts[self.scheduler_host].folder / "grant.key")
        self.scheduler_env = {
            ENV: self.service.pw_name,
            "DASK_JUPYTER_GPU__GRANT_KEY_FILE": grant,
            **self.scheduler_env,
        }
        self.worker_env = {
            ENV: self.service.pw_name,
            "DASK_JUPYTER_GPU__GRANT_PUBLIC_KEY_FILE": f"{grant}.pub",
            **self.worker_env,
        }

    def _key_copy(self, host: str) -> str:
        """The pool key as the administrator copies it onto ``host``: 0600, owned by the service
        account."""
        master = self.hosts[self.scheduler_host].folder / "pool.key"
        if not master.exists():
            with open(os.open(master, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        copy = self.hosts[host].folder / "pool.key"
        if host != self.scheduler_host:
            shutil.copyfile(master, copy)
            os.chmod(copy, 0o600)
        if self.service is not None:
            os.chown(copy, self.service.pw_uid, self.service.pw_gid)
        return str(copy)

    def start(self) -> HostPool:
        self._service_account()
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            filter(None, [str(self._spec_dir), self._old_path])
        )
        sched = self.hosts[self.scheduler_host]
        self.hosts.spawn(
            sched,
            [
                "python",
                "-m",
                "jupyter_gpu.cli",
                "--log-level",
                "INFO",
                "pool",
                "up",
                "--host",
                sched.ip,
                "--port",
                str(PORT),
            ],
            env={
                "DASK_JUPYTER_GPU__POOL_KEY_FILE": self._key_copy(sched.name),
                **self.scheduler_env,
            },
            log_name="scheduler",
        )
        self.wait_for(self._answers, 90, "the scheduler to listen")
        for name in self.workers:
            self.start_worker(name)
        self.wait_for(
            lambda: len(self.gpus()) >= len(self.workers), 180, "every worker host's GPUs"
        )
        return self

    def start_worker(self, name: str) -> None:
        host = self.hosts[name]
        self.worker_procs[name] = self.hosts.spawn(
            host,
            [
                "python",
                "-m",
                "jupyter_gpu.cli",
                "--log-level",
                "INFO",
                "worker",
                self.address,
                "--host",
                host.ip,
            ],
            env={
                "JUPYTER_GPU_VIRTUAL_GPUS": self.workers[name],
                "DASK_JUPYTER_GPU__POOL_KEY_FILE": self._key_copy(name),
                **self.worker_env,
            },
            log_name="worker",
        )

    def stop(self) -> None:
        for k in self.kernels:
            with contextlib.suppress(Exception):
                k.shutdown(now=True)
        if self._old_path is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = self._old_path
        if self._account is not None:
            self._account.close()
            self._account, self.service = None, None

    # ------------------------------------------------------------------ looking at it
    def _answers(self) -> bool:
        from jupyter_gpu.pool.discovery import address_reachable

        return address_reachable(self.address, timeout=0.5)

    def snapshot(self) -> dict:
        from tests.support.harness import snapshot

        return snapshot(self.address)

    def gpus(self) -> list[dict]:
        try:
            return self.snapshot()["gpus"]
        except Exception:  # noqa: BLE001 - the pool is not up (yet): no GPUs
            return []

    def leases(self) -> list[dict]:
        return [ls for g in self.gpus() for ls in g["leases"]]

    def host_of(self, worker_address: str) -> str:
        """The name of the host a worker address is on."""
        return next(h.name for h in self.hosts.hosts.values() if f"//{h.ip}:" in worker_address)

    def logs(self) -> str:
        parts = [self.hosts.log(self.scheduler_host, "scheduler")]
        parts += [self.hosts.log(name, "worker") for name in self.workers]
        return "\n".join(parts)

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    # ------------------------------------------------------------------ kernels, on the client host
    def kernel(self, user: str | None = None, env: dict[str, str] | None = None) -> GpuKernel:
        """A started kernel on the client host, pointed at the pool, with ``%load_ext jupyter_gpu``
        run."""
        extra = {"DASK_JUPYTER_GPU__SCALEOUT__CHECKPOINT_DIR": str(self.checkpoints), **(env or {})}
        k = GpuKernel(
            self.address, kernel_name=self._kernel_name, user=user, env=extra, cwd=str(Path.home())
        )
        self.kernels.append(k)
        return k.start()


def hosts_of(pool: HostPool, leases: list[dict]) -> list[str]:
    return [pool.host_of(ls["worker"]) for ls in sorted(leases, key=lambda ls: ls.get("rank") or 0)]
