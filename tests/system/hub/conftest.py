"""One JupyterHub in front of one team pool, shared by every test of tests/system/hub (CI time).

Real parts, started here and removed at the end whatever happened: Unix accounts ``jgh*`` with
passwords (``chpasswd``) that PAM checks at the Hub's login page; ``jupyter-gpu pool up`` and a
root ``jupyter-gpu worker`` (virtual GPUs; both give root up for a service account of their own,
which owns the pool's files) whose broker takes JupyterHub's tokens
(``jupyter-gpu.hub.*``) and whose quota file names the Hub group ``jghml`` as team ``ml``; the
Hub (PAMAuthenticator, LocalProcessSpawner, configurable-http-proxy) configured by
``jupyter_gpu.hubservice.config.configure`` as an administrator would, so users' servers get the
pool's address and their tokens the pool's scope with nothing set by hand; the panel built from
this checkout.
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.harness import snapshot
from tests.support.hub import Hub, can_run_a_hub
from tests.support.service_account import ENV as SERVICE_ENV
from tests.support.service_account import give, service_account
from tests.support.services import PoolServices
from tests.system.security.team import accounts, can_make_accounts, python_reachable_by_everyone

PREFIX = "jgh"  # this suite's accounts: never the security suite's jgpu* ones
ALICE, BOB, ADMIN = f"{PREFIX}alice", f"{PREFIX}bob", f"{PREFIX}admin"
CAROL, DAVE, ERIN = f"{PREFIX}carol", f"{PREFIX}dave", f"{PREFIX}erin"
USERS = (ALICE, BOB, ADMIN, CAROL, DAVE, ERIN)
GROUP = f"{PREFIX}ml"  # the Hub group that quota team "ml" names
CACHE_S, REFRESH_S, ACTIVITY_S = 3, 2, 3  # hub.cache-time, hub.groups-refresh, activity interval
STATIC = Path(__file__).resolve().parents[3] / "jupyter_gpu" / "labext" / "static"


def why_not() -> str | None:
    return can_make_accounts() or can_run_a_hub()


@dataclass
class HubPool:
    """The Hub, the pool behind it, the accounts and their passwords."""

    hub: Hub
    services: PoolServices
    secrets: Path
    passwords: dict[str, str]
    users: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.services.address

    def snapshot(self) -> dict:
        # in a thread of its own: Playwright's sync API keeps an event loop on the test's thread
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(snapshot, self.address).result()

    def leases_of(self, user: str) -> list[dict]:
        seen = {}
        for gpu in self.snapshot()["gpus"]:
            for lease in gpu["leases"]:
                if lease["user"] == user:
                    seen[lease["id"]] = lease
        return list(seen.values())


def _panel_folder() -> Path:
    """The panel built from this checkout, as a labextensions folder every account may read."""
    if not (STATIC / "package.json").exists():
        pytest.fail(f"the panel is not built: run `jlpm build` first ({STATIC} is missing)")
    folder = Path(tempfile.mkdtemp(prefix="jgh-labext-", dir="/var/tmp"))
    os.chmod(folder, 0o755)
    (folder / "jupyter-gpu").symlink_to(STATIC, target_is_directory=True)
    return folder


@pytest.fixture(scope="package")
def hubpool():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    passwords = {name: secrets.token_urlsafe(12) for name in USERS}
    with (
        accounts(*USERS) as users,
        service_account() as service,  # what pool up and worker give root up for (issue 20)
        python_reachable_by_everyone(),
    ):
        subprocess.run(
            ["chpasswd"],
            input="".join(f"{n}:{p}\n" for n, p in passwords.items()),
            text=True,
            check=True,
        )
        # 0700; the service account's, as are the files in it
        folder = Path(tempfile.mkdtemp(prefix="jgh-secrets-", dir="/var/tmp"))
        panel = _panel_folder()
        hub = services = None
        try:
            (folder / "pool.yaml").write_text(
                f"suspend-idle-after: null\nteams:\n  ml: {{guarantee: 1.0, hub-group: {GROUP}}}\n"
            )
            os.chmod(folder / "pool.yaml", 0o600)
            services = PoolServices(folder)  # its port: the Hub's config names the pool
            hub = Hub(
                services.address,
                users=list(USERS),
                admins=[ADMIN],
                spawner_args=[
                    f"--GpuPanelConfig.hub_activity_interval={ACTIVITY_S}",
                    "--GpuPanelConfig.update_interval=0.5",
                    f"--LabServerApp.extra_labextensions_path={panel}",
                ],
            )
            (folder / "hub.token").write_text(hub.service_token)
            os.chmod(folder / "hub.token", 0o600)
            give(service, folder)
            services.env.update(
                {
                    "DASK_JUPYTER_GPU__HUB__API_URL": hub.api_url,
                    "DASK_JUPYTER_GPU__HUB__API_TOKEN_FILE": str(folder / "hub.token"),
                    "DASK_JUPYTER_GPU__HUB__CACHE_TIME": f"{CACHE_S}s",
                    "DASK_JUPYTER_GPU__HUB__GROUPS_REFRESH": f"{REFRESH_S}s",
                    "DASK_JUPYTER_GPU__POOL_CONFIG": str(folder / "pool.yaml"),
                    "DASK_JUPYTER_GPU__AUDIT_DB": str(folder / "audit.sqlite"),
                    "DASK_JUPYTER_GPU__SESSION__STANDBY_AFTER": "0.5s",
                    SERVICE_ENV: service.pw_name,
                }
            )
            services.start()
            hub.start()
            for name in USERS:
                hub.ensure_user(name, admin=name == ADMIN)
            hub.set_group(GROUP, [ALICE, BOB])
            yield HubPool(hub, services, folder, passwords, users)
        finally:
            if hub is not None:
                hub.close()
            if services is not None:
                services.stop()
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(panel, ignore_errors=True)
