"""The shipped systemd units and their settings file (jupyter-config/systemd/): valid for systemd,
running the services as the least-privilege design and the drain expect, with every setting in
Dask's YAML config under /etc, and the same examples in docs/administration.md."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dask.config
import pytest
import yaml
from dask.utils import parse_timedelta

from jupyter_gpu import cli
from jupyter_gpu.common import config  # also registers the defaults

REPO = Path(__file__).parents[2]
UNITS = REPO / "jupyter-config" / "systemd"
UNIT_NAMES = ("jupyter-gpu-scheduler.service", "jupyter-gpu-worker.service")
EXAMPLE = UNITS / "jupyter-gpu.yaml"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign] # systemd keys are case-sensitive
    unit.read_string((UNITS / name).read_text())
    return unit


def test_the_shipped_units_pass_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` of both units in a root of their own (systemd need not be PID 1):
    the targets they name are the machine's, and `/usr/local/bin/jupyter-gpu` (what the units
    run, pip's system-wide place) is this checkout's CLI. Any warning (an unknown key, a value
    systemd cannot parse) fails the test: systemd only warns and ignores the line."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd (scripts/test.sh does)"
    assert SYSTEM_UNITS.is_dir(), f"{SYSTEM_UNITS} is missing: apt-get install systemd"
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    exe = root / "usr/local/bin/jupyter-gpu"
    exe.parent.mkdir(parents=True)
    exe.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m jupyter_gpu.cli "$@"\n')
    exe.chmod(0o755)
    installed = root / "etc/systemd/system"
    installed.mkdir(parents=True)
    for name in UNIT_NAMES:
        shutil.copy(UNITS / name, installed / name)
    res = subprocess.run(
        [analyze, "verify", f"--root={root}", *(str(installed / n) for n in UNIT_NAMES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr.strip() == "", res.stderr

    # the check itself sees a unit that systemd would misread
    broken = installed / "broken.service"
    broken.write_text((UNITS / UNIT_NAMES[1]).read_text().replace("KillMode=", "KilMode="))
    res = subprocess.run(
        [analyze, "verify", f"--root={root}", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Unknown key 'KilMode'" in res.stderr, res.stderr


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_the_units_start_the_services_as_root_to_drop_and_restart_only_on_failure(name):
    """Both run as root (no User=): `pool up` reads the grant-signing key and `worker` forks the
    launcher before they drop to the service account; `Restart=on-failure` (a worker whose
    scheduler stayed away, or whose launcher died, exits non-zero; a drained one exits 0); the
    stop signal goes to the main process only (`KillMode=mixed`): the scheduler leaves its workers
    waiting, the worker drains."""
    service = read_unit(name)["Service"]
    assert "User" not in service and "DynamicUser" not in service
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    assert not any(k.startswith("Environment") for k in service), "settings go in /etc/dask"
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/usr/local/bin/jupyter-gpu"
    args = cli.build_parser().parse_args(argv[1:])
    if name == "jupyter-gpu-scheduler.service":
        assert (args.command, args.action, args.embedded) == ("pool", "up", False)
        assert args.host is None and args.port is None  # from the YAML config
    else:
        assert args.command == "worker" and args.address is None and args.host is None
        # systemd must not cut a drain short: running cells get drain-timeout, moves offload-timeout
        stop = float(parse_timedelta(service["TimeoutStopSec"].replace("min", "m")))
        drain = config.get_seconds("worker.drain-timeout") + config.get_seconds("offload-timeout")
        assert stop > drain


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_example_settings_file_names_only_known_settings():
    """jupyter-config/systemd/jupyter-gpu.yaml (the /etc/dask file of the units): every
    `jupyter-gpu.*` key in it is one the package defines, and Dask reads /etc/dask."""
    example = yaml.safe_load(EXAMPLE.read_text())
    defaults = _leaves(dask.config.get("jupyter-gpu"))
    unknown = set(_leaves(example["jupyter-gpu"])) - set(defaults)
    assert not unknown, f"not settings of jupyter-gpu: {sorted(unknown)}"
    assert "/etc/dask" in dask.config.paths


def test_pool_up_and_worker_take_what_their_command_line_leaves_out_from_dask_config():
    example = yaml.safe_load(EXAMPLE.read_text())
    parser = cli.build_parser()
    with dask.config.set(example):
        args = parser.parse_args(["pool", "up"])
        cli._service_settings(args)
        assert (args.host, args.port) == ("10.0.0.5", 8786)
        args = parser.parse_args(["pool", "up", "--host", "10.0.0.6", "--port", "9000"])
        cli._service_settings(args)
        assert (args.host, args.port) == ("10.0.0.6", 9000)  # the command line wins
        # one user's embedded pool never listens on the service's address
        args = parser.parse_args(["pool", "up", "--embedded"])
        cli._service_settings(args)
        assert args.host == "127.0.0.1"
        args = parser.parse_args(["worker"])
        cli._service_settings(args)
        assert (args.address, args.host) == ("tcp://10.0.0.5:8786", None)
        args = parser.parse_args(["worker", "tcp://10.0.0.9:8786", "--host", "10.0.0.21"])
        cli._service_settings(args)
        assert (args.address, args.host) == ("tcp://10.0.0.9:8786", "10.0.0.21")
    with dask.config.set({"jupyter-gpu.worker.scheduler": None}):
        args = parser.parse_args(["worker"])
        with pytest.raises(SystemExit, match="jupyter-gpu.worker.scheduler"):
            cli._service_settings(args)
        args = parser.parse_args(["pool", "up"])
        cli._service_settings(args)
        assert (args.host, args.port) == ("127.0.0.1", 8786)  # the package's defaults


FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


def test_the_docs_examples_set_the_pool_through_the_yaml_file():
    """No example in the docs sets `jupyter-gpu.*` through DASK_JUPYTER_GPU__ variables; the
    administration guide shows the shipped units and settings file as they are."""
    docs = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
    for doc in docs:
        for block in FENCE.findall(doc.read_text()):
            assert "DASK_JUPYTER_GPU__" not in block, f"{doc.name}: {block}"
    guide = (REPO / "docs" / "administration.md").read_text()
    blocks = [b.strip() for b in FENCE.findall(guide)]
    for shipped in (EXAMPLE, *(UNITS / n for n in UNIT_NAMES)):
        assert shipped.read_text().strip() in blocks, f"{shipped.name} is not in the guide as is"
