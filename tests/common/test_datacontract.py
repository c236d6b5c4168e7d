import numpy as np
import pytest
import torch

from jupyter_gpu.common.datacontract import (
    ModuleRef,
    cell_names,
    classify_output,
    input_item,
    to_cpu,
)


def test_free_and_assigned_names():
    free, assigned = cell_names(
        "import numpy as np\n"
        "x = x + 1\n"
        "y = np.array(data)\n"
        "for i in range(n):\n    total += i\n"
        "def f(a):\n    return a * scale\n"
        "z = [v * w for v in vals]\n"
        "print(z, len(z))\n"
    )
    assert free == ["data", "n", "scale", "total", "vals", "w", "x"]
    assert assigned == ["np", "x", "y", "i", "total", "f", "z"]


def test_magics_in_the_cell_do_not_break_analysis():
    free, assigned = cell_names("%time y = a\n!ls\nb = 2")
    assert "b" in assigned and "get_ipython" not in free


def test_syntax_error_gives_no_names_rather_than_failing():
    assert cell_names("def (:") == ([], [])


def test_class_and_lambda_scopes():
    free, assigned = cell_names("class M(Base):\n    k = K\ng = lambda q: q + off\n")
    assert set(free) == {"Base", "K", "off"} and assigned == ["M", "g"]


def test_modules_travel_by_name():
    assert input_item(np) == ModuleRef("numpy")
    assert input_item(3) == 3


@pytest.mark.parametrize(
    "value",
    [1, 2.5, "s", b"b", None, [1, 2], {"a": (1, 2)}, np.arange(5), torch.ones(3), np.float32(1.0)],
)
def test_plain_data_comes_back(value):
    assert classify_output("v", value, 1 << 20)[0] == "value"


def test_models_functions_and_large_values_stay_remote():
    kind, desc = classify_output("m", torch.nn.Linear(3, 1), 1 << 20)
    assert (
        kind == "remote"
        and "4 parameters" in desc["summary"]
        and "not plain data" in desc["reason"]
    )
    assert classify_output("f", lambda: 1, 1 << 20)[0] == "remote"
    kind, desc = classify_output("big", np.zeros(1 << 18), 1 << 20)
    assert kind == "remote" and "large" in desc["reason"]
    assert classify_output("np", np, 1 << 20)[0] == "skip"


def test_to_cpu_copies_modules_without_touching_the_original():
    m = torch.nn.Linear(2, 2)
    copy = to_cpu(m)
    assert copy is not m and torch.equal(copy.weight, m.weight)
