"""A team on one machine, for the isolation tests: real Unix accounts, a token-checked pool run as
root by `jupyter-gpu pool up` and `jupyter-gpu worker`, and kernels that run as their users'
accounts.

The pool checks identities one of two ways (``identity``): its token file (``jupyter-gpu token
create``), or JupyterHub's tokens: then a real JupyterHub runs beside it (tests/support/hub.py), the
pool takes the Hub's tokens (``jupyter-gpu.hub.*``), and each kernel has what a Hub-started kernel
has (``JUPYTERHUB_USER``, ``JUPYTERHUB_API_TOKEN``) instead of the pool's variables.

Everything made here is removed at the end, whatever happened: the accounts (``userdel -r``), the
pool's processes, the root-only folder of its token file, quota file and audit store, and the one
change to the machine the test needs: its Python lives under /root (pyenv on the CI machine), so
/root gets ``o+x`` (traverse, not list) while the accounts run, and its mode is put back.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_gpu.broker.identity import TokenStore
from jupyter_gpu.headless.kernel import GpuKernel
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


@contextlib.contextmanager
def python_reachable_by_everyone() -> Iterator[None]:
    """The interpreter's folders must be reachable by the accounts (not so for /root on the CI
    machine)."""
    changed = []
    path = Path(os.path.realpath(os.sys.executable)).parent
    for folder in [*reversed(path.parents), path]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            changed.append((folder, stat.S_IMODE(mode)))
            os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)
    try:
        yield
    finally:
        for folder, mode in changed:
            os.chmod(folder, mode)


@dataclass
class Team:
    """The running team pool: its services, its secret files, and each user's token."""

    services: PoolServices
    secrets: Path  # root-only folder: token file, quota file, audit store
    tokens: dict[str, str]
    users: dict[str, pwd.struct_passwd]
    kernels: list[GpuKernel] = field(default_factory=list)
    hub: Any = None  # the JupyterHub whose tokens the pool takes (identity "hub"), else None

    @property
    def address(self) -> str:
        return self.services.address

    def new_token(self, name: str) -> str:
        """A token for pool user ``name`` (who may have no account), as the administrator (or
        the Hub) issues one."""
        if self.hub is not None:
            self.hub.ensure_user(name)
            return self.hub.user_token(name)[0]
        return TokenStore(str(self.secrets / "tokens.json")).create(name)

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
    """``worker_account``: run the worker as this (non-root) account, one of ``names``: a pool that
    cannot isolate its users, and says so. It gets its own copy of the pool key (root's is not its
    to read)."""
    with accounts(*names) as users, python_reachable_by_everyone():
        secrets = Path(tempfile.mkdtemp(prefix="jgpu-secrets-"))  # 0700, root's
        hub = None
        try:
            (secrets / "pool.yaml").write_text("suspend-idle-after: null\n")
            os.chmod(secrets / "pool.yaml", 0o600)
            env = {
                "DASK_JUPYTER_GPU__POOL_CONFIG": str(secrets / "pool.yaml"),
                "DASK_JUPYTER_GPU__AUDIT_DB": str(secrets / "audit.sqlite"),
                "DASK_JUPYTER_GPU__SESSION__STANDBY_AFTER": "0.5s",
                **(extra_env or {}),
            }
            if worker_account is not None:
                key = Path(users[worker_account].pw_dir) / "pool.key"
                key.write_text("a-pool-key-for-the-test-worker\n")
                os.chmod(key, 0o600)
                os.chown(key, users[worker_account].pw_uid, users[worker_account].pw_gid)
                env["DASK_JUPYTER_GPU__POOL_KEY_FILE"] = str(key)
            services = PoolServices(secrets, env=env, worker_account=worker_account)
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
            team = Team(services=services, secrets=secrets, tokens=tokens, users=users, hub=hub)
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
