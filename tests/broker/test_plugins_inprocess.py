"""The broker and GPU worker plugins on an in-process Dask cluster
(``distributed.utils_test.gen_cluster``).

Fast, and real: a real scheduler and worker in this process with the plugins installed as a pool
installs them, real session processes spawned by the worker plugin (with nothing preloaded, so they
start in a second), and the handlers called over real comms the way kernels, workers and sessions
call them. The tables of handlers are pinned here, as dask/distributed pins its shuffle plugin's, so
a handler cannot be added, renamed or dropped without this file (and ``docs/interfaces.md``) saying
so; and ``jupyter_gpu.interfaces.handler_table()`` (what the security tests enumerate) is compared
with what the real servers answer.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from distributed.core import rpc
from distributed.utils_test import gen_cluster

from jupyter_gpu import interfaces
from jupyter_gpu.broker import gate
from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.identity import TokenStore
from jupyter_gpu.broker.plugin import PLUGIN_NAME, GpuBroker
from jupyter_gpu.broker.quotas import PoolQuotas
from jupyter_gpu.common.handlers import declared, is_closed
from jupyter_gpu.common.refusals import Malformed, NotAuthorized, NotFound, NotYours
from jupyter_gpu.session.server import SessionServer, session_comm_server
from jupyter_gpu.worker.dask_worker import GpuDaskWorker
from jupyter_gpu.worker.nanny import GpuNanny
from tests.broker.inprocess import FAST_SESSIONS, granted, install_pool, teardown, tell, until

pytestmark = [pytest.mark.inprocess, pytest.mark.timeout(120)]

GiB = 2**30

# a worker's reports: on its own stream to the scheduler, never as calls
SCHEDULER_STREAM_OPS = {
    "gpu_register_worker",
    "gpu_samples",
    "gpu_session_ended",
    "gpu_lease_state",
    "gpu_run_metrics",
}
SCHEDULER_OPS = {
    "gpu_drain",  # a stopping worker service's call (a proof of the pool key): it waits for the answer
    "gpu_request",
    "gpu_wait",
    "gpu_cancel",
    "gpu_release",
    "gpu_lease_info",
    "gpu_run_update",
    "gpu_scale",
    "gpu_snapshot",
    "gpu_usage",
}
WORKER_OPS = {
    "gpu_session_start",
    "gpu_session_signal",
    "gpu_session_offload",
    "gpu_offload_fetch",
    "gpu_offload_discard",
    "gpu_offload_spill",
    "gpu_inventory",
    "gpu_session_starter",
}
SESSION_OPS = {"assign", "execute", "interrupt", "pull", "ping", "free_port", "offload", "restore"}


def _ops(server: str, kind: str = "handler") -> set[str]:
    return {
        r.op
        for r in interfaces.handler_table()
        if r.server == server and r.kind == kind and r.op != "*"
    }


def test_the_servers_declare_exactly_the_pinned_tables():
    declared_ops = {
        (r.server, r.op): r for r in interfaces.declared_rows()
    }  # what @handler declares
    scheduler = {op for server, op in declared_ops if server == "scheduler"}
    assert scheduler == SCHEDULER_OPS | SCHEDULER_STREAM_OPS
    assert {
        r.op for r in interfaces.declared_rows() if r.server == "scheduler" and r.kind == "stream"
    } == SCHEDULER_STREAM_OPS
    assert {op for server, op in declared_ops if server == "worker"} == WORKER_OPS
    assert {op for server, op in declared_ops if server == "session"} == SESSION_OPS
    # every declared handler says who calls it and how the caller is checked, and what it answers
    for row in declared_ops.values():
        assert row.caller and row.check and row.doc and row.reply, row


def test_docs_interfaces_carries_the_current_tables():
    """docs/interfaces.md's tables are generated from the handlers' declarations (python -m
    jupyter_gpu.interfaces docs/interfaces.md); a handler changed without regenerating them fails
    here."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "interfaces.md")
    with open(path) as f:
        doc = f.read()
    assert interfaces.GENERATED_BEGIN in doc and interfaces.GENERATED_END in doc
    assert interfaces.render_interfaces(doc) == doc, (
        "run: python -m jupyter_gpu.interfaces docs/interfaces.md"
    )


