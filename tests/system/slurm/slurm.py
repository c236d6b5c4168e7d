"""A real one-node Slurm cluster on this machine, started by hand: ``munged``, ``slurmctld`` and
``slurmd`` from Debian's packages, with a generated ``slurm.conf`` in a folder of their own, so
that ``sbatch``, ``squeue`` and ``scancel`` are real and the pool's cluster manager drives real
jobs.

Installed when missing (``apt-get install slurm-wlm munge``: CI runs as root with the Debian
mirror);
:func:`unavailable` says why when that cannot be done, which is the only reason to skip. Nothing here uses
systemd or the machine's ``/etc/slurm``: the daemons run in the foreground as children of the
test, on ports of their own, with ``SLURM_CONF`` pointing the commands at this cluster.
Everything is stopped and removed by :meth:`LocalSlurm.close`, and :func:`sweep_stale` removes
what a killed run left (its folder names the run's process id).

The node has this machine's CPUs and no cgroup plugin (``proctrack/linuxproc``, ``task/none``:
containers and CI machines rarely let Slurm own cgroups), so a job's processes are found by their
parent and all of them are signalled when it ends (walltime, ``scancel``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from jupyter_gpu.common.processes import pid_alive
from tests.support.lifecycle import Started

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
ROOT_PREFIX = "jgsl-"
ROOT_BASE = Path("/var/tmp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def installed() -> bool:
    return all(shutil.which(d) for d in DAEMONS) and all(
        shutil.which(c) for c in ("sbatch", "squeue", "scancel")
    )


def unavailable() -> str | None:
    """Install Slurm and MUNGE if they are missing; why they cannot be had here, or None."""
    if installed():
        return None
    if os.geteuid() != 0:
        return (
            "Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)"
        )
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and this machine has no apt-get to install Debian's slurm-wlm and munge"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:  # an old package list: update it once and try again
        subprocess.run(
            ["apt-get", "update", "-qq"], capture_output=True, text=True, env=env, timeout=600
        )
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0 or not installed():
        return f"could not install {' and '.join(PACKAGES)} with apt-get: {(done.stderr or done.stdout).strip()[-500:]}"
    return None


def sweep_stale() -> list[str]:
    """Stop the daemons and remove the folders of earlier runs whose process is gone."""
    removed = []
    for folder in ROOT_BASE.glob(f"{ROOT_PREFIX}*"):
        m = re.match(rf"^{re.escape(ROOT_PREFIX)}(\d+)-", folder.name)
        if not m or pid_alive(int(m.group(1))):
            continue
        for pidfile in folder.glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(str(folder))
    return removed


class LocalSlurm(Started):
    """See the module docstring. ``env()`` is what a process needs to use this cluster
    (``SLURM_CONF``)."""

    def __init__(self, cpus: int | None = None, memory_mb: int = 4096):
        self.root = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-", dir=ROOT_BASE))
        os.chmod(self.root, 0o755)  # munged wants every folder above its socket searchable
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env()},
            cwd=str(self.root),
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start(self) -> LocalSlurm:
        r = self.root
        key = r / "munge.key"
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as f:
            f.write(os.urandom(1024))
        socket_path = r / "munge.socket"
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={r / 'munged.pid'}",
                f"--seed-file={r / 'munged.seed'}",
                f"--log-file={r / 'munged.log'}",
            ],
        )
        self._wait(lambda: socket_path.exists(), 20, "munged's socket")
        for folder in ("state", "spool"):
            (r / folder).mkdir()
        ctld_port, node_port = _free_port(), _free_port()
        self.conf.write_text(f"""\
# a one-node cluster for jupyter-gpu's tests (tests/system/slurm/slurm.py)
ClusterName=jgpu{os.getpid()}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "slurmctld.log"}
SlurmdLogFile={r / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
# the node is what this file says (CPUs, memory), whatever the machine has: CI machines differ
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=jgpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(
            lambda: self.run("scontrol", "ping", check=False).returncode == 0, 30, "slurmctld"
        )
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(
            lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False).stdout,
            30,
            "the node to be idle",
        )
        return self

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, env={**os.environ, **self.env()}, timeout=30
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done

    def jobs(self) -> dict[str, tuple[str, str]]:
        """``{job id: (state, reason)}`` of every job Slurm remembers, from ``squeue`` itself."""
        out = self.run("squeue", "--noheader", "--states=all", "--format=%i|%T|%r").stdout
        return {
            p[0]: (p[1], p[2])
            for p in (line.split("|") for line in out.splitlines())
            if len(p) == 3
        }

    def live_jobs(self) -> dict[str, tuple[str, str]]:
        return {
            j: s
            for j, s in self.jobs().items()
            if s[0] in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")
        }

    def log(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out", "munged.out"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.log()}"
                    )
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.log()}")

    def close(self) -> None:
        """Cancel every job, stop the daemons, remove the folder."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", "--full", "--user", "root", check=False)
                deadline = time.monotonic() + 15
                while self.live_jobs() and time.monotonic() < deadline:
                    time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for f in self._logs:
            f.close()
        shutil.rmtree(self.root, ignore_errors=True)
