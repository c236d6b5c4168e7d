"""A team on one machine, for the isolation tests: real Unix accounts, a token-checked pool run as
root by `jupyter-gpu pool up` and `jupyter-gpu worker`, and kernels that run as their users'
accounts.

The pool checks identities one of two ways (``identity``): its token file (``jupyter-gpu token
create``), or JupyterHub's tokens: then a real JupyterHub runs beside it (tests/support/hub.py), the
pool takes the Hub's tokens (``jupyter-gpu.hub.*``), and each kernel has what a Hub-started kernel
has (``JUPYTERHUB_USER``, ``JUPYTERHUB_API_TOKEN``) instead of the pool's variables.

Everything made here is removed at the end, whatever happened: the accounts (``userdel -r``; the
users' and the pool's service account), the pool's processes, the service account's folder of its
token file, quota file and audit store, and the one change to the machine the test needs: its Python
lives under /root (pyenv on the CI machine), so /root gets ``o+x`` (traverse, not list) while the
accounts run, and its mode is put back.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_gpu.broker.identity import TokenStore
from jupyter_gpu.headless.kernel import GpuKernel
from tests.support.service_account import ENV as SERVICE_ENV
from tests.support.service_account import give, service_account
from tests.support.services import PoolServices

# test accounts are jgpu<name>: nobody's real account. Two runs on one machine at once (engineers
# sharing a machine) each set their own prefix, or they would delete each other's accounts
PREFIX = os.environ.get("JUPYTER_GPU_TEST_ACCOUNTS", "jgpu")


def can_make_accounts() -> str | None:
    """Why the isolation tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "the isolation tests make Unix accounts and run a pool as root: run them as root (CI does)"
    if not shutil.which("useradd"):
        return "useradd is not installed"
    return None


@contextlib.contextmanager
def accounts(*names: str) -> Iterator[dict[str, pwd.struct_passwd]]:
    """Real accounts (with homes), removed at the end."""
    made = []
    try:
        for name in names:
            # a leftover of a killed run
            subprocess.run(["userdel", "-r", name], capture_output=True)
            subprocess.run(["useradd", "-m", "-U", name], check=True, capture_output=True)
            made.append(name)
        yield {name: pwd.getpwnam(name) for name in names}
    finally:
        for name in made:
            subprocess.run(["userdel", "-r", "-f", name], capture_output=True)


REACHABLE_STATE = Path("/var/tmp/jgpu-python-reachable.json")  # shared by every test run here


