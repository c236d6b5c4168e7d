"""The panel's REST and websocket routes against a real Jupyter server and a real virtual-GPU
pool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
from tornado.httpclient import HTTPClientError

from jupyter_gpu.common.refusals import Refused

from .conftest import TEST_USER, VIRTUAL_GPUS, stop_pool

pytestmark = [pytest.mark.timeout(180), pytest.mark.integration]


def _json(response) -> dict:
    return json.loads(response.body.decode())


async def _rpc_call(address: str, handler: str, **kwargs):
    """Act as a notebook kernel would (the magic calls the same broker handlers)."""
    # the pool's TLS (the embedded pool's own certificate)
    from jupyter_gpu.common.security import pool_rpc

    async with pool_rpc(address) as r:
        return await getattr(r, handler)(**kwargs)


async def _snapshot_until(jp_fetch, predicate, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        snap = _json(await jp_fetch("jupyter-gpu", "api", "snapshot"))
        if predicate(snap) or time.monotonic() > deadline:
            return snap
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------- no pool
async def test_snapshot_without_pool_says_no_pool(jp_fetch, monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))  # no embedded pool advertised here
    snap = _json(await jp_fetch("jupyter-gpu", "api", "snapshot"))
    assert snap == {"state": "no-pool", "me": TEST_USER}


async def test_snapshot_with_dead_address_says_unreachable(jp_fetch, monkeypatch):
    # discard port: nothing listens
    monkeypatch.setenv("JUPYTER_GPU_SCHEDULER", "tcp://127.0.0.1:9")
    snap = _json(await jp_fetch("jupyter-gpu", "api", "snapshot"))
    assert snap["state"] == "unreachable"
    assert snap["address"] == "tcp://127.0.0.1:9"
    assert snap["error"]


async def test_scale_and_cancel_without_pool_are_409(jp_fetch, monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    for parts, body in ((("api", "scale"), {"n": 2}), (("api", "cancel", "R1"), {})):
        with pytest.raises(HTTPClientError) as err:
            await jp_fetch("jupyter-gpu", *parts, method="POST", body=json.dumps(body))
        assert err.value.code == 409


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"n": -1},
        {"n": "two"},
        {"n": True},
        {"minimum": 3, "maximum": 1},
        {"minimum": 1},
        {"n": 1e20},
        {"n": 10**20},
        {"n": 2.5},
        {"maximum": 10**9},
    ],
)
async def test_scale_rejects_bad_bodies(jp_fetch, body):
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("jupyter-gpu", "api", "scale", method="POST", body=json.dumps(body))
    assert err.value.code == 400


async def test_scale_rejects_non_json(jp_fetch):
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("jupyter-gpu", "api", "scale", method="POST", body="n=2")
    assert err.value.code == 400


# ---------------------------------------------------------------------------------------------- real pool
@pytest.mark.integration
async def test_snapshot_of_virtual_pool(jp_fetch, pool_address):
    snap = await _snapshot_until(jp_fetch, lambda s: s.get("state") == "ok" and len(s["gpus"]) == 2)
    assert snap["state"] == "ok", snap
    assert snap["me"] == TEST_USER
    assert snap["pool"]["address"] == pool_address
    assert snap["pool"]["virtual"] is True
    assert [g["total_bytes"] for g in snap["gpus"]] == [16 * 2**30] * 2
    assert all(g["virtual"] for g in snap["gpus"])
    assert snap["queue"] == []


@pytest.mark.integration
async def test_leases_queue_and_cancel(jp_fetch, pool_address):
    """Real leases shown per GPU, a real queued request with its reason, and cancel through the
    panel."""
    mine = await _rpc_call(
        pool_address,
        "gpu_request",
        user=TEST_USER,
        kernel="k-half",
        spec={"fraction": 0.5},
        notebook="analysis.ipynb",
        cell="train",
    )
    whole = await _rpc_call(
        pool_address, "gpu_request", user="someone-else", kernel="k-whole", spec={"fraction": 1.0}
    )
    waiting = await _rpc_call(
        pool_address, "gpu_request", user=TEST_USER, kernel="k-wait", spec={"fraction": 1.0}
    )
    try:
        assert waiting["state"] == "queued", waiting
        snap = await _snapshot_until(
            jp_fetch,
            lambda s: s.get("state") == "ok" and sum(len(g["leases"]) for g in s["gpus"]) == 2,
        )
        leases = [ls for g in snap["gpus"] for ls in g["leases"]]
        assert sorted(ls["user"] for ls in leases) == sorted([TEST_USER, "someone-else"])
        my_lease = next(ls for ls in leases if ls["user"] == TEST_USER)
        assert my_lease["notebook"] == "analysis.ipynb"
        assert my_lease["fraction"] == 0.5
        [queued] = snap["queue"]
        assert queued["id"] == waiting["id"] and queued["position"] == 1 and queued["reason"]

        # someone else's lease is not mine to cancel: the broker says so, and it keeps running
        other = next(ls for ls in leases if ls["user"] == "someone-else")
        reply = _json(
            await jp_fetch("jupyter-gpu", "api", "cancel", other["id"], method="POST", body=b"")
        )
        assert reply["cancelled"] is False and "someone-else" in reply["what"]

        reply = _json(
            await jp_fetch("jupyter-gpu", "api", "cancel", waiting["id"], method="POST", body=b"")
        )
        assert reply["cancelled"] is True, reply
        reply = _json(
            await jp_fetch("jupyter-gpu", "api", "cancel", my_lease["id"], method="POST", body=b"")
        )
        assert reply["cancelled"] is True, reply
        snap = await _snapshot_until(
            jp_fetch,
            lambda s: (
                not s["queue"]
                and all(ls["user"] != TEST_USER for g in s["gpus"] for ls in g["leases"])
            ),
        )
        assert snap["queue"] == []
        assert all(ls["user"] != TEST_USER for g in snap["gpus"] for ls in g["leases"])
    finally:
        for req in (mine, whole, waiting):
            if req.get("id"):
                with contextlib.suppress(Refused):  # gone already
                    await _rpc_call(pool_address, "gpu_cancel", id=req["id"], user=None)


@pytest.mark.integration
async def test_scale_embedded_pool(jp_fetch, pool_address):
    reply = _json(
        await jp_fetch("jupyter-gpu", "api", "scale", method="POST", body=json.dumps({"n": 3}))
    )
    assert reply["workers"] == 3 and reply["adaptive"] is None
    snap = await _snapshot_until(jp_fetch, lambda s: len(s.get("gpus", [])) == 3, timeout=60)
    assert len(snap["gpus"]) == 3
    reply = _json(
        await jp_fetch(
            "jupyter-gpu",
            "api",
            "scale",
            method="POST",
            body=json.dumps({"minimum": 1, "maximum": 2}),
        )
    )
    assert reply["workers"] == 2 and reply["adaptive"] == {"minimum": 1, "maximum": 2}
    snap = await _snapshot_until(jp_fetch, lambda s: len(s.get("gpus", [])) == 2, timeout=60)
    assert len(snap["gpus"]) == 2


@pytest.mark.integration
async def test_stream_pushes_snapshots_from_one_shared_poller(
    jp_fetch, jp_ws_fetch, jp_serverapp, pool_address
):
    from jupyter_gpu.labext.handlers import SETTINGS_KEY

    link = jp_serverapp.web_app.settings[SETTINGS_KEY]
    sockets = [await jp_ws_fetch("jupyter-gpu", "api", "stream") for _ in range(3)]
    try:
        first = [json.loads(await asyncio.wait_for(ws.read_message(), 10)) for ws in sockets]
        assert all(m["state"] == "ok" and m["pool"]["address"] == pool_address for m in first)
        assert link.listeners == 3 and link.polling
        polls_before = link.polls
        for _ in range(3):  # several more pushes each, at the configured 0.2 s rate
            for ws in sockets:
                assert json.loads(await asyncio.wait_for(ws.read_message(), 10))["state"] == "ok"
        polls = link.polls - polls_before
        # three sockets, one poller: each poll feeds all three (a poller per socket would triple
        # this)
        assert 2 <= polls <= 5, polls
        sockets[0].write_message("refresh")
        assert json.loads(await asyncio.wait_for(sockets[0].read_message(), 10))["state"] == "ok"
    finally:
        for ws in sockets:
            ws.close()
    deadline = time.monotonic() + 10
    while (link.listeners or link.polling) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert link.listeners == 0 and not link.polling


@pytest.mark.integration
async def test_start_button_starts_embedded_pool(jp_fetch, monkeypatch, tmp_path):
    """POST api/pool runs ensure_embedded_pool (off the event loop) and the snapshot then shows the
    pool."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_GPU_VIRTUAL_GPUS", VIRTUAL_GPUS)
    assert _json(await jp_fetch("jupyter-gpu", "api", "snapshot"))["state"] == "no-pool"
    try:
        started = asyncio.ensure_future(
            jp_fetch("jupyter-gpu", "api", "pool", method="POST", body=b"", request_timeout=150)
        )
        # the server keeps answering while the pool starts: the blocking start runs in an executor
        snap = _json(await jp_fetch("jupyter-gpu", "api", "snapshot"))
        assert snap["state"] in ("no-pool", "ok")
        reply = _json(await started)
        # private: its own TLS
        assert reply["started"] is True and reply["address"].startswith("tls://")
        snap = await _snapshot_until(
            jp_fetch, lambda s: s.get("state") == "ok" and len(s["gpus"]) == 2
        )
        assert snap["pool"]["address"] == reply["address"] and snap["pool"]["embedded"] is True
        assert snap["pool"]["scalable"] is True
    finally:
        stop_pool(str(tmp_path / f"jupyter-gpu-pool-{TEST_USER}.json"))