def test_a_handler_must_be_named_as_its_op():
    from jupyter_gpu.common.handlers import handler

    with pytest.raises(TypeError, match="must be named gpu_thing"):

        @handler("gpu_thing", caller="kernel", check="none")
        def thing() -> None: ...


@gen_cluster(nthreads=[("127.0.0.1", 1)], Worker=GpuDaskWorker, config=FAST_SESSIONS)
async def test_the_table_lists_exactly_what_the_real_servers_leave_open(
    s, w, tmp_path_factory=None
):
    """What a shared pool's scheduler, a GPU worker, a GPU nanny and a session answer is what
    ``handler_table()`` lists, each with its caller and check: the security tests enumerate that
    table against a live pool, so a handler nobody declared must not be open."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokens = TokenStore(os.path.join(tmp, "tokens.json"))
        broker = GpuBroker(
            policy=FairSharePolicy(PoolQuotas()), audit=AuditStore(None), tokens=tokens
        )
        broker, plugin = await install_pool(s, w, broker=broker)
        try:
            open_ops = {op for op, h in s.handlers.items() if not is_closed(h)}
            assert open_ops == _ops("scheduler")
            # every other one of Dask's scheduler handlers is closed (but to the inproc listener)
            assert {op for op, h in s.handlers.items() if is_closed(h)} and all(
                r.check == "in-process" for r in interfaces.handler_table() if r.op == "*"
            )
            assert (
                _ops("scheduler", "stream")
                == gate.CLIENT_STREAM_OPS | gate.WORKER_STREAM_OPS | SCHEDULER_STREAM_OPS
            )
            assert SCHEDULER_STREAM_OPS <= set(s.stream_handlers)
            # as calls, the workers' reports are refused (closed), not answered
            assert all(is_closed(s.handlers[op]) for op in SCHEDULER_STREAM_OPS)
            assert {op for op, h in w.handlers.items() if not is_closed(h)} == _ops("worker")
            nanny = GpuNanny(s.address)
            assert {op for op, h in nanny.handlers.items() if not is_closed(h)} == _ops("nanny")
            session = session_comm_server(
                {meta.op: meta.function for meta in declared(SessionServer)}
            )
            assert set(session.handlers) == _ops("session")
        finally:
            await teardown(w, plugin)


@gen_cluster(nthreads=[("127.0.0.1", 1)], config=FAST_SESSIONS)
async def test_handler_tables_are_registered_on_the_real_servers(s, w):
    broker, plugin = await install_pool(s, w)
    try:
        assert s.plugins[PLUGIN_NAME] is broker
        assert SCHEDULER_OPS <= set(s.handlers) and set(broker.handlers()) == SCHEDULER_OPS
        assert set(broker.stream_handlers()) == SCHEDULER_STREAM_OPS
        assert SCHEDULER_STREAM_OPS <= set(s.stream_handlers)
        assert WORKER_OPS <= set(w.handlers) and set(plugin.handlers()) == WORKER_OPS
        assert sorted(broker.ledger.gpus) == [f"{w.address}#0", f"{w.address}#1"]
        async with rpc(w.address) as worker:
            inventory = await worker.gpu_inventory()
        assert [g["total_bytes"] for g in inventory] == [16 * GiB, 16 * GiB] and all(
            g["virtual"] for g in inventory
        )
    finally:
        await teardown(w, plugin)


@gen_cluster(nthreads=[("127.0.0.1", 1)], config=FAST_SESSIONS)
async def test_a_grant_starts_a_session_that_answers_only_the_session_table(s, w):
    broker, plugin = await install_pool(s, w)
    try:
        async with rpc(s.address) as sched:
            status = await granted(
                sched, user="alice", kernel="k1", spec={"fraction": 0.5}, client="c1"
            )
            assert status["state"] == "granted", status
            lease = status["leases"][0]
            assert lease["bytes"] == 8 * GiB and lease["gpu_names"] and lease["virtual"]
            assert plugin.manager.sessions[lease["id"]].pid == lease["pid"]
            async with rpc(lease["address"]) as session:
                assert (
                    lease["secret"]
                    and (await session.ping(secret=lease["secret"]))["lease"] == lease["id"]
                )
                # only the lease's owner gets an answer: no secret, or a wrong one, is refused
                with pytest.raises(NotAuthorized, match="answers only the kernel"):
                    await session.ping()
                with pytest.raises(NotAuthorized, match="answers only the kernel"):
                    await session.pull(name="x", secret="guess")
                # nothing beyond the pinned table: Dask drops an unknown op (logs "No handler ...")
                try:
                    reply = await session.run_code(code="1")
                except Exception as exc:  # noqa: BLE001 - any refusal counts; the assert below checks it
                    reply = repr(exc)
                assert reply is None or "No handler run_code" in str(reply), reply
                # a malformed cell is refused before the main thread sees it, and the session lives
                # on
                with pytest.raises(Malformed, match="code must be text"):
                    await session.execute(code=123, inputs={}, secret=lease["secret"])
                with pytest.raises(Malformed, match="has unknown field.* cells"):
                    await session.execute(code="1", inputs={}, cells=2, secret=lease["secret"])
                with pytest.raises(Malformed, match="name must be text"):
                    await session.pull(name={"not": "a name"}, secret=lease["secret"])
                with pytest.raises(NotFound, match="no variable named 'x'"):
                    await session.pull(name="x", secret=lease["secret"])
                assert (await session.ping(secret=lease["secret"]))["busy"] is False
            snap = await sched.gpu_snapshot()
            assert [ls["id"] for g in snap["gpus"] for ls in g["leases"]] == [lease["id"]]
            assert (await sched.gpu_release(lease=lease["id"], user="alice"))["released"]
            for _ in range(100):
                if lease["id"] not in plugin.manager.sessions:
                    break
                await asyncio.sleep(0.02)
            assert lease["id"] not in plugin.manager.sessions
            assert (await sched.gpu_lease_info(lease=lease["id"]))["state"] == "ended"
            # released already: nothing more to release
            assert (await sched.gpu_release(lease=lease["id"], user="alice")) == {"released": False}
    finally:
        await teardown(w, plugin)


@gen_cluster(
    nthreads=[("127.0.0.1", 1)],
    config={
        **FAST_SESSIONS,
        "jupyter-gpu.worker.reserved-memory": "1GiB",
        "jupyter-gpu.worker.reserved-cpus": 0.5,
        "jupyter-gpu.session.min-cpus": 0,  # cpu.max exactly the booked cores
    },
)
async def test_a_worker_reports_what_it_leaves_to_sessions_and_a_lease_books_and_enforces_it(s, w):
    """Issue 24: ``Ledger.set_host`` was never called outside tests: no lease booked host memory
    or cores, and every session got half the machine whatever it asked for."""
    import psutil

    broker, plugin = await install_pool(s, w)
    try:
        total, cpus = psutil.virtual_memory().total, len(os.sched_getaffinity(0))
        host = broker.ledger.hosts[w.address]  # this worker has both GPUs: all that is left
        assert await until(lambda: host.memory is not None)
        assert host.memory == total - GiB and host.cpu_milli == int((cpus - 0.5) * 1000)
        async with rpc(s.address) as sched:
            status = await granted(sched, user="alice", kernel="k1", spec={"fraction": 0.5})
            lease = status["leases"][0]
            # half of one of two GPUs: a quarter of what the machine leaves to sessions
            assert lease["host_memory"] == (total - GiB) // 4
            assert lease["cpus"] == host.cpu_milli // 4 / 1000
            group = plugin.manager.sessions[lease["id"]].group
            if os.geteuid() == 0:  # CI: root, with cgroups: the kernel holds the limits
                assert group is not None and group.limits["memory.max"] == lease["host_memory"]
                assert group.limits.get("memory.high", 0) in (0, int(lease["host_memory"] * 0.9))
                assert group.limits.get("cpu.max") in (None, host.cpu_milli // 4 * 100)
            asked = await granted(
                sched,
                user="bob",
                kernel="k2",
                spec={"fraction": 0.25, "host_memory": GiB, "cpus": 0.25},
            )
            assert asked["leases"][0]["host_memory"] == GiB and asked["leases"][0]["cpus"] == 0.25
            never = await sched.gpu_request(
                user="carol", kernel="k3", spec={"fraction": 0.25, "host_memory": total}
            )
            assert (
                never["state"] == "refused"
                and "GiB of host memory but no machine" in never["reason"]
            )
    finally:
        await teardown(w, plugin)


@gen_cluster(nthreads=[("127.0.0.1", 1)], config=FAST_SESSIONS)
async def test_a_busy_pool_queues_with_a_reason_and_a_cancel_leaves_no_trace(s, w):
    broker, plugin = await install_pool(s, w, gpus="1x16GiB")
    try:
        async with rpc(s.address) as sched:
            first = await granted(sched, user="alice", kernel="k1", spec={"gpus": 1})
            assert first["state"] == "granted"
            second = await sched.gpu_request(user="bob", kernel="k2", spec={"fraction": 0.5})
            assert second["state"] == "queued" and second["position"] == 1
            assert second["reason"].startswith("waiting: no GPU has 8.0 GiB free")
            with pytest.raises(NotYours, match="belongs to bob"):
                await sched.gpu_cancel(id=second["id"], user="alice")
            assert (await sched.gpu_cancel(id=second["id"], user="bob")) == {
                "cancelled": True,
                "what": f"queued request {second['id']}",
            }
            with pytest.raises(NotFound, match="nothing queued or running is called R999"):
                await sched.gpu_cancel(id="R999", user="bob")
            assert not (await sched.gpu_snapshot())["queue"]
            impossible = await sched.gpu_request(user="bob", kernel="k2", spec={"memory": 40 * GiB})
            assert (
                impossible["state"] == "refused"
                and "largest GPU in the pool has 16.0 GiB" in impossible["reason"]
            )
            broker.ledger.check()
    finally:
        await teardown(w, plugin)


@gen_cluster(nthreads=[("127.0.0.1", 1)], config=FAST_SESSIONS)
async def test_a_session_that_dies_ends_its_lease_with_the_reason(s, w):
    broker, plugin = await install_pool(s, w)
    try:
        async with rpc(s.address) as sched:
            lease = (await granted(sched, user="alice", kernel="k1", spec={"fraction": 0.25}))[
                "leases"
            ][0]
            os.kill(lease["pid"], signal.SIGKILL)
            for _ in range(200):
                info = await sched.gpu_lease_info(lease=lease["id"])
                if info["state"] == "ended":
                    break
                await asyncio.sleep(0.05)
            assert info["end_reason"].startswith("the session process was killed by SIGKILL")
            assert broker.ledger.gpus[lease["gpus"][0]].leased_bytes == 0
    finally:
        await teardown(w, plugin)


@gen_cluster(nthreads=[("127.0.0.1", 1)], config=FAST_SESSIONS)
async def test_a_lost_worker_ends_its_leases_and_its_gpus_are_expected_back(s, w):
    broker, plugin = await install_pool(s, w)
    try:
        async with rpc(s.address) as sched:
            lease = (await granted(sched, user="alice", kernel="k1", spec={"fraction": 0.5}))[
                "leases"
            ][0]
            broker.remove_worker(s, w.address)
            info = await sched.gpu_lease_info(lease=lease["id"])
            assert info["state"] == "ended" and f"worker {w.address}" in info["end_reason"]
            # its GPUs are remembered for a while: a request that needs them waits instead of being
            # refused
            waiting = await sched.gpu_request(user="bob", kernel="k2", spec={"gpus": 1})
            assert waiting["state"] == "queued"
            assert waiting["reason"] == "waiting: no GPU worker has joined the pool yet"
    finally:
        await teardown(w, plugin)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], config=FAST_SESSIONS)
async def test_a_kernel_that_disconnects_frees_its_leases_and_requests(c, s, w):
    broker, plugin = await install_pool(s, w, gpus="1x16GiB")
    try:
        async with rpc(s.address) as sched:
            held = await granted(sched, user="alice", kernel="k1", spec={"gpus": 1}, client=c.id)
            queued = await sched.gpu_request(
                user="alice", kernel="k1", spec={"fraction": 0.5}, client=c.id
            )
            assert held["state"] == "granted" and queued["state"] == "queued"
            broker.remove_client(s, c.id)
            assert (await sched.gpu_lease_info(lease=held["leases"][0]["id"]))[
                "end_reason"
            ] == "its kernel disconnected from the pool"
            assert (await sched.gpu_wait(id=queued["id"], timeout=0))["state"] == "cancelled"
            broker.ledger.check()
    finally:
        await teardown(w, plugin)


@gen_cluster(nthreads=[("127.0.0.1", 1)], config=FAST_SESSIONS)
async def test_malformed_messages_are_refused_to_their_sender_and_break_nothing(s, w):
    """Bugs fixed: a ``gpu_request`` with ``workers: 1.5`` was queued and then made every scheduling
    pass raise; a malformed ``gpu_run_update`` made ``gpu_snapshot`` raise for everyone (status and
    panel)."""
    import json

    broker, plugin = await install_pool(s, w)
    try:
        async with rpc(s.address) as sched:
            for spec, field in [
                ({"fraction": 0.5, "workers": 1.5}, "workers"),
                ({"fraction": float("nan")}, "fraction"),
                ({"gpus": "1"}, "gpus"),
                ({"fraction": 0.5, "nodes": 2}, "nodes"),
                ({"memory": 2**63}, "memory"),
                ({"fraction": 0.5, "priority": 3}, "priority"),
            ]:
                with pytest.raises(Malformed, match=f"The request is not valid: .*{field}"):
                    await sched.gpu_request(user="mallory", kernel="k9", spec=spec)
            for bad, field in [
                ({"user": None}, "user"),
                ({"user": "x" * 10_000}, "user"),
                ({"kernel": ["k"]}, "kernel"),
                ({"extra": 1}, "extra"),
            ]:
                with pytest.raises(Malformed, match=f"gpu_request: .*{field}"):
                    await sched.gpu_request(
                        **{"user": "mallory", "kernel": "k9", "spec": {"fraction": 0.5}, **bad}
                    )
            assert not broker.ledger.queue and not broker.ledger.leases
            # the pool goes on serving
            good = await granted(sched, user="alice", kernel="k1", spec={"fraction": 0.5})
            assert good["state"] == "granted"
            lease = good["leases"][0]["id"]
            # a worker's notes with bad fields change nothing; neither do notes sent as calls
            tell(w, "gpu_lease_state", lease=lease, state="exploded")
            tell(w, "gpu_lease_state", lease=lease, state="idle", peak_bytes=-5)
            with pytest.raises(Malformed, match="world_size must be a whole number"):
                await sched.gpu_run_update(run="r1", world_size="two", state="running")
            with pytest.raises(Malformed, match=r"unknown field\(s\) ranks; known: attempt"):
                await sched.gpu_run_update(run="r2", ranks={"0": "not a list"})
            await sched.gpu_run_update(run="r3", user="alice", leases=[lease], state="running")
            # metrics come through a session's worker, on its stream, for that session's own lease
            tell(
                w,
                "gpu_run_metrics",
                run="r3",
                rank=0,
                lease=lease,
                items=[{"step": 1, "time": 1.0, "metrics": {"loss": float("nan")}}],
            )
            tell(w, "gpu_run_metrics", run="r4", rank="zero", items=[], lease=lease)
            assert await until(lambda: "0" in broker.runs.runs["r3"].get("ranks", {}))
            for op in ("gpu_run_metrics", "gpu_lease_state"):
                assert (
                    await getattr(sched, op)(lease=lease, run="r5", rank=0, state="running") is None
                )
            live = broker.ledger.leases[lease]
            assert live.state == "idle" and live.peak_bytes is None
            snap = await sched.gpu_snapshot()
            json.dumps(snap, allow_nan=False)  # what the panel parses: no NaN, no bytes
            assert [r["id"] for r in snap["runs"]] == ["r3"] and "r4" not in broker.runs.runs
            assert snap["runs"][0]["ranks"]["0"][0]["metrics"] == {"loss": "nan"}
            with pytest.raises(Malformed, match="whole number"):
                await sched.gpu_scale(n=1e20, user="alice")
            with pytest.raises(Malformed, match="between 0 and 60"):
                await sched.gpu_wait(id="R1", timeout=1e9)
            with pytest.raises(Malformed, match="id must be text"):
                await sched.gpu_cancel(id=["R1"], user="alice")
            tell(w, "gpu_register_worker", gpus=[{"index": 0, "uuid": "G", "name": "x"}])
            tell(
                w,
                "gpu_register_worker",
                gpus=[{"index": 0, "uuid": "G", "name": "x", "total_bytes": 2.5}],
            )
            tell(w, "gpu_session_ended", lease="L-none", reason="a barrier")
            await asyncio.sleep(0.5)
            assert len(broker.ledger.gpus) == 2  # the real GPUs are still there
            broker.ledger.check()
    finally:
        await teardown(w, plugin)
