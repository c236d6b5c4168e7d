"""A session namespace to host memory and back (what a reclaimed idle session keeps)."""

import json

from jupyter_gpu.cluster.offload import load_namespace, offload_dir, save_namespace, user_names


def test_user_variables_round_trip_and_the_unpicklable_are_named(tmp_path):
    import numpy as np

    def double(x):
        return 2 * x

    ns = {"arr": np.arange(5), "double": double, "json": json, "gen": (i for i in range(3)),
          "_i3": "cell source", "In": [], "config": {"lr": 0.1}}
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
