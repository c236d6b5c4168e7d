"""A pool as an administrator runs one: ``jupyter-gpu pool up`` and ``jupyter-gpu worker`` as real
processes.

Used by the fault tests (kill the scheduler, restart it) and anything that needs the services rather
than the embedded pool. Every process started here is stopped at the end, whatever happened, and the
logs are kept in the test's folder for the failure report. Run as root, the services give root up
for a service account of the pool's own (``tests/support/service_account.py``), made for it and
removed with it, unless the caller names one (``DASK_JUPYTER_GPU__SERVICE_ACCOUNT`` in ``env``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PoolServices:
    """``pool up`` on a fixed port plus one ``worker`` service; ``restart_scheduler`` kills and
    restarts it."""

    def __init__(
        self,
        root: Path,
        virtual: str = "2x16GiB",
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        worker_account: str | None = None,
        worker_env: dict[str, str] | None = None,
    ):
        self.root = Path(root)
        self.virtual = virtual
        self.host = host
        self.port = free_port()
        self.address = f"tcp://{host}:{self.port}"
        self.env = {**os.environ, **(env or {})}
        # run `jupyter-gpu worker` as this account instead of ours, with this added to its env
        self.worker_account = worker_account
        self.worker_env = dict(worker_env or {})
        self.scheduler: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.more_workers: dict[str, subprocess.Popen] = {}  # add_worker's, by name
        self._logs: list = []
        self._account: contextlib.ExitStack | None = None
        self.service: pwd.struct_passwd | None = None  # the account the services run as (root)

    def _start(
        self, name: str, args: list[str], env: dict[str, str], account: str | None = None
    ) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        self._logs.append(log)
        extra: dict = {}
        if account is not None:
            entry = pwd.getpwnam(account)
            extra = {
                "user": entry.pw_uid,
                "group": entry.pw_gid,
                "extra_groups": os.getgrouplist(entry.pw_name, entry.pw_gid),
            }
            env = {**env, "HOME": entry.pw_dir, "USER": account, "LOGNAME": account}
        return subprocess.Popen(
            [sys.executable, "-m", "jupyter_gpu.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd="/" if account else str(self.root),
            start_new_session=True,
            **extra,
        )

    def start_scheduler(self) -> None:
        self.scheduler = self._start(
            "scheduler", ["pool", "up", "--host", self.host, "--port", str(self.port)], self.env
        )
        self.wait_for(lambda: self._answers(), 60, "the scheduler to listen")

    def start(self) -> PoolServices:
        self._service_account()
        self.start_scheduler()
        self.worker = self._start(
            "worker",
            ["worker", self.address],
            {**self.env, "JUPYTER_GPU_VIRTUAL_GPUS": self.virtual, **self.worker_env},
            self.worker_account,
        )
        self.wait_for(lambda: self.gpu_count() >= self._expected_gpus(), 120, "the worker's GPUs")
        # and until every nanny has finished starting: a scheduler stopped before that makes the
        # service fail its start (a traceback), not wait for the scheduler
        self.wait_for(
            lambda: "GPU worker(s) joined" in self.full_log("worker"), 60, "the worker's start"
        )
        return self

    def _service_account(self) -> None:
        """Run as root: the account the services give root up for (made here unless named)."""
        from tests.support.service_account import ENV, service_account

        if os.geteuid() != 0 or self.service is not None:
            return
        if self.env.get(ENV):
            self.service = pwd.getpwnam(self.env[ENV])
            return
        self._account = contextlib.ExitStack()
        self.service = self._account.enter_context(service_account())
        self.env[ENV] = self.service.pw_name

    def pool_key_path(self) -> str:
        """Where ``pool up`` keeps the pool key: the runtime folder of the account it runs as (a
        service that kept root, as before issue 20, kept it in root's)."""
        from jupyter_gpu.common import poolkey

        if self.service is not None:
            runtime = os.path.join(self.service.pw_dir, ".local", "share", "jupyter", "runtime")
            path = os.path.join(runtime, f"jupyter-gpu-pool-{self.port}.key")
            if os.path.exists(path):
                return path
        return poolkey.key_path(self.address)

    def _expected_gpus(self) -> int:
        from jupyter_gpu.common.inventory import parse_virtual_spec

        return len(parse_virtual_spec(self.virtual))

    def _answers(self) -> bool:
        from jupyter_gpu.pool.discovery import address_reachable

        return address_reachable(self.address, timeout=0.5)

    def snapshot(self) -> dict:
        from tests.support.harness import snapshot

        return snapshot(self.address)

    def gpu_count(self) -> int:
        try:
            return len(self.snapshot()["gpus"])
        except Exception:  # noqa: BLE001 - the pool is not up (yet): no GPUs
            return 0

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        os.killpg(self.scheduler.pid, signal.SIGKILL)
        self.scheduler.wait(10)

    def stop_scheduler(self, timeout: float = 60) -> None:
        """Stop the scheduler as systemd, a supervisor or Ctrl-C do: SIGTERM, and wait for it to
        exit."""
        assert self.scheduler is not None
        os.killpg(self.scheduler.pid, signal.SIGTERM)
        self.scheduler.wait(timeout)

    def restart_scheduler(self, how: str = "kill") -> None:
        """``kill``: ``kill -9`` the scheduler; ``term``: stop it with SIGTERM. Then `pool up`
        again on the same port."""
        if how == "term":
            self.stop_scheduler()
        else:
            self.kill_scheduler()
        self.start_scheduler()

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for name, proc in (("scheduler", self.scheduler), ("worker", self.worker)):
                if proc is not None and proc.poll() is not None and name != "worker-expected-exit":
                    raise AssertionError(
                        f"the {name} service exited ({proc.returncode}) while waiting for {what}:\n"
                        + self.log(name)
                    )
            time.sleep(0.1)
        raise AssertionError(
            f"timed out waiting for {what}:\n" + self.log("scheduler") + self.log("worker")
        )

    def full_log(self, name: str) -> str:
        """The whole log of a service (``log`` gives the tail, for failure reports)."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return f"--- {name}.log ---\n" + (
            path.read_text(errors="replace")[-4000:] if path.exists() else "(none)\n"
        )

    def add_worker(self, name: str, virtual: str | None = None) -> subprocess.Popen:
        """Another `jupyter-gpu worker` service (as if on another machine), logging to
        ``name``.log; waits for its GPUs."""
        from jupyter_gpu.common.inventory import parse_virtual_spec

        before = self.gpu_count()
        proc = self._start(
            name,
            ["worker", self.address, "--name", name],  # virtual GPUs' names repeat per machine
            {**self.env, "JUPYTER_GPU_VIRTUAL_GPUS": virtual or self.virtual, **self.worker_env},
            self.worker_account,
        )
        self.more_workers[name] = proc
        n = len(parse_virtual_spec(virtual or self.virtual))
        self.wait_for(lambda: self.gpu_count() >= before + n, 120, f"{name}'s GPUs")
        self.wait_for(lambda: "GPU worker(s) joined" in self.full_log(name), 60, f"{name}'s start")
        return proc

    def stop(self) -> None:
        for proc in (*self.more_workers.values(), self.worker, self.scheduler):
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(10)
        for log in self._logs:
            log.close()
        if self._account is not None:
            self._account.close()
            self._account = None
            self.service = None

    def __enter__(self) -> PoolServices:
        try:
            return self.start()
        # a start that fails half way (no GPUs joined) leaves no services running
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
