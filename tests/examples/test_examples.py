"""Outside code nobody here wrote, run as notebooks of %%gpu cells: pytorch/tutorials'
polynomial_nn.py, pytorch/examples' mnist/main.py (on scikit-learn's digits) and the DDP tutorial
series' multigpu.py.

The notebooks (beside this file) hold the authors' code as they wrote it; what ``%%gpu`` needs, and
the data of the MNIST example, is marked ``# jupyter-gpu example:`` in them. They run headlessly
like any notebook (``jupyter-gpu run``, ``pytest --nbgpu tests/examples``); here each runs on the
tests' pool of two virtual GPUs in a folder of its own (the DDP example writes its checkpoint where
it runs).
"""

from __future__ import annotations

import io
import os
import re
import shutil

import nbformat
import pytest

from jupyter_gpu.headless.runner import run_notebook

pytestmark = pytest.mark.integration
HERE = os.path.dirname(os.path.abspath(__file__))


def run(pool: str, tmp_path, name: str, timeout: float = 300) -> list[str]:
    """Run the example ``name`` and return each code cell's text output."""
    path = tmp_path / name
    shutil.copy(os.path.join(HERE, name), path)
    err = io.StringIO()
    code = run_notebook(
        str(path), output=str(tmp_path / "out.ipynb"), pool=pool, stream=err, timeout=timeout
    )
    assert code == 0, err.getvalue()
    nb = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    texts = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            texts.append(
                "".join(
                    o.get("text", "")
                    if o.get("output_type") == "stream"
                    else str(o.get("data", {}).get("text/plain", "")) + "\n"
                    for o in cell.outputs
                )
            )
    return texts


def test_polynomial_nn_from_the_pytorch_tutorials(pool, tmp_path):
    texts = run(pool, tmp_path, "polynomial_nn.ipynb")
    losses = [float(m) for m in re.findall(r"^\d+ ([\d.e+-]+)$", texts[3], re.M)]
    assert len(losses) == 20 and losses[-1] < losses[0], texts[3]
    assert re.search(
        r"Result: y = [-\d.e]+ \+ [-\d.e]+ x \+ [-\d.e]+ x\^2 \+ [-\d.e]+ x\^3", texts[4]
    ), texts[4]


def test_mnist_example_on_scikit_learns_digits(pool, tmp_path):
    texts = run(pool, tmp_path, "mnist.ipynb")
    out = texts[-1]
    assert "Train Epoch: 2 [" in out, out
    accuracy = [int(a) for a in re.findall(r"Accuracy: \d+/450 \((\d+)%\)", out)]
    assert len(accuracy) == 2 and accuracy[-1] >= 80, out


def test_the_ddp_tutorials_multigpu_on_two_ranks(pool, tmp_path):
    texts = run(pool, tmp_path, "multigpu.ipynb")
    out = texts[-1]
    for epoch in range(3):
        assert f"[GPU0] Epoch {epoch} | Batchsize: 32 | Steps: 32" in out, out
        assert f"[rank 1] [GPU1] Epoch {epoch} | Batchsize: 32 | Steps: 32" in out, out
    assert "Epoch 2 | Training checkpoint saved at checkpoint.pt" in out
    assert (tmp_path / "checkpoint.pt").exists()  # rank 0 saved it where the notebook runs
