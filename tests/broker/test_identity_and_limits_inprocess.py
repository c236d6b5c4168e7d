"""Who may ask and what can never be granted, decided by the broker alone: wrong tokens and unknown
users are refused, a request beyond a team's limit is refused at once, and a user cannot act for
another with his own token. No kernel is needed for these rules: the broker and a GPU worker run on an
in-process Dask cluster (``gen_cluster``) with a real token file and a real quota file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from distributed import Client
from distributed.core import rpc
from distributed.utils_test import gen_cluster

from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.identity import TokenStore
from jupyter_gpu.broker.plugin import GpuBroker
from jupyter_gpu.broker.quotas import load_quotas
from jupyter_gpu.common.refusals import NotAuthorized, NotYours
from tests.broker.inprocess import FAST_SESSIONS, install_pool, teardown

pytestmark = [pytest.mark.inprocess, pytest.mark.timeout(120)]

QUOTAS = """
reserve-after: 5s
min-run-time: 0s
teams:
  ml:  {guarantee: 1.0, members: [alice, bob]}
  viz: {guarantee: 1.0, limit: 1.5, members: [carol]}
"""


def _broker(folder: Path) -> tuple[GpuBroker, dict[str, str]]:
    """A broker with the team's quota file and a token file of alice, bob and carol."""
    (folder / "pool.yaml").write_text(QUOTAS)
    store = TokenStore(str(folder / "tokens.json"))
    tokens = {user: store.create(user) for user in ("alice", "bob", "carol")}
    policy = FairSharePolicy(load_quotas(str(folder / "pool.yaml")))
    return GpuBroker(policy=policy, audit=AuditStore(None), tokens=store), tokens


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], config=FAST_SESSIONS)
async def test_unknown_user_and_wrong_token_are_refused_and_limits_refuse_the_impossible(c, s, w):
    with tempfile.TemporaryDirectory() as tmp:
        broker, tokens = _broker(Path(tmp))
        broker, plugin = await install_pool(s, w, broker=broker)
        try:
            async with rpc(s.address) as sched:
                spec = {"fraction": 0.25}
                with pytest.raises(NotAuthorized, match="token sent for user 'alice' is wrong"):
                    await sched.gpu_request(user="alice", kernel="t", spec=spec, token="not-it")
                with pytest.raises(NotAuthorized, match="does not know the user 'mallory'"):
                    await sched.gpu_request(user="mallory", kernel="t", spec=spec, token="x")
                reply = await sched.gpu_request(
                    user="carol",
                    kernel="t",
                    spec={"fraction": 1.0, "workers": 2},
                    token=tokens["carol"],
                    client=c.id,
                )
                assert reply["state"] == "refused" and "limit is 1.5 GPU" in reply["reason"]
                # carol posing as bob, with her own token
                with pytest.raises(NotAuthorized, match="is wrong"):
                    await sched.gpu_cancel(id="L1", user="bob", token=tokens["carol"])
                quotas = (await sched.gpu_snapshot())["quotas"]
            assert quotas["configured"]
            assert {t["team"]: t["guarantee"] for t in quotas["teams"]}["viz"] == 1.0
            assert not broker.ledger.leases and not broker.ledger.queue
        finally:
            await teardown(w, plugin)


# sessions as the worker's account: root here runs no launcher, and who runs them is not the point
@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1)],
    config={**FAST_SESSIONS, "jupyter-gpu.session.as-user": False},
)
async def test_a_request_whose_token_is_revoked_while_it_waits_is_withdrawn_with_its_secret(
    c, s, w
):
    """The kernel's token stops being accepted while its request waits (a revoked JupyterHub
    token): its wait is refused, and its kernel withdraws the request with the request's own
    secret, so no lease is granted later to a cell that will never run. Before, the kernel had only
    the token to cancel with: the request stayed queued (or its lease, starting, stayed held)."""
    with tempfile.TemporaryDirectory() as tmp:
        broker, tokens = _broker(Path(tmp))
        broker, plugin = await install_pool(s, w, broker=broker)
        try:
            async with rpc(s.address) as sched, Client(s.address, asynchronous=True) as bobs:
                whole = {"fraction": 1.0, "workers": 2}
                first = await sched.gpu_request(
                    user="alice", kernel="a", spec=whole, token=tokens["alice"], client=c.id
                )
                assert first["state"] in ("starting", "granted"), first
                waiting = await sched.gpu_request(
                    user="bob",
                    kernel="b",
                    spec={"fraction": 0.5},
                    token=tokens["bob"],
                    client=bobs.id,
                )
                assert waiting["state"] == "queued" and waiting["secret"], waiting
                broker.permissions.tokens.create("bob")  # bob's token changes: the old one is wrong
                with pytest.raises(NotAuthorized, match="is wrong"):
                    await sched.gpu_wait(id=waiting["id"], user="bob", token=tokens["bob"])
                with pytest.raises(NotAuthorized, match="is wrong"):
                    await sched.gpu_cancel(id=waiting["id"], user="bob", token=tokens["bob"])
                with pytest.raises(NotAuthorized, match="is wrong"):
                    await sched.gpu_cancel(
                        id=waiting["id"], user="bob", token=tokens["bob"], secret="guessed"
                    )
                # carol holds bob's secret but names herself: it is not hers to cancel
                with pytest.raises(NotYours):
                    await sched.gpu_cancel(
                        id=waiting["id"],
                        user="carol",
                        token=tokens["carol"],
                        secret=waiting["secret"],
                    )
                assert broker.ledger.requests[waiting["id"]].state == "queued"
                reply = await sched.gpu_cancel(
                    id=waiting["id"], user="bob", token=tokens["bob"], secret=waiting["secret"]
                )
                assert reply["cancelled"], reply
                assert broker.ledger.requests.get(waiting["id"]) is None or (
                    broker.ledger.requests[waiting["id"]].state == "cancelled"
                )
                assert not [r for r in broker.ledger.queue if r.user == "bob"]
                assert not [ls for ls in broker.ledger.leases.values() if ls.user == "bob"]
        finally:
            await teardown(w, plugin)
