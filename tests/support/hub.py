"""A real JupyterHub for the tests, run as root: PAM logins, LocalProcessSpawner, its own
configurable-http-proxy, the pool declared as a Hub service with ``jupyter_gpu.hubservice.config``
exactly as an administrator would, and the Hub's REST API for what the tests do as an admin.

Used by tests/system/hub (a Hub in front of a team pool, browsers, the culler) and by the isolation
suite's Hub variant (tests/system/security). Everything started here is stopped at the end and the
Hub's folder (its database, cookie secret and logs) removed; the logs are kept in the folder until
then for failure reports.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.services import free_port


def can_run_a_hub() -> str | None:
    """Why a JupyterHub cannot be run here (None: it can)."""
    if os.geteuid() != 0:
        return "a JupyterHub that spawns users' servers runs as root: run these tests as root (CI does)"
    try:
        import jupyterhub  # noqa: F401
    except ImportError:
        return "JupyterHub is not installed (pip install -e '.[test]')"
    if not shutil.which("configurable-http-proxy"):
        return (
            "configurable-http-proxy is not installed (scripts/test.sh installs it: "
            "npm install -g configurable-http-proxy)"
        )
    return None


class HubError(AssertionError):
    """A Hub API call that failed, with the Hub's answer and log."""


class Hub:
    """One JupyterHub process (and the proxy it starts) with the pool as its service."""

    def __init__(
        self,
        pool: str,
        users: list[str],
        admins: list[str],
        extra_config: str = "",
        spawner_args: list[str] | None = None,
        spawner_env: dict[str, str] | None = None,
        authenticator: str = "pam",
    ):
        """``authenticator``: ``pam`` (the users' Unix passwords), or ``dummy`` (one random
        password nobody is told) for a Hub whose users need no account on this machine, as with an
        OAuth login."""
        self.root = Path(tempfile.mkdtemp(prefix="jgh-hub-", dir="/var/tmp"))  # 0700, root's
        self.port, self.hub_port, self.api_port = free_port(), free_port(), free_port()
        self.service_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"http://127.0.0.1:{self.hub_port}/hub/api"
        # the pool's service token (the broker reads groups with it), the tests' admin token, the
        # idle culler's token
        self.service_token = secrets.token_hex(16)
        self.admin_token = secrets.token_hex(16)
        self.culler_token = secrets.token_hex(16)
        self.pool = pool
        self.proc: subprocess.Popen | None = None
        self._log = None
        config = self.root / "jupyterhub_config.py"
        config.write_text(
            textwrap.dedent(f"""
            import sys
            from jupyter_gpu.hubservice.config import configure

            c = get_config()  # noqa: F821
            c.JupyterHub.ip = "127.0.0.1"
            c.JupyterHub.port = {self.port}
            c.JupyterHub.hub_ip = "127.0.0.1"
            c.JupyterHub.hub_port = {self.hub_port}
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.api_port}"
            c.JupyterHub.db_url = "sqlite:///{self.root}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{self.root}/cookie_secret"
            c.ConfigurableHTTPProxy.pid_file = "{self.root}/proxy.pid"
            # a Hub that stops (the tests stop it on purpose) leaves the users' servers running
            c.JupyterHub.cleanup_servers = False
            c.JupyterHub.authenticator_class = {authenticator!r}
            c.PAMAuthenticator.open_sessions = False
            c.DummyAuthenticator.password = {secrets.token_hex(16)!r}
            c.Authenticator.allowed_users = {set(users)!r}
            c.Authenticator.admin_users = {set(admins)!r}
            c.JupyterHub.spawner_class = "localprocess"
            c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
            c.Spawner.default_url = "/lab"
            c.Spawner.args = {list(spawner_args or [])!r}
            c.Spawner.start_timeout = 180
            c.Spawner.http_timeout = 180
            configure(
                c, {pool!r}, api_token={self.service_token!r},
                url="http://127.0.0.1:{self.service_port}",
            )
            c.Spawner.environment.update({dict(spawner_env or {})!r})
            c.JupyterHub.services.extend([
                {{"name": "jgh-tests", "api_token": {self.admin_token!r}}},
                {{"name": "idle-culler", "api_token": {self.culler_token!r}}},
            ])
            c.JupyterHub.load_roles.extend([
                {{"name": "jgh-tests", "services": ["jgh-tests"], "scopes": [
                    "admin:users", "admin:groups", "admin:servers", "tokens", "access:servers",
                    "read:roles",
                ]}},
                {{"name": "jgh-culler", "services": ["idle-culler"], "scopes": [
                    "list:users", "read:users:activity", "read:servers", "delete:servers",
                ]}},
            ])
            """)
            + extra_config
        )

    # ------------------------------------------------------------------ life
    def start(self) -> Hub:
        self._log = open(self.root / "hub.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(self.root / "jupyterhub_config.py")],
            cwd=self.root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HubError(f"JupyterHub exited ({self.proc.returncode}):\n{self.log()}")
            try:  # its API, and its login page through its proxy (routed once the Hub is up)
                with urllib.request.urlopen(f"{self.api_url}/", timeout=2):
                    pass
                with urllib.request.urlopen(f"{self.url}/hub/login", timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        raise HubError(f"JupyterHub did not answer within 120 s:\n{self.log()}")

    def stop(self, kill: bool = False) -> None:
        """Stop the Hub (``kill``: SIGKILL, as a crash); its proxy and the users' servers stay."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop every user's server, the Hub, its proxy and services; remove its folder."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                for user in self.api("GET", "/users") or []:
                    for name in (user.get("servers") or {}) if isinstance(user, dict) else ():
                        self.stop_server(user["name"], name, wait=False)
        except (HubError, OSError):
            pass
        self.stop()
        self._kill_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """The proxy (its pid file) and anything still running from this Hub's folder or config."""
        pid_file = self.root / "proxy.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
        # what the Hub started has the Hub's API in its environment as JupyterHub names it (the
        # pool, which names it in its own setting, is stopped by whoever started it)
        api = f"JUPYTERHUB_API_URL={self.api_url}".encode()
        page = f"JUPYTERHUB_SERVICE_URL=http://127.0.0.1:{self.service_port}".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                env = (proc / "environ").read_bytes()
            except OSError:
                continue
            if api in env or page in env:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log(self) -> str:
        path = self.root / "hub.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else "(no log)"

    # ------------------------------------------------------------------ the REST API, as an admin
    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.api_url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {token or self.admin_token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as reply:
                text = reply.read()
        except urllib.error.HTTPError as exc:
            raise HubError(
                f"{method} {path}: {exc.code} {exc.read()[:500]!r}\n{self.log()[-2000:]}"
            ) from None
        return json.loads(text) if text else None

    def user_token(
        self, user: str, note: str = "jgh test", scopes: list[str] | None = None
    ) -> tuple[str, str]:
        """A new API token of ``user`` (as the Hub's token page makes one): (token, its id)."""
        reply = self.api(
            "POST",
            f"/users/{user}/tokens",
            {"note": note, **({"scopes": scopes} if scopes else {})},
        )
        return reply["token"], reply["id"]

    def revoke(self, user: str, token_id: str) -> None:
        self.api("DELETE", f"/users/{user}/tokens/{token_id}")

    def ensure_user(self, user: str, admin: bool = False) -> None:
        try:
            self.api("POST", f"/users/{user}", {"admin": admin})
        except HubError as exc:
            if "409" not in str(exc):  # exists already
                raise

    def set_group(self, group: str, members: list[str]) -> None:
        """Make ``group`` hold exactly ``members``."""
        try:
            self.api("POST", f"/groups/{group}")
        except HubError as exc:
            if "409" not in str(exc):
                raise
        now = set(self.api("GET", f"/groups/{group}")["users"])
        if now - set(members):
            self.api("DELETE", f"/groups/{group}/users", {"users": sorted(now - set(members))})
        if set(members) - now:
            self.api("POST", f"/groups/{group}/users", {"users": sorted(set(members) - now)})

    def start_server(self, user: str, timeout: float = 240) -> str:
        """Start ``user``'s default server through the Hub and wait until it answers; its URL."""
        try:
            self.api("POST", f"/users/{user}/server")
        except HubError as exc:
            if "400" not in str(exc):  # running already
                raise
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.api("GET", f"/users/{user}")
            server = (model.get("servers") or {}).get("")
            if server and server.get("ready"):
                return f"{self.url}{server['url']}"
            time.sleep(0.5)
        raise HubError(f"{user}'s server did not start within {timeout:.0f} s:\n{self.log()}")

    def server_running(self, user: str) -> bool:
        server = (self.api("GET", f"/users/{user}").get("servers") or {}).get("")
        return bool(server and server.get("ready"))

    def stop_server(self, user: str, name: str = "", wait: bool = True) -> None:
        try:
            self.api("DELETE", f"/users/{user}/servers/{name}" if name else f"/users/{user}/server")
        except HubError as exc:
            if "400" not in str(exc) and "404" not in str(exc):
                raise
        deadline = time.monotonic() + 60
        while wait and time.monotonic() < deadline and self.server_running(user):
            time.sleep(0.5)
