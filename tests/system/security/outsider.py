"""Another local account, for the tests of what a user's pool lets other people on the machine do: a
real Unix account, and a Python interpreter (with Dask) that account can run.

Everything made here is removed at the end, whatever happened: the account (``userdel -r``) and the
interpreter's folder. Nothing on the machine is changed for it: when the test's interpreter lives
where other accounts cannot go (pyenv under /root on the CI machine), the account gets a view of it
instead, a folder of hard links (copies across file systems) to the interpreter, its standard
library and the installed packages Dask needs, readable by everyone as those files already are.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PREFIX = "jgpux"  # test accounts are jgpux<random>: nobody's real account
REPO = Path(__file__).resolve().parents[3]


def why_not() -> str | None:
    """Why these tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "these tests make a Unix account and act as it: run them as root (CI does)"
    for tool in ("useradd", "userdel"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


@dataclass
class Outsider:
    """A local account with a Python of its own; :meth:`run` runs a script as it (uid, gid, no
    groups)."""

    name: str
    uid: int
    gid: int
    home: str
    python: list[str]
    env: dict[str, str]
    cwd: str

    def run(
        self, script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.python, script, *args],
            env={**self.env, **(env or {})},
            cwd=self.cwd,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@contextlib.contextmanager
def outsider() -> Iterator[Outsider]:
    """A fresh account (with a home) and a Python it can run; both removed at the end."""
    name = PREFIX + secrets.token_hex(4)
    view = tempfile.mkdtemp(prefix="jgpu-outsider-py-")
    made = False
    try:
        subprocess.run(
            ["useradd", "-m", "-U", "-s", "/bin/sh", name], check=True, capture_output=True
        )
        made = True
        entry = pwd.getpwnam(name)
        os.chmod(view, 0o755)
        python, env = _python_for(entry.pw_uid, entry.pw_gid, Path(view))
        env.update(HOME=entry.pw_dir, USER=name, LOGNAME=name, PATH="/usr/bin:/bin")
        yield Outsider(name, entry.pw_uid, entry.pw_gid, entry.pw_dir, python, env, view)
    finally:
        if made:
            subprocess.run(["userdel", "-r", "-f", name], capture_output=True)
        shutil.rmtree(view, ignore_errors=True)


def _can_run(uid: int, gid: int, python: list[str], env: dict[str, str]) -> bool:
    try:
        probe = subprocess.run(
            [*python, "-c", "import distributed, cryptography, jupyter_gpu"],
            env=env,
            cwd="/",
            user=uid,
            group=gid,
            extra_groups=[],
            capture_output=True,
            timeout=120,
        )
    except OSError:  # the account cannot even execute it
        return False
    return probe.returncode == 0


def _python_for(uid: int, gid: int, view: Path) -> tuple[list[str], dict[str, str]]:
    """The test's own interpreter if the account can run it with Dask, else a view of it in
    ``view``."""
    env = {"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    if _can_run(uid, gid, [sys.executable], env):
        return [sys.executable], env
    prefix = Path(sys.base_prefix)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    exe = Path(os.path.realpath(sys.executable))
    _link(exe, view / exe.relative_to(prefix))
    for lib in (prefix / "lib").glob("libpython*"):
        _link(lib, view / "lib" / lib.name)
    _link_tree(stdlib, view / stdlib.relative_to(prefix), skip={site, stdlib / "test"})
    packages = view / "site"
    for top in _packages_dask_needs(site):
        _link_tree(site / top, packages / top) if (site / top).is_dir() else _link(
            site / top, packages / top
        )
    python = [str(view / exe.relative_to(prefix))]
    env.update(
        PYTHONPATH=f"{packages}:{REPO}", PYTHONHOME=str(view), LD_LIBRARY_PATH=str(view / "lib")
    )
    if not _can_run(uid, gid, python, env):
        raise RuntimeError(f"could not make a Python that account {uid} can run in {view}")
    return python, env


def _packages_dask_needs(site: Path) -> list[str]:
    """The top-level entries of site-packages that a Dask client, a TLS server and jupyter_gpu's
    client side import (found by importing them here), with their .libs folders and every
    .dist-info."""
    code = (
        "import json, sys, distributed, distributed.comm.tcp, distributed.protocol, "
        "cryptography.x509, "
        "cryptography.hazmat.primitives.asymmetric.ec, jupyter_core.paths, "
        "jupyter_gpu.common.security, "
        "jupyter_gpu.common.pool_credentials\n"
        "from distributed import Client, Scheduler\n"
        "print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values()) "
        "if getattr(m, '__file__', None)})))"
    )
    files = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=str(REPO)
        ).stdout
    )
    tops = {Path(f).relative_to(site).parts[0] for f in files if Path(f).is_relative_to(site)}
    extra = {
        p.name
        for p in site.iterdir()
        if p.name.endswith(".dist-info")
        or any(p.name.startswith(t.split(".")[0]) and p.name.endswith(".libs") for t in tops)
    }
    return sorted(tops | extra)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(dst.parent, 0o755)
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path, skip: set[Path] = frozenset()) -> None:
    for root, dirs, files in os.walk(src):
        here = Path(root)
        dirs[:] = [d for d in dirs if here / d not in skip]
        target = dst / here.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o755)
        for name in files:
            if not os.path.islink(here / name):
                _link(here / name, target / name)
