"""A value that stayed in the GPU session is a placeholder in the kernel that explains itself,
whatever the code does with it."""

from __future__ import annotations

import copy
import pickle

import matplotlib
import numpy as np
import pytest
import torch

from jupyter_gpu.common.remote_value import RemoteObject

matplotlib.use("Agg")


def _placeholder(name: str = "y_pred") -> RemoteObject:
    return RemoteObject(
        name,
        "torch.Tensor",
        "shape (50, 1), torch.float32",
        200,
        "the virtual GPU",
        "it lives on the session's jupyter_gpu.device()",
        "L3",
    )


def test_remote_object_says_where_it_is_and_how_to_get_it():
    ref = RemoteObject(
        "model", "torch.nn.Linear", "4 parameters", 100, "cuda:0", "it lives on cuda:0", "L1"
    )
    text = repr(ref)
    assert "model" in text and "%gpu pull model" in text and "cuda:0" in text
    assert "%gpu pull model" in ref._repr_html_()


def _uses() -> dict:
    import matplotlib.pyplot as plt

    return {
        "y_pred.detach()": lambda y: y.detach(),
        "y_pred.shape": lambda y: y.shape,
        "y_pred + 1": lambda y: y + 1,
        "1 - y_pred": lambda y: 1 - y,
        "y_pred @ w": lambda y: y @ np.ones(2),
        "y_pred < 0": lambda y: y < 0,
        "-y_pred": lambda y: -y,
        "len(y_pred)": len,
        "list(y_pred)": list,
        "y_pred[0]": lambda y: y[0],
        "float(y_pred)": float,
        "bool(y_pred)": bool,
        "f'{y_pred:.2f}'": lambda y: f"{y:.2f}",
        "y_pred()": lambda y: y(),
        "np.asarray(y_pred)": np.asarray,
        "np.exp(y_pred)": np.exp,
        "np.concatenate([y_pred])": lambda y: np.concatenate([y]),
        "np.mean(y_pred)": np.mean,
        "torch.as_tensor(y_pred)": torch.as_tensor,
        "torch.cat([y_pred])": lambda y: torch.cat([y]),
        "plt.plot(x, y_pred)": lambda y: plt.plot(np.arange(50), y),
        "plt.plot(x, y_pred.detach())": lambda y: plt.plot(np.arange(50), y.detach()),
    }


@pytest.mark.parametrize("use", list(_uses()))
def test_any_use_as_a_local_value_says_what_it_is_where_it_lives_and_how_to_get_it(use):
    """The bare ``AttributeError: 'RemoteObject' object has no attribute 'detach'`` said none of
    it."""
    with pytest.raises((TypeError, AttributeError)) as err:
        _uses()[use](_placeholder())
    text = str(err.value)
    assert "\n" not in text, text  # one line
    assert "y_pred" in text and "torch.Tensor" in text and "stayed in your GPU session" in text
    assert "lease L3" in text, text
    assert "`%gpu pull y_pred`" in text and "`%%gpu --out y_pred`" in text, text


def test_it_still_behaves_as_an_object_for_python_ipython_and_the_kernel():
    y = _placeholder()
    assert not hasattr(y, "detach") and not hasattr(y, "_repr_png_")
    assert not hasattr(y, "__array_interface__")
    assert y == _placeholder() and y != _placeholder("other")
    assert f"{y}" == repr(y) and str(y) == repr(y)
    assert pickle.loads(pickle.dumps(y)) == y and copy.deepcopy(y) == y and copy.copy(y) == y
    assert y in [y] and isinstance(y, RemoteObject)
    assert (y.name, y.lease) == ("y_pred", "L3")