@contextlib.contextmanager
def python_reachable_by_everyone() -> Iterator[None]:
    """The interpreter's folders must be reachable by the accounts (not so for /root on the CI
    machine).

    Several test runs on one machine (parallel CI jobs, several people) share the change: the
    first run that needs it records the folders' modes, and the last one to leave puts them back
    (a lock file and the list of runs that hold it), so one run's cleanup never takes the
    interpreter away from another that is still running. A run of an older copy of this helper
    knows nothing of the list and puts the mode back when it ends, so while we hold it a thread
    puts ``o+x`` back within a fifth of a second (a spawned worker would fail to import)."""
    path = Path(os.path.realpath(os.sys.executable)).parent
    folders = [*reversed(path.parents), path]
    with _reachable_state() as state:
        state["holders"] = [pid for pid in state.get("holders", []) if _alive(pid)]
        if not state["holders"]:
            state["changed"] = []
            for folder in folders:
                mode = folder.stat().st_mode
                if not mode & stat.S_IXOTH:
                    state["changed"].append([str(folder), stat.S_IMODE(mode)])
                    os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)
        state["holders"].append(os.getpid())
        needed = [Path(folder) for folder, _ in state.get("changed", [])]
    stop = threading.Event()
    keeper = threading.Thread(target=_keep_traversable, args=(needed, stop), daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join(5)
        with _reachable_state() as state:
            state["holders"] = [
                pid for pid in state.get("holders", []) if pid != os.getpid() and _alive(pid)
            ]
            if not state["holders"]:
                for folder, mode in state.get("changed", []):
                    os.chmod(folder, mode)
                state["changed"] = []


def _keep_traversable(folders: list[Path], stop: threading.Event) -> None:
    while not stop.wait(0.2):
        for folder in folders:
            try:
                mode = folder.stat().st_mode
                if not mode & stat.S_IXOTH:
                    os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _reachable_state() -> Iterator[dict]:
    """The shared record of ``python_reachable_by_everyone``, read and written under a lock."""
    import fcntl
    import json

    fd = os.open(f"{REACHABLE_STATE}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            state = json.loads(REACHABLE_STATE.read_text())
        except (OSError, ValueError):
            state = {}
        yield state
        REACHABLE_STATE.write_text(json.dumps(state))
    finally:
        os.close(fd)


@dataclass
class Team:
    """The running team pool: its services, its secret files, each user's token, and the pool's
    service account (which the services run as, and which owns the secret files)."""

    services: PoolServices
    secrets: Path  # the service account's private folder: token file, quota file, audit store
    tokens: dict[str, str]
    users: dict[str, pwd.struct_passwd]
    service: pwd.struct_passwd
    kernels: list[GpuKernel] = field(default_factory=list)
    hub: Any = None  # the JupyterHub whose tokens the pool takes (identity "hub"), else None

    @property
    def address(self) -> str:
        return self.services.address

    def new_token(self, name: str) -> str:
        """A token for pool user ``name`` (who may have no account), as the administrator (or
        the Hub) issues one (a token file stays the service account's)."""
        if self.hub is not None:
            self.hub.ensure_user(name)
            return self.hub.user_token(name)[0]
        token = TokenStore(str(self.secrets / "tokens.json")).create(name)
        give(self.service, self.secrets / "tokens.json")
        return token

    def kernel(self, name: str, **kwargs: object) -> GpuKernel:
        """A kernel running as ``name``'s account, with that user's pool name and token (behind
        the Hub: the Hub's user and token, as a Hub-started kernel has them)."""
        if self.hub is not None:
            who: dict[str, Any] = {
                "env": {"JUPYTERHUB_USER": name, "JUPYTERHUB_API_TOKEN": self.tokens[name]}
            }
        else:
            who = {"user": name, "env": {"JUPYTER_GPU_TOKEN": self.tokens[name]}}
        k = GpuKernel(self.address, account=name, cwd=self.users[name].pw_dir, **who, **kwargs)
        self.kernels.append(k)
        return k.start()


@contextlib.contextmanager
def team_pool(
    names: tuple[str, ...],
    extra_env: dict[str, str] | None = None,
    worker_account: str | None = None,
    identity: str = "tokens",
) -> Iterator[Team]:
    """The services run as root, as an administrator starts them: they give root up for the pool's
    service account (made here, ``jgpusvc...``), which owns the token file, quota file and audit
    store. ``worker_account``: run the worker as this (non-root) account instead, one of
    ``names``: a pool that cannot isolate its users, and says so. It gets its own copy of the pool
    key (the service account's is not its to read)."""
    with (
        accounts(*names) as users,
        service_account() as service,
        python_reachable_by_everyone(),
    ):
        secrets = Path(tempfile.mkdtemp(prefix="jgpu-secrets-", dir="/var/tmp"))  # 0700
        hub = None
        try:
            (secrets / "pool.yaml").write_text("suspend-idle-after: null\n")
            os.chmod(secrets / "pool.yaml", 0o600)
            give(service, secrets)
            env = {
                "DASK_JUPYTER_GPU__POOL_CONFIG": str(secrets / "pool.yaml"),
                "DASK_JUPYTER_GPU__AUDIT_DB": str(secrets / "audit.sqlite"),
                "DASK_JUPYTER_GPU__SESSION__STANDBY_AFTER": "0.5s",
                SERVICE_ENV: service.pw_name,
                **(extra_env or {}),
            }
            worker_env = {}
            if worker_account is not None:
                key = "a-pool-key-for-the-test-worker\n"
                for owner, where in ((users[worker_account], "pool.key"), (service, "pool.key")):
                    path = Path(owner.pw_dir) / where
                    path.write_text(key)
                    os.chmod(path, 0o600)
                    os.chown(path, owner.pw_uid, owner.pw_gid)
                env["DASK_JUPYTER_GPU__POOL_KEY_FILE"] = str(Path(service.pw_dir) / "pool.key")
                worker_env["DASK_JUPYTER_GPU__POOL_KEY_FILE"] = str(
                    Path(users[worker_account].pw_dir) / "pool.key"
                )
            services = PoolServices(
                secrets, env=env, worker_account=worker_account, worker_env=worker_env
            )
            if identity == "hub":
                from tests.support.hub import Hub

                # its users need no account here (an OAuth login): a user with none is refused by
                # the pool, as the isolation contract says
                hub = Hub(services.address, users=list(names), admins=[], authenticator="dummy")
                (secrets / "hub.token").write_text(hub.service_token)
                os.chmod(secrets / "hub.token", 0o600)
                services.env["DASK_JUPYTER_GPU__HUB__API_URL"] = hub.api_url
                services.env["DASK_JUPYTER_GPU__HUB__API_TOKEN_FILE"] = str(secrets / "hub.token")
                hub.start()
                for name in names:
                    hub.ensure_user(name)
                tokens = {name: hub.user_token(name)[0] for name in names}
            else:
                store = TokenStore(str(secrets / "tokens.json"))
                tokens = {name: store.create(name) for name in names}
                services.env["DASK_JUPYTER_GPU__TOKEN_FILE"] = str(secrets / "tokens.json")
            give(service, secrets)  # the token file or the Hub's token too
            team = Team(
                services=services,
                secrets=secrets,
                tokens=tokens,
                users=users,
                service=service,
                hub=hub,
            )
            try:
                services.start()
                yield team
            finally:
                for k in team.kernels:
                    k.shutdown(now=True)
                services.stop()
        finally:
            if hub is not None:
                hub.close()
            shutil.rmtree(secrets, ignore_errors=True)
