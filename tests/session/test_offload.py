"""A session namespace to host memory and back (what a reclaimed idle session keeps)."""

import json

from jupyter_gpu.common.hostmem import offload_dir
from jupyter_gpu.session.offload import load_namespace, save_namespace, user_names


def test_user_variables_round_trip_and_the_unpicklable_are_named(tmp_path):
    import numpy as np

    def double(x):
        return 2 * x

    ns = {
        "arr": np.arange(5),
        "double": double,
        "json": json,
        "gen": (i for i in range(3)),
        "_i3": "cell source",
        "In": [],
        "config": {"lr": 0.1},
    }
    hidden = {"In": []}
    assert sorted(user_names(ns, hidden)) == ["arr", "config", "double", "gen", "json"]
    path = str(tmp_path / "L7.pkl")
    saved = save_namespace(ns, hidden, path)
    assert saved["saved"] == ["arr", "config", "double", "json"] and saved["bytes"] > 0
    assert [(x["name"], x["type"]) for x in saved["lost"]] == [("gen", "generator")]

    fresh: dict = {}
    back = load_namespace(fresh, path)
    assert back == {"restored": ["arr", "config", "double", "json"], "failed": []}
    assert fresh["arr"].tolist() == [0, 1, 2, 3, 4] and fresh["double"](4) == 8
    assert fresh["json"] is json and fresh["config"] == {"lr": 0.1}
    assert not (tmp_path / "L7.pkl").exists()  # restored once, then gone


def test_offload_dir_is_private_host_memory_where_there_is_some():
    path = offload_dir("unit-test")
    try:
        import os
        import stat

        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        if os.path.isdir("/dev/shm"):
            assert path.startswith("/dev/shm/")
    finally:
        os.rmdir(path)


def test_objects_shared_between_variables_stay_shared(tmp_path):
    """Bug fixed: variables were pickled one by one, so a restored optimizer updated copies of the
    model's parameters (training silently stopped changing the model) and views no longer shared
    their tensor."""
    import numpy as np
    import torch

    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    a = torch.zeros(4)
    ns = {
        "net": net,
        "opt": opt,
        "a": a,
        "tail": a[1:],
        "box": [a],
        "arr": np.arange(4096.0),
        "steps": (i for i in range(3)),
    }
    path = str(tmp_path / "L8.pkl")
    saved = save_namespace(ns, {}, path)
    assert saved["saved"] == ["a", "arr", "box", "net", "opt", "tail"]
    assert [x["name"] for x in saved["lost"]] == ["steps"]
    back: dict = {}
    assert load_namespace(back, path)["failed"] == []
    before = back["net"].weight.detach().clone()
    back["net"](torch.ones(1, 2)).sum().backward()
    back["opt"].step()
    # the optimizer moves the restored model itself
    assert not torch.equal(back["net"].weight, before)
    back["a"][1] = 7.0
    assert float(back["tail"][0]) == 7.0 and back["box"][0] is back["a"]
    assert (
        isinstance(back["arr"], np.ndarray)
        and back["arr"][-1] == 4095.0
        and back["arr"].flags.writeable
    )


def test_a_session_that_never_imported_torch_is_saved_without_it(tmp_path):
    import subprocess
    import sys

    path = str(tmp_path / "L9.pkl")
    code = (
        "import sys, numpy as np\n"
        "from jupyter_gpu.session.offload import save_namespace\n"
        f"r = save_namespace({{'arr': np.arange(3), 'pair': (1, 'x')}}, {{}}, {path!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(r['saved'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "['arr', 'pair']" in out.stdout, out.stderr
    back: dict = {}
    assert load_namespace(back, path) == {"restored": ["arr", "pair"], "failed": []}
    assert back["arr"].tolist() == [0, 1, 2] and back["pair"] == (1, "x")
