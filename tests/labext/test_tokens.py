"""The panel's Cancel against a real pool that checks tokens (Dask config
``jupyter-gpu.token-file``).

The Jupyter server runs as its user, so it sends that user's token (``JUPYTER_GPU_TOKEN`` from its
environment, or ``c.GpuPanelConfig.token``) with ``gpu_cancel``, as the user's kernels do; a missing
or wrong token is refused by the broker, and its reason reaches the panel unchanged. The pool also
has a quota file, so the snapshot the panel reads carries the quotas and ``identity: "tokens"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import pytest

from jupyter_gpu.common.refusals import NotAuthorized, Refused

from .conftest import TEST_USER, VIRTUAL_GPUS, stop_pool

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.timeout(180), pytest.mark.integration]

OTHER = "someone-else"
QUOTAS = f"""
teams:
  panel:  {{guarantee: 1.0, members: [{TEST_USER}]}}
  others: {{guarantee: 1.0, members: [{OTHER}]}}
"""


def _json(response) -> dict:
    return json.loads(response.body.decode())


async def _rpc_call(address: str, handler: str, **kwargs):
    """Act as a notebook kernel would (the magic calls the same broker handlers, with its token)."""
    # the pool's TLS (the embedded pool's own certificate)
    from jupyter_gpu.common.security import pool_rpc

    async with pool_rpc(address) as r:
        return await getattr(r, handler)(**kwargs)


@pytest.fixture(scope="module")
def token_pool(tmp_path_factory):
    """A real embedded pool (two virtual GPUs) whose scheduler has a token file and a quota file.

    Yields ``(address, tokens)`` with a token issued for each test user. The settings reach only
    the pool's processes (through their environment at start), as ``DASK_JUPYTER_GPU__*`` does
    for ``pool up``.
    """
    from jupyter_gpu.broker.identity import TokenStore
    from jupyter_gpu.pool.launcher import ensure_embedded_pool

    root = tmp_path_factory.mktemp("token-pool")
    (root / "pool.yaml").write_text(QUOTAS)
    store = TokenStore(str(root / "tokens.json"))
    tokens = {user: store.create(user) for user in (TEST_USER, OTHER)}
    path = str(root / f"jupyter-gpu-pool-{TEST_USER}.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_GPU_VIRTUAL_GPUS", VIRTUAL_GPUS)
        mp.setenv("JUPYTER_GPU_USER", TEST_USER)
        mp.setenv("DASK_JUPYTER_GPU__TOKEN_FILE", str(root / "tokens.json"))
        mp.setenv("DASK_JUPYTER_GPU__POOL_CONFIG", str(root / "pool.yaml"))
        # the server's user may not scale
        mp.setenv("DASK_JUPYTER_GPU__SCALE_USERS", f'["{OTHER}"]')
        # the test users have no accounts here
        mp.setenv("DASK_JUPYTER_GPU__SESSION__AS_USER", "false")
        address = ensure_embedded_pool(timeout=120, keep=True, path=path)
    try:
        yield address, tokens
    finally:
        stop_pool(path)


@pytest.fixture
def pool(token_pool, monkeypatch):
    """The server under test points at the token pool and starts without a token of its own."""
    address, tokens = token_pool
    monkeypatch.setenv("JUPYTER_GPU_SCHEDULER", address)
    monkeypatch.delenv("JUPYTER_GPU_TOKEN", raising=False)
    return address, tokens


@contextlib.asynccontextmanager
async def _kernel_client(address: str):
    """A kernel's Dask client: a pool shared by several people grants requests of a connected
    kernel only, for as long as it stays connected."""
    from distributed import Client

    from jupyter_gpu.common.security import client_security

    async with Client(
        address, security=client_security(address), asynchronous=True, set_as_default=False
    ) as client:
        yield client


async def _granted_lease(address: str, token: str, kernel: str, client: str) -> str:
    """A real lease of TEST_USER's (asked with the user's token, by the kernel whose Dask client is
    ``client``); returns its id once its session runs."""
    req = await _rpc_call(
        address,
        "gpu_request",
        user=TEST_USER,
        kernel=kernel,
        spec={"fraction": 0.25},
        notebook="tokens.ipynb",
        token=token,
        client=client,
    )
    deadline = time.monotonic() + 120
    while req["state"] in ("queued", "starting") and time.monotonic() < deadline:
        req = await _rpc_call(
            address, "gpu_wait", id=req["id"], timeout=1.0, user=TEST_USER, token=token
        )
    assert req["state"] == "granted", req
    return req["leases"][0]["id"]


async def _lease_ids(jp_fetch) -> set[str]:
    snap = _json(await jp_fetch("jupyter-gpu", "api", "snapshot"))
    assert snap["state"] == "ok", snap
    return {ls["id"] for g in snap["gpus"] for ls in g["leases"]}


async def _cancel(jp_fetch, item_id: str) -> dict:
    return _json(await jp_fetch("jupyter-gpu", "api", "cancel", item_id, method="POST", body=b""))


async def _gone(jp_fetch, lease: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while lease in await _lease_ids(jp_fetch):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def test_snapshot_carries_quotas_and_says_whether_the_server_has_a_token(
    jp_fetch, pool, monkeypatch
):
    _, tokens = pool
    snap = _json(await jp_fetch("jupyter-gpu", "api", "snapshot"))
    assert snap["state"] == "ok", snap
    quotas = snap["quotas"]
    assert quotas["configured"] is True and quotas["identity"] == "tokens"
    assert {t["team"]: t["guarantee"] for t in quotas["teams"]}.items() >= {
        "panel": 1.0,
        "others": 1.0,
    }.items()
    assert snap["token_set"] is False
    monkeypatch.setenv("JUPYTER_GPU_TOKEN", tokens[TEST_USER])
    # past the route's reuse of a snapshot younger than half the update interval
    await asyncio.sleep(0.3)
    snap = _json(await jp_fetch("jupyter-gpu", "api", "snapshot"))
    assert snap["token_set"] is True
    assert tokens[TEST_USER] not in json.dumps(snap)  # whether there is one, never the token itself


async def test_cancel_is_refused_without_or_with_a_wrong_token_and_works_with_the_right_one(
    jp_fetch, pool, monkeypatch
):
    address, tokens = pool
    async with _kernel_client(address) as client:
        await _cancel_is_checked(jp_fetch, address, tokens, monkeypatch, client.id)


async def _cancel_is_checked(jp_fetch, address, tokens, monkeypatch, client: str) -> None:
    lease = await _granted_lease(address, tokens[TEST_USER], "k-tokens", client)
    try:
        # no token in the server's environment: the broker's reason, passed through, names the
        # variable
        reply = await _cancel(jp_fetch, lease)
        assert reply["cancelled"] is False, reply
        assert "none was sent" in reply["what"] and "JUPYTER_GPU_TOKEN" in reply["what"], reply

        # a wrong token, and another user's valid token, are refused alike; the lease keeps running
        for wrong in ("not-the-token", tokens[OTHER]):
            monkeypatch.setenv("JUPYTER_GPU_TOKEN", wrong)
            reply = await _cancel(jp_fetch, lease)
            assert reply["cancelled"] is False, reply
            assert f"token sent for user {TEST_USER!r} is wrong" in reply["what"], reply
        assert lease in await _lease_ids(jp_fetch)

        # the user's own token, from the server's environment: cancelled, and the lease is gone
        monkeypatch.setenv("JUPYTER_GPU_TOKEN", tokens[TEST_USER])
        reply = await _cancel(jp_fetch, lease)
        assert reply == {"cancelled": True, "what": f"lease {lease} (its session was ended)"}, reply
        assert await _gone(jp_fetch, lease)
    finally:
        with contextlib.suppress(Refused):  # gone already
            await _rpc_call(
                address, "gpu_cancel", id=lease, user=TEST_USER, token=tokens[TEST_USER]
            )


async def test_configured_token_wins_over_the_environment(
    jp_fetch, jp_serverapp, pool, monkeypatch
):
    from jupyter_gpu.labext.handlers import SETTINGS_KEY

    address, tokens = pool
    config = jp_serverapp.web_app.settings[SETTINGS_KEY].config
    async with _kernel_client(address) as client:
        lease = await _granted_lease(address, tokens[TEST_USER], "k-config", client.id)
        monkeypatch.setenv("JUPYTER_GPU_TOKEN", "a-stale-token")
        monkeypatch.setattr(config, "token", tokens[TEST_USER])  # as c.GpuPanelConfig.token sets it
        try:
            reply = await _cancel(jp_fetch, lease)
            assert reply["cancelled"] is True, reply
            assert await _gone(jp_fetch, lease)
        finally:
            with contextlib.suppress(Refused):  # gone already
                await _rpc_call(
                    address, "gpu_cancel", id=lease, user=TEST_USER, token=tokens[TEST_USER]
                )


async def test_scale_is_only_for_the_users_the_pool_allows(jp_fetch, pool, monkeypatch):
    address, tokens = pool
    monkeypatch.setenv("JUPYTER_GPU_TOKEN", tokens[TEST_USER])
    await asyncio.sleep(0.3)
    snap = _json(await jp_fetch("jupyter-gpu", "api", "snapshot"))
    pool_info = snap["pool"]
    assert pool_info["scalable"] is True and pool_info["scale_users"] == [OTHER]
    assert pool_info["can_scale"] is False  # the panel hides its Scale button
    with pytest.raises(Exception) as refused:
        await jp_fetch("jupyter-gpu", "api", "scale", method="POST", body=json.dumps({"n": 3}))
    assert refused.value.code == 409
    body = json.loads(refused.value.response.body.decode())
    assert f"user {TEST_USER!r} may not scale this pool" in json.dumps(
        body
    ) and "scale-users" in json.dumps(body)
    snap = _json(await jp_fetch("jupyter-gpu", "api", "snapshot"))
    assert snap["pool"]["workers"] == 2  # nothing was scaled
    # the allowed user (with their token) may
    reply = await _rpc_call(address, "gpu_scale", n=2, user=OTHER, token=tokens[OTHER])
    assert reply.get("workers") == 2, reply
    with pytest.raises(NotAuthorized, match="wrong"):
        await _rpc_call(address, "gpu_scale", n=2, user=OTHER, token="wrong")
