"""The standby copy an idle session keeps in host memory, so that suspending it is a rename
(standby.py)."""

import logging
import os

import numpy as np
import torch

from jupyter_gpu.session.offload import STOP_CHECK_BYTES, load_namespace
from jupyter_gpu.session.standby import StandbyCopy
from tests.support.harness import wait_until


def namespace() -> dict:
    net = torch.nn.Linear(4, 2)
    return {
        "net": net,
        "opt": torch.optim.SGD(net.parameters(), lr=0.1),
        "x": torch.arange(5.0),
        "arr": np.arange(4096.0),
        "steps": (i for i in range(3)),
    }


def after_a_cell(copy: StandbyCopy) -> None:
    copy.changed()  # a cell starts ...
    copy.idle()  # ... and ends


def never() -> bool:
    return False


def test_nothing_is_copied_before_the_first_cell_or_when_turned_off(tmp_path):
    copy = StandbyCopy(str(tmp_path / "L1.standby"), 0.0)
    copy.idle()
    assert copy.due_in() is None  # a fresh session holds nothing of the user's
    off = StandbyCopy(None, None)
    after_a_cell(off)
    assert not off.enabled and off.due_in() is None
    assert StandbyCopy(str(tmp_path / "L2.standby"), None).due_in() is None


def test_a_copy_written_while_idle_is_handed_over_by_rename(tmp_path):
    ns = namespace()
    copy = StandbyCopy(str(tmp_path / "L1.standby"), 30.0)
    after_a_cell(copy)
    assert 29.0 < copy.due_in() <= 30.0
    copy.after = 0.0
    assert copy.due_in() == 0.0
    assert copy.take(ns, {}, 1 << 20, never)
    assert copy.due_in() is None  # one copy per namespace
    moved = copy.hand_over(str(tmp_path / "L1.pkl"))
    assert moved["standby"] and moved["path"] == str(tmp_path / "L1.pkl")
    assert moved["saved"] == ["arr", "net", "opt", "x"] and [x["name"] for x in moved["lost"]] == [
        "steps"
    ]
    assert not os.path.exists(copy.path)
    back: dict = {}
    assert load_namespace(back, moved["path"])["failed"] == []
    assert back["x"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    # still one model, one optimizer
    assert back["opt"].param_groups[0]["params"][0] is back["net"].weight
    assert copy.hand_over(str(tmp_path / "again.pkl")) is None  # handed over once


def test_a_cell_makes_the_copy_stale_removes_it_and_the_next_copy_has_the_new_values(tmp_path):
    ns = namespace()
    copy = StandbyCopy(str(tmp_path / "L3.standby"), 0.0)
    after_a_cell(copy)
    assert copy.take(ns, {}, None, never) and os.path.exists(copy.path)
    copy.changed()  # the next cell starts: the copy is of the old namespace
    assert not os.path.exists(copy.path)  # its host memory is given back at once
    ns["x"] = ns["x"] * 2
    # the offload must write the variables as they are
    assert copy.hand_over(str(tmp_path / "L3.pkl")) is None
    assert copy.due_in() is None  # still running: no copy of a namespace that is changing
    copy.idle()
    assert copy.take(ns, {}, None, never)
    back: dict = {}
    load_namespace(back, copy.hand_over(str(tmp_path / "L3.pkl"))["path"])
    assert back["x"].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_work_that_arrives_stops_the_copy_and_it_is_written_when_idle_again(tmp_path):
    ns = {"big": torch.ones(8 * 2**20), "more": torch.zeros(2**20), "arr": np.ones(2**20)}
    copy = StandbyCopy(str(tmp_path / "L4.standby"), 0.0)
    after_a_cell(copy)
    writes = []

    def count() -> bool:
        writes.append(1)
        return False

    full = StandbyCopy(str(tmp_path / "whole.standby"), 0.0)
    after_a_cell(full)
    assert full.take(ns, {}, None, count)
    full.drop()
    asked = []

    def cell_arrives_after_two_writes() -> bool:
        asked.append(1)
        return len(asked) > 2

    assert not copy.take(ns, {}, None, cell_arrives_after_two_writes)
    assert len(asked) < len(writes) - 2  # stopped at the next write, not at the end of the copy
    # no partial file left in host memory (freed on a thread: the cell does not wait for it)
    assert wait_until(lambda: sorted(os.listdir(tmp_path)) == [])
    assert copy.hand_over(str(tmp_path / "L4.pkl")) is None
    copy.idle()  # the work was a pull, say: the namespace is the same, a copy is due again
    assert copy.due_in() == 0.0 and copy.take(ns, {}, None, never)


def test_no_copy_when_host_memory_is_short_and_it_is_not_retried_for_the_same_namespace(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="jupyter_gpu.session.standby")
    copy = StandbyCopy(str(tmp_path / "L5.standby"), 0.0)
    after_a_cell(copy)
    # the session holds more than is free
    assert not copy.take({"x": torch.ones(4)}, {}, 1 << 60, never)
    assert not os.listdir(tmp_path) and "no standby copy" in caplog.text
    assert copy.due_in() is None
    after_a_cell(copy)
    assert copy.due_in() == 0.0


def test_the_worker_gives_sessions_a_copy_path_unless_turned_off_or_misconfigured(caplog):
    import shutil

    import dask.config

    from jupyter_gpu.worker.hoststore import HostStore
    from jupyter_gpu.worker.session_manager import standby_plan

    store = HostStore()
    try:
        given = standby_plan({"id": "L9", "world_size": 1}, store)
        # the session's own folder
        assert given["after"] == 2.0 and given["path"].endswith("/L9/standby")
        assert os.path.dirname(os.path.dirname(given["path"])) == store.base
        assert standby_plan({"id": "L9", "world_size": 2}, store) is None  # ranks are never moved
        with dask.config.set({"jupyter-gpu.session.standby-after": None}):
            assert standby_plan({"id": "L9"}, store) is None
        with dask.config.set({"jupyter-gpu.reclaim-offload": False}):
            assert standby_plan({"id": "L9"}, store) is None
        with dask.config.set({"jupyter-gpu.session.standby-after": "soon"}):
            # a typo turns copies off; sessions still start
            assert standby_plan({"id": "L9"}, store) is None
        assert "standby-after is 'soon', not a duration" in caplog.text and "e.g. 2s" in caplog.text
    finally:
        shutil.rmtree(store.base, ignore_errors=True)


def test_a_cell_stops_the_copy_inside_one_large_tensor_not_after_it(tmp_path):
    """Bug fixed: a no-op cell 8 s after a 2 GiB input stayed in the session took 0.44-0.99 s: the
    copy stopped only between writes, and a tensor's storage is one write. Now it looks between
    pieces of a few MiB: here a cell "arrives" once 8 MiB of a 64 MiB tensor are written, and the
    copy stops with far less than the tensor written."""
    record = 64 * 2**20
    ns = {"big": torch.ones(record // 4)}
    copy = StandbyCopy(str(tmp_path / "L6.standby"), 0.0)
    after_a_cell(copy)
    part = tmp_path / "L6.standby.part"
    written_when_stopped = []

    def cell_arrives_once_8_mib_are_written() -> bool:
        size = part.stat().st_size if part.exists() else 0
        if size >= 8 * 2**20:
            written_when_stopped.append(size)
            return True
        return False

    assert not copy.take(ns, {}, None, cell_arrives_once_8_mib_are_written)
    assert written_when_stopped and written_when_stopped[0] <= 8 * 2**20 + STOP_CHECK_BYTES
    assert written_when_stopped[0] < record
    assert wait_until(lambda: sorted(os.listdir(tmp_path)) == [])
    copy.idle()
    assert copy.take(ns, {}, None, never)  # idle again: the whole copy, intact
    back: dict = {}
    load_namespace(back, copy.hand_over(str(tmp_path / "L6.pkl"))["path"])
    assert back["big"].shape == ns["big"].shape and float(back["big"].sum()) == record // 4


def test_a_stale_copy_is_freed_off_the_cells_thread(tmp_path, monkeypatch):
    """A cell makes the copy stale; freeing its host memory (0.1-0.2 s per GiB of /dev/shm) is not
    the cell's to wait for: the file is moved aside at once and unlinked on another thread."""
    import threading

    from jupyter_gpu.common import hostmem

    ns = {"x": torch.ones(2**20)}
    copy = StandbyCopy(str(tmp_path / "L7.standby"), 0.0)
    after_a_cell(copy)
    assert copy.take(ns, {}, None, never) and os.path.exists(copy.path)
    freed_by = []
    real = hostmem.discard

    def discard(path: str) -> None:
        freed_by.append(threading.current_thread())
        real(path)

    monkeypatch.setattr(hostmem, "discard", discard)
    copy.changed()  # the next cell starts
    assert not os.path.exists(copy.path)  # its name is free at once
    assert wait_until(lambda: sorted(os.listdir(tmp_path)) == [])
    assert freed_by and threading.main_thread() not in freed_by
