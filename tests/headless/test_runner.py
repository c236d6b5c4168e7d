"""``jupyter-gpu run`` / ``run_notebook``: real notebooks on a real pool of virtual GPUs, real
kernels."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import nbformat
import psutil
import pytest

from jupyter_gpu.headless.pool import all_leases, pool_snapshot
from jupyter_gpu.headless.runner import inject_parameters, parse_value, run_notebook

pytestmark = pytest.mark.integration


def _outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(str(out["data"].get("text/plain", "")))
    return "\n".join(parts)


def _running(pid: int | None) -> bool:
    """Whether a process runs (a zombie waiting for its parent to reap it does not: it holds
    nothing)."""
    try:
        return bool(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_pool_idle(address: str, wait: float = 10.0) -> dict:
    """No lease and nothing queued in the pool (the broker's own view, gpu_snapshot)."""
    deadline = time.monotonic() + wait
    while True:
        snap = pool_snapshot(address)
        if not all_leases(snap) and not snap["queue"]:
            return snap
        assert time.monotonic() < deadline, (
            f"the pool still holds {all_leases(snap)} / queue {snap['queue']}"
        )
        time.sleep(0.1)


def test_parse_value_and_injection_position():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("[1, 2]") == [1, 2]
    assert (
        parse_value("True") is True
        and parse_value("resnet") == "resnet"
        and parse_value("'3'") == "3"
    )
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("a = 1"),
            nbformat.v4.new_code_cell("b = 2", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("c = 3"),
        ]
    )
    inject_parameters(nb, [("b", "5"), ("name", "x y")])
    assert [c.metadata.get("tags") for c in nb.cells] == [
        None,
        ["parameters"],
        ["injected-parameters"],
        None,
    ]
    assert nb.cells[2].source == "# Parameters\nb = 5\nname = 'x y'\n"
    inject_parameters(nb, [("b", "6")])  # a rerun replaces the injected cell
    assert sum("injected-parameters" in (c.metadata.get("tags") or []) for c in nb.cells) == 1
    plain = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("a = 1")])
    inject_parameters(plain, [("a", "2")])
    assert plain.cells[0].metadata["tags"] == ["injected-parameters"]


def test_passing_notebook(gpu_pool, copy_notebooks, tmp_path):
    (nb_path,) = copy_notebooks("passing.ipynb")
    err = io.StringIO()
    code = run_notebook(str(nb_path), pool=gpu_pool, stream=err)
    assert code == 0, err.getvalue()
    # it says where it is while it runs: each cell as it starts and ends (it was silent until the
    # end)
    said = err.getvalue()
    assert "jupyter-gpu run: cell 2/7: %load_ext jupyter_gpu" in said, said
    assert re.search(r"jupyter-gpu run: cell 4/7: done in [\d.]+ s", said), said
    assert re.search(r"jupyter-gpu run: cell 6/7: raised \w+ in", said), said
    # the default output, beside it
    out = nbformat.read(tmp_path / "passing.out.ipynb", as_version=4)
    texts = [_outputs_text(c) for c in out.cells]
    assert "remote y = 42" in texts[3] and "local y = 42" in texts[4]
    assert "expected: this cell is tagged raises-exception" in str(out.cells[5].outputs)
    assert out.cells[6].get("outputs") == []  # skip-execution
    assert out.metadata["jupyter_gpu"]["status"] == "passed"
    # the source is untouched
    assert nbformat.read(nb_path, as_version=4).cells[3].get("outputs") == []
    _assert_pool_idle(gpu_pool)


def test_failing_gpu_cell_reports_cell_and_remote_traceback(gpu_pool, copy_notebooks, tmp_path):
    (nb_path,) = copy_notebooks("failing_gpu.ipynb")
    err = io.StringIO()
    code = run_notebook(
        str(nb_path), output=str(tmp_path / "executed.ipynb"), pool=gpu_pool, stream=err
    )
    report = err.getvalue()
    assert code == 1, report
    assert "\x1b" not in report
    assert "cell 3 (In [3]) raised ZeroDivisionError" in report
    assert "---- cell 3 (In [3]) source ----\n%%gpu\ndef steps(n):" in report
    assert "---- remote traceback ----" in report
    # the remote frames, with the cell's own lines, and not the magic's kernel-side frames
    assert "File <%%gpu cell In[3]>:5" in report and "----> 2     return 1024 // n" in report
    assert "run_cell_magic" not in report
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    assert "about to divide" in _outputs_text(executed.cells[2])
    assert (
        executed.cells[3].get("outputs") == []
        and executed.metadata["jupyter_gpu"]["failed_cell"] == 3
    )
    _assert_pool_idle(gpu_pool)


def test_parameters_reach_a_gpu_cell(gpu_pool, copy_notebooks, tmp_path):
    (nb_path,) = copy_notebooks("params.ipynb")
    err = io.StringIO()
    code = run_notebook(
        str(nb_path),
        output=str(tmp_path / "o.ipynb"),
        pool=gpu_pool,
        stream=err,
        parameters=[("batch", "21"), ("model", "resnet")],
    )
    assert code == 0, err.getvalue()
    out = nbformat.read(tmp_path / "o.ipynb", as_version=4)
    assert out.cells[2].metadata["tags"] == ["injected-parameters"]
    gpu_cell = next(c for c in out.cells if c.source.startswith("%%gpu"))
    assert "remote resnet 42 int" in _outputs_text(gpu_cell)  # shipped to the session, as an int


