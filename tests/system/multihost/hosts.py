"""Several machines on this one: hosts made of Linux network, mount and UTS namespaces, joined by a
bridge.

Each :class:`Host` is a network namespace (``ip netns``) with one veth link to a bridge on a private
test subnet, its own address and host name, and, for the processes started in it, a private
``/dev/shm`` and ``/tmp`` (``unshare -m``): so an address, a port, a host-memory copy or a file in
``/tmp`` on one host is not on another, and cross-host paths really cross. A folder under the hosts'
root (outside ``/tmp``) is what every host sees, like a shared filesystem. The test process stays in
the machine's own namespaces and reaches every host through the bridge's address.

Everything made here is named after the creating process (``jgmh-<pid>-...`` namespaces,
``jm<pid>...`` links, ``/var/tmp/jgmh-<pid>-...`` folders): :meth:`Hosts.close` removes what one run
made, even after a failed test, and :func:`sweep_stale` removes what runs whose process is gone left
behind (killed runs), never what a live run on this machine is using.

Used by ``tests/system/multihost`` (the pool across machines) and ``bench/multihost.py``. Needs root
(namespaces, links, mounts) and ``ip``/``unshare`` (iproute2, util-linux).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_gpu.common.processes import pid_alive
from tests.support.lifecycle import Started

log = logging.getLogger(__name__)

NETNS_PREFIX = "jgmh-"  # jgmh-<pid>-<host>
LINK_PREFIX = "jm"  # jm<pid>br, jm<pid>h<i> (link names are at most 15 characters)
ROOT_BASE = Path("/var/tmp")  # not /tmp: every host has a /tmp of its own
ROOT_PREFIX = "jgmh-"


def missing_tools() -> str | None:
    """Why hosts cannot be made here (not root, no ip/unshare, namespaces refused), or None."""
    if os.geteuid() != 0:
        return "making hosts needs root (network namespaces, links and mounts)"
    # Debian's iproute2, as CI installs it
    if shutil.which("ip") is None and shutil.which("apt-get") is not None:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "iproute2"],
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            timeout=600,
        )
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"making hosts needs `{tool}` (iproute2 / util-linux), and it could not be installed"
    probe = f"{NETNS_PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is refused here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def code_hidden_by_private_mounts() -> str | None:
    """Each host mounts a fresh /tmp and /dev/shm, so a checkout or interpreter under them is not
    there on a host, and every process started on one fails with "No module named jupyter_gpu". Say
    so up front."""
    import jupyter_gpu

    for what, path in (
        ("the jupyter_gpu package", os.path.dirname(jupyter_gpu.__file__)),
        ("the Python interpreter", sys.executable),
    ):
        real = os.path.realpath(path)
        if real.startswith(("/tmp/", "/dev/shm/")):
            return (
                f"{what} is at {real}, under a folder every test host replaces with a private one, "
                "so the "
                "hosts cannot run it. Check the project out (and make its environment) outside "
                "/tmp and "
                "/dev/shm, e.g. under /var/tmp or your home."
            )
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _netns_pids(ns: str) -> list[int]:
    done = _run("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _kill_netns(ns: str) -> None:
    """SIGKILL every process that lives in the network namespace ``ns`` (a host "powered off")."""
    for _ in range(20):
        pids = _netns_pids(ns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def sweep_stale() -> list[str]:
    """Remove namespaces, links and folders that runs of this module whose process is gone left
    behind."""
    removed: list[str] = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(rf"^{re.escape(NETNS_PREFIX)}(\d+)-", name)
        if m and not pid_alive(int(m.group(1))):
            _kill_netns(name)
            _run("ip", "netns", "del", name, check=False)
            removed.append(f"netns {name}")
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(rf"^\d+:\s+({re.escape(LINK_PREFIX)}(\d+)[a-z]\w*)[@:]", line)
        if m and not pid_alive(int(m.group(2))):
            _run("ip", "link", "del", m.group(1), check=False)
            removed.append(f"link {m.group(1)}")
    for folder in ROOT_BASE.glob(f"{ROOT_PREFIX}*"):
        m = re.match(rf"^{re.escape(ROOT_PREFIX)}(\d+)-", folder.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"folder {folder}")
    for what in removed:
        log.warning("removed a leftover of an earlier multi-host run: %s", what)
    return removed


def _free_subnet() -> str:
    """A /24 of 10.213.0.0/16 that no interface of this machine uses, picked from this process's
    id."""
    used = _run("ip", "-o", "-4", "addr", "show", check=False).stdout
    start = os.getpid() % 250
    for i in range(250):
        third = (start + i) % 250 + 1
        if f" 10.213.{third}." not in used:
            return f"10.213.{third}"
    raise RuntimeError("no free /24 in 10.213.0.0/16 for the test hosts")


@dataclass
class Host:
    """One machine: a network namespace with an address, a host name, and a folder of its own."""

    name: str
    ns: str
    ip: str
    veth: str  # the bridge's end of its link: down = the host is cut off
    # its own files (logs, runtime dir); the hosts' shared folder is ``Hosts.shared``
    folder: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.name} ({self.ip})"


class Hosts(Started):
    """``n`` hosts on a bridge; see the module docstring. Use as a context manager, or call
    :meth:`close`."""

    def __init__(self, names: list[str], mtu: int = 1500):
        self.tag = str(os.getpid())
        self.root = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{self.tag}-", dir=ROOT_BASE))
        os.chmod(self.root, 0o755)
        # what every host sees (a shared filesystem: checkpoints, keys)
        self.shared = self.root / "shared"
        self.shared.mkdir()
        self.subnet = _free_subnet()
        self.gateway = f"{self.subnet}.1"  # the bridge, in the test process's namespace
        self.bridge = f"{LINK_PREFIX}{self.tag}br"
        self.mtu = mtu
        self.hosts: dict[str, Host] = {}
        self._names = names
        self._logs: list = []

    # ------------------------------------------------------------------ making and removing
    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def start(self) -> Hosts:
        hidden = code_hidden_by_private_mounts()
        if hidden:
            raise RuntimeError(hidden)
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, name in enumerate(self._names):
            ns, veth = f"{NETNS_PREFIX}{self.tag}-{name}", f"{LINK_PREFIX}{self.tag}h{i}"
            host = Host(
                name=name, ns=ns, ip=f"{self.subnet}.{10 + i}", veth=veth, folder=self.root / name
            )
            host.folder.mkdir()
            self.hosts[name] = host
            _run("ip", "netns", "add", ns)
            _run(
                "ip",
                "link",
                "add",
                veth,
                "mtu",
                str(self.mtu),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            _run("ip", "link", "set", veth, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "mtu", str(self.mtu), "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", self.gateway)
        log.info(
            "hosts %s on %s.0/24 (bridge %s)",
            ", ".join(map(str, self.hosts.values())),
            self.subnet,
            self.bridge,
        )
        return self

    def close(self) -> None:
        """Stop every process on every host, remove the namespaces, links and folders."""
        for host in self.hosts.values():
            for proc in host.procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for host in self.hosts.values():
            for proc in host.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.1, deadline - time.monotonic()))
        for host in self.hosts.values():
            # what escaped its process group (session processes, their children)
            _kill_netns(host.ns)
            for proc in host.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            _run("ip", "netns", "del", host.ns, check=False)
            _run("ip", "link", "del", host.veth, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        for f in self._logs:
            with contextlib.suppress(Exception):
                f.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ processes on a host
    def spawn(
        self,
        host: str | Host,
        argv: list[str],
        env: dict[str, str] | None = None,
        log_name: str = "proc",
        private: bool = True,
    ) -> subprocess.Popen:
        """Start ``argv`` on ``host`` (its own process group), output to ``<host
        folder>/<log_name>.log``.

                ``private``: in a mount and UTS namespace of its own, with fresh ``/dev/shm`` and
                ``/tmp`` and the host's name (a machine's processes share these; another machine's
                do not). Without it, only the network is the host's (a kernel, whose connection
                files the test process must reach).
        """
        h = self.hosts[host] if isinstance(host, str) else host
        full_env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(h.folder / "runtime"), **(env or {})}
        inner = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
        if private:
            script = (
                f"hostname {shlex.quote(h.name)} && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && "
                'mount -t tmpfs -o mode=1777 tmpfs /tmp && exec "$@"'
            )
            cmd = [
                "ip",
                "netns",
                "exec",
                h.ns,
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                *inner,
            ]
        else:
            cmd = ["ip", "netns", "exec", h.ns, *inner]
        logf = open(h.folder / f"{log_name}.log", "ab")
        self._logs.append(logf)
        proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(h.folder),
            start_new_session=True,
        )
        h.procs.append(proc)
        return proc

    def log(self, host: str, log_name: str, tail: int = 6000) -> str:
        path = self.hosts[host].folder / f"{log_name}.log"
        text = path.read_text(errors="replace")[-tail:] if path.exists() else "(no log)\n"
        return f"--- {host}: {log_name}.log ---\n{text}"

    def kernelspec(self, host: str, directory: Path) -> str:
        """A kernelspec (in ``directory``/kernels) whose kernels run on ``host``: its argv starts
        with ``ip netns exec``. Put ``directory`` on ``JUPYTER_PATH`` to use it; returns its
        name."""
        h = self.hosts[host]
        name = f"jgmh-{self.tag}-{host}"
        spec_dir = directory / "kernels" / name
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "argv": [
                "ip",
                "netns",
                "exec",
                h.ns,
                sys.executable,
                "-m",
                "ipykernel_launcher",
                "-f",
                "{connection_file}",
            ],
            "display_name": f"Python 3 on {h.name}",
            "language": "python",
            "interrupt_mode": "signal",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
        return name

    # ------------------------------------------------------------------ failures
    def cut(self, host: str) -> None:
        """Take the host's link down: its processes run on, but nothing reaches it and it reaches
        nothing."""
        _run("ip", "link", "set", self.hosts[host].veth, "down")

    def reconnect(self, host: str) -> None:
        _run("ip", "link", "set", self.hosts[host].veth, "up")

    def power_off(self, host: str) -> None:
        """Every process of the host killed at once (SIGKILL), as when a machine dies."""
        _kill_netns(self.hosts[host].ns)
        for proc in self.hosts[host].procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
