"""The shipped notebooks run headlessly (nbclient, a real kernel) against the embedded virtual-GPU
pool."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.integration
NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks")


def _outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def test_quickstart_runs_and_shows_its_results(pool, monkeypatch):
    monkeypatch.setenv("JUPYTER_GPU_SCHEDULER", pool)
    nb = nbformat.read(os.path.join(NOTEBOOKS, "01-quickstart.ipynb"), as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    train = next(c for c in code if "--name spirals" in c.source)
    assert "trained on cpu: final loss" in _outputs_text(train)
    # the progress display from jupyter_gpu.report
    assert "rank 0: 150/150 steps (100%)" in _outputs_text(train)
    evaluate = next(c for c in code if "accuracy = float" in c.source)
    assert any("image/png" in o.get("data", {}) for o in evaluate.outputs)
    local = next(c for c in code if "the model stays remote" in c.source)
    assert "RemoteObject - the model stays remote" in _outputs_text(local)
    assert any("image/png" in o.get("data", {}) for o in local.outputs)
    assert "local and remote predictions agree: True" in _outputs_text(code[-2])


def test_scale_out_notebook_trains_on_one_then_two_workers(pool, monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTER_GPU_SCHEDULER", pool)
    monkeypatch.setenv("DASK_JUPYTER_GPU__SCALEOUT__CHECKPOINT_DIR", str(tmp_path))
    nb = nbformat.read(os.path.join(NOTEBOOKS, "02-scale-out.ipynb"), as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    one = next(c for c in code if "--workers 1" in c.source)
    two = next(c for c in code if "--workers 2" in c.source)
    assert "rank 0 of 1: final loss" in _outputs_text(one)
    assert "rank 0 of 2: final loss" in _outputs_text(
        two
    ) and "[rank 1] rank 1 of 2" in _outputs_text(two)
    assert "rank 1: 120/120 steps (100%)" in _outputs_text(two)  # per-rank progress
    assert "accuracy: 1 worker" in _outputs_text(code[-1])
    assert any("image/png" in o.get("data", {}) for o in code[-1].outputs)
