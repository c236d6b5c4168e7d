"""``jupyter-gpu lab`` and ``jupyter-gpu pool down``: real processes, a real JupyterLab, a real
embedded pool.

Each test has its own runtime directory, so the pools here never meet a developer's or another
test's.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


def cli_env(tmp_path, virtual: str | None = "2x16GiB") -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JUPYTER_GPU_SCHEDULER", "JUPYTER_GPU_VIRTUAL_GPUS")
    }
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    if virtual:
        env["JUPYTER_GPU_VIRTUAL_GPUS"] = virtual
    return env


def pool_records(tmp_path) -> list:
    return list((tmp_path / "runtime").glob("jupyter-gpu-pool-*.json"))


def cli(*args, env, timeout=120, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "jupyter_gpu.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lab_help_starts_no_pool_and_no_gpu_is_a_message_not_a_traceback(tmp_path):
    # no GPU and no virtual ones: `lab` itself cannot start a pool
    env = cli_env(tmp_path, virtual=None)
    helped = cli("lab", "--help", env=env)
    assert helped.returncode == 0, helped.stderr
    # ours, then Lab's
    assert "usage: jupyter-gpu lab" in helped.stdout and "--ServerApp" in helped.stdout
    assert not pool_records(tmp_path) and "Traceback" not in helped.stderr
    failed = cli("lab", "--no-browser", env=env)
    assert failed.returncode == 1
    assert "jupyter-gpu lab: could not start the embedded GPU pool:" in failed.stderr, failed.stderr
    assert "JUPYTER_GPU_VIRTUAL_GPUS" in failed.stderr and "Traceback" not in failed.stderr, (
        failed.stderr
    )


def test_the_pool_that_lab_started_stops_when_lab_exits_or_fails(tmp_path):
    env = cli_env(tmp_path)
    # Lab fails at once (a bad option value): the pool it started for Lab goes with it
    failed = cli("lab", "--no-browser", "--ServerApp.port=not-a-port", env=env, timeout=180)
    assert failed.returncode != 0
    assert "jupyter-gpu: stopped the embedded pool" in failed.stderr, failed.stderr
    assert not pool_records(tmp_path)
    # Lab runs, then is stopped as a service manager stops it: the pool stops too
    port = free_port()
    lab = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_gpu.cli",
            "lab",
            "--no-browser",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            "--allow-root",
            f"--ServerApp.root_dir={tmp_path}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _listening(port):
            assert lab.poll() is None, lab.stderr.read()
            time.sleep(0.5)
        assert _listening(port) and len(pool_records(tmp_path)) == 1
        lab.send_signal(signal.SIGTERM)
        _, err = lab.communicate(timeout=60)
        assert "jupyter-gpu: stopped the embedded pool" in err, err
        assert not pool_records(tmp_path)
    finally:
        if lab.poll() is None:
            lab.kill()


def test_pool_down_stops_the_embedded_pool(tmp_path):
    env = cli_env(tmp_path)
    started = subprocess.run(
        [
            sys.executable,
            "-c",
            "from jupyter_gpu.pool.launcher import ensure_embedded_pool\n"
            "print(ensure_embedded_pool(keep=True))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    assert len(pool_records(tmp_path)) == 1
    down = cli("pool", "down", env=env)
    assert down.returncode == 0 and "stopped the embedded pool" in down.stderr, down.stderr
    assert not pool_records(tmp_path)
    again = cli("pool", "down", env=env)
    assert again.returncode == 0 and "no embedded pool is running" in again.stderr


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_pool_up_embedded_makes_the_runtime_folder_it_needs(tmp_path):
    """Bug fixed: ``jupyter-gpu pool up --embedded`` on an account whose Jupyter runtime folder did
    not exist yet failed with a FileNotFoundError traceback (making its TLS credentials next to
    the runtime file). It makes the folder, private, as Jupyter does."""
    env = cli_env(tmp_path)
    runtime = tmp_path / "runtime"
    assert not runtime.exists()
    log = open(tmp_path / "pool-up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "jupyter_gpu.cli", "pool", "up", "--embedded"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not pool_records(tmp_path) and up.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        output = (tmp_path / "pool-up.log").read_text(errors="replace")
        assert up.poll() is None and pool_records(tmp_path), output
        assert "Traceback" not in output, output
        assert runtime.stat().st_mode & 0o777 == 0o700
        down = cli("pool", "down", env=env)
        assert down.returncode == 0 and "stopped the embedded pool" in down.stderr, down.stderr
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
        log.close()