@pytest.mark.parametrize("notebook", ["slow_gpu.ipynb", "slow_gpu_ignores_sigint.ipynb"])
def test_timeout_interrupts_and_frees_the_lease(gpu_pool, copy_notebooks, tmp_path, notebook):
    (nb_path,) = copy_notebooks(notebook)
    err = io.StringIO()
    started = time.monotonic()
    # the first %%gpu cell (the session start) has its own limit in its metadata: 120 s
    code = run_notebook(
        str(nb_path), output=str(tmp_path / "o.ipynb"), pool=gpu_pool, stream=err, timeout=5
    )
    elapsed = time.monotonic() - started
    report = err.getvalue()
    assert code == 1, report
    assert "cell 3 (In [3]) timed out after 5 s" in report, report
    assert elapsed < 60, f"the timeout did not stop the run promptly ({elapsed:.0f} s)"
    out = nbformat.read(tmp_path / "o.ipynb", as_version=4)
    lease = re.search(r"lease (L\d+)", _outputs_text(out.cells[1])).group(1)
    assert "timed out" in _outputs_text(out.cells[2])
    _assert_pool_idle(gpu_pool)

    async def lease_info():
        from jupyter_gpu.common.security import pool_rpc

        async with pool_rpc(gpu_pool) as r:
            return await r.gpu_lease_info(lease=lease)

    import asyncio

    info = asyncio.run(lease_info())
    assert info["state"] == "ended", info
    deadline = time.monotonic() + 10
    while _running(info.get("pid")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(info.get("pid")), "the remote session process outlived its lease"


def test_cli_with_a_private_pool(copy_notebooks, tmp_path):
    """No --pool: the CLI starts its own embedded pool and stops it afterwards."""
    (nb_path,) = copy_notebooks("params.ipynb")
    out = tmp_path / "o.ipynb"
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_GPU_SCHEDULER"}
    # the user's embedded pool is not touched
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_gpu.cli",
            "run",
            str(nb_path),
            "-o",
            str(out),
            "-p",
            "batch",
            "5",
            "-p",
            "model",
            "vit",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "passed" in proc.stderr
    executed = nbformat.read(out, as_version=4)
    assert "remote vit 10 int" in _outputs_text(executed.cells[3])
    # the private pool's directory is gone with it
    assert not list((tmp_path / "runtime").glob("jupyter-gpu-pool-*.json"))


def test_cli_refuses_what_it_cannot_run(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "jupyter_gpu.cli", "run", str(tmp_path / "nope.ipynb")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    err = io.StringIO()
    nb = tmp_path / "a.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), nb)
    assert run_notebook(str(nb), parameters=[("not a name", "1")], stream=err) == 2
    assert "not a Python identifier" in err.getvalue()


def test_a_kernel_that_dies_fails_the_run_and_frees_its_lease(gpu_pool, tmp_path):
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("%load_ext jupyter_gpu"),
            nbformat.v4.new_code_cell("%%gpu\nz = 1"),
            nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"),
        ]
    )
    nbformat.write(nb, tmp_path / "dies.ipynb")
    err = io.StringIO()
    assert run_notebook(str(tmp_path / "dies.ipynb"), pool=gpu_pool, stream=err) == 1
    assert "the kernel died while running cell 3" in err.getvalue()
    _assert_pool_idle(gpu_pool)


def test_unknown_parameters_are_refused_before_anything_runs(tmp_path):
    """`jupyter-gpu run -p epochs 30` on a notebook whose parameters cell lacks `epochs` (or that
    has no parameters cell) ran with the notebook's own value, silently. Now it is refused, naming
    what is declared."""
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("epochs = 150\nlr = 0.01", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("raise SystemExit('never run')"),
        ]
    )
    path = tmp_path / "p.ipynb"
    nbformat.write(nb, path)
    err = io.StringIO()
    assert run_notebook(str(path), parameters=[("epoch", "30")], stream=err) == 2
    assert "unknown parameter 'epoch'" in err.getvalue() and "assigns epochs, lr" in err.getvalue()
    untagged = tmp_path / "u.ipynb"
    nbformat.write(
        nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("epochs = 150")]), untagged
    )
    err = io.StringIO()
    assert run_notebook(str(untagged), parameters=[("epochs", "30")], stream=err) == 2
    assert "has no cell tagged 'parameters'" in err.getvalue()
    assert not (tmp_path / "p.out.ipynb").exists()  # nothing ran


@pytest.mark.parametrize("name", ["01-quickstart.ipynb", "02-scale-out.ipynb"])
def test_the_shipped_notebooks_declare_their_parameters(name):
    from jupyter_gpu.headless.runner import parameter_names

    path = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks", name)
    assert "epochs" in (parameter_names(nbformat.read(path, as_version=4)) or [])
