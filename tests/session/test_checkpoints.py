"""``jupyter_gpu.checkpoint()`` and ``jupyter_gpu.restore()`` as a cell calls them (``session/api.py``),
in this process (rank 0 of 1)."""

from __future__ import annotations

import pytest

from jupyter_gpu.session import api


@pytest.fixture()
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(api._state, "checkpoint_dir", str(tmp_path))
    monkeypatch.setitem(api._state, "attempt", 0)
    return tmp_path


def test_the_user_guides_restore_default_works(run_dir, capsys):
    """Bug fixed: the guide writes ``jupyter_gpu.restore(default)``, but the first parameter was the
    checkpoint's name: the default was taken as a name, ``None`` came back and the guide's loop
    failed with ``TypeError: 'NoneType' object is not subscriptable``."""
    state = api.restore({"step": -1})
    assert state == {"step": -1}
    for step in range(state["step"] + 1, 3):
        api.checkpoint({"step": step})
    assert api.restore({"step": -1}) == {"step": 2}
    assert "[jupyter-gpu] resumed from step 2" in capsys.readouterr().out
    assert api.restore(default={"step": -1}) == {"step": 2}


def test_a_named_checkpoint_is_read_by_its_name_and_a_name_as_the_default_is_refused(run_dir):
    api.checkpoint({"loss": 0.5}, name="best")
    assert api.restore(None, name="best") == {"loss": 0.5}
    assert api.restore(name="best") == {"loss": 0.5}
    assert api.restore(name="other") is None
    with pytest.raises(TypeError, match=r"restore\(name='best'\)"):
        api.restore("best")  # the old order: a name where the default goes
    assert api.restore("no such checkpoint") == "no such checkpoint"  # a text default is fine
    with pytest.raises(TypeError, match="non-empty string"):
        api.restore({}, name="")
