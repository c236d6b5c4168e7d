"""Deny by default, proven by enumeration (issue 20, 3 and 4): every handler a live token pool's
scheduler, GPU worker, nanny and session answers is one that ``jupyter_gpu.interfaces
.handler_table()`` lists, and each listed one, called by alice (her valid token, her own lease's
secret, arbitrary code in her kernel) with bob's ids, refuses her and leaves bob's work as it was.
A user is bounded too: her queued requests are capped, and a flood under bob's name with a wrong
token writes nothing to the audit store.

The pool is the one ``team.py`` starts (``pool up`` and ``jupyter-gpu worker`` started as root,
real accounts). What the live servers could register is every handler of Dask's scheduler, worker
and nanny as the installed Dask builds them (its plugins' included), every op any table names, and
a few made-up ones: each is called on each server; a server that answers one its table does not
list fails the test. (A live server's handler dict cannot be read from outside its process: the
in-process twin of this test, ``tests/broker/test_plugins_inprocess.py``, compares the dicts
themselves.)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import sqlite3
import textwrap
import time

import psutil
import pytest

from tests.support.harness import snapshot, wait_until
from tests.system.security.team import PREFIX, can_make_accounts, team_pool

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(900),
    pytest.mark.skipif(can_make_accounts() is not None, reason=str(can_make_accounts())),
]

ALICE, BOB = f"{PREFIX}alice", f"{PREFIX}bob"
QUEUE_CAP = 8
# what a closed handler says (broker/gate.py, worker/dask_worker.py, worker/nanny.py), and what
# Dask says of one it does not have
CLOSED = (
    "is not available in this pool",
    "comes on a worker's own stream only",
    "is not available on a jupyter-gpu worker",
    "is not available on a jupyter-gpu nanny",
)
UNANSWERED = ("no reply", "CommClosedError", "No handler", "possibly due to security concerns")
# Dask answers a call of an op it has no handler for with nothing (None); a handler would answer
# this extra argument with an error (a TypeError, or a refusal)
NO_HANDLER = "answered: null"
PROBE_ARG = {"jgpu_probe": 1}
MADE_UP = ("gpu_admin", "gpu_session_exec", "exec", "shell", "pickle_load")


@pytest.fixture(scope="module")
def team():
    env = {"DASK_JUPYTER_GPU__MAX_QUEUED_PER_USER": str(QUEUE_CAP)}
    with team_pool((ALICE, BOB), extra_env=env) as t:
        t.bob = t.kernel(BOB)
        res = t.bob.run(
            "%%gpu --memory 1GiB\nimport numpy as np\nsecret_weights = np.arange(5) * 7\n"
            "print('bob ready')"
        )
        assert res.error is None and "bob ready" in res.stdout, res.error_text
        t.alice = t.kernel(ALICE)
        res = t.alice.run("%%gpu --memory 1GiB\nprint('alice ready')")
        assert res.error is None, res.error_text
        yield t


def kernel_facts(kernel) -> dict:
    res = kernel.run(
        "import json\n_c = get_ipython().find_magic('gpu').__self__.conn\n"
        "print(json.dumps({'lease': _c.session.lease, 'client': _c.client.id}))"
    )
    assert res.error is None, res.error_text
    return json.loads(res.stdout)


def bobs_state(team) -> dict:
    """What must not change: bob's lease (its id, session pid, state) and his variables."""
    facts = kernel_facts(team.bob)
    res = team.bob.run("%%gpu\nprint(int(secret_weights.sum()))")
    assert res.error is None and res.stdout.strip() == "70", (res.stdout, res.error_text)
    leases = {ls["id"]: ls for g in snapshot(team.address)["gpus"] for ls in g["leases"]}
    lease = facts["lease"]
    assert lease["id"] in leases and psutil.pid_exists(lease["pid"])
    return {"lease": lease["id"], "pid": lease["pid"], "client": facts["client"]}


def dask_handlers() -> dict[str, set[str]]:
    """Every handler name the installed Dask's scheduler, worker and nanny register (with the
    plugins Dask installs itself, e.g. the shuffle's), rpc and stream alike."""
    from distributed import Nanny, Scheduler, Worker

    async def go() -> dict[str, set[str]]:
        async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as s:
            async with Worker(s.address, nthreads=1, dashboard=False) as w:
                n = Nanny(s.address)
                return {
                    "scheduler": set(s.handlers),
                    "scheduler-stream": set(s.stream_handlers),
                    "worker": set(w.handlers),
                    "worker-stream": set(w.stream_handlers),
                    "nanny": set(n.handlers),
                }

    return asyncio.run(go())


# alice's kernel runs this: every probe at once, each given 20 s; a reply is "answered", an
# error is its type and text, nothing is "no reply"
PROBE = textwrap.dedent("""
    import asyncio, concurrent.futures, json
    from distributed.core import rpc
    async def one(address, op, kwargs):
        try:
            async with rpc(address, timeout=20) as r:
                reply = await asyncio.wait_for(getattr(r, op)(**kwargs), 20)
            if isinstance(reply, dict) and reply.get("status") in ("error", "uncaught-error"):
                return "error: " + str(reply.get("exception_text"))[:300]
            return "answered: " + json.dumps(reply, default=str)[:3000]
        except asyncio.TimeoutError:
            return "no reply"
        except Exception as exc:
            return f"error {type(exc).__name__}: {str(exc)[:300]}"
    async def go():
        replies = await asyncio.gather(*(one(*p) for p in PROBES))
        return [[*p, r] for p, r in zip(PROBES, replies)]
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        _out = ex.submit(asyncio.run, go()).result()
    print(json.dumps(_out))
    """)


def probe(team, probes: list[tuple[str, str, dict]]) -> list[tuple[str, str, dict, str]]:
    res = team.alice.run(f"PROBES = {json.dumps(probes)}\n" + PROBE, timeout=300)
    assert res.error is None, res.error_text
    return [tuple(p) for p in json.loads(res.stdout.strip().splitlines()[-1])]


def nanny_address(team) -> str:
    ports = [
        s.laddr.port
        for s in psutil.Process(team.services.worker.pid).net_connections(kind="tcp")
        if s.status == psutil.CONN_LISTEN
    ]
    assert ports, "the nanny's port"
    return f"tcp://127.0.0.1:{ports[0]}"


def open_ops(server: str) -> dict[str, str]:
    """Op -> check of what the table says ``server`` answers as calls."""
    from jupyter_gpu import interfaces

    return {
        r.op: r.check
        for r in interfaces.handler_table()
        if r.server == server and r.kind == "handler" and r.op != "*"
    }


def test_every_live_server_answers_only_what_the_table_lists(team):
    """Each of Dask's handlers, each op of any table and a few made-up ones, called on the live
    scheduler, worker, nanny and bob's session: what is not in that server's table is closed (its
    refusal) or has no handler; what is open without a check is what a client needs."""
    from jupyter_gpu import interfaces

    bob = bobs_state(team)
    alice = kernel_facts(team.alice)
    bob_lease = kernel_facts(team.bob)["lease"]
    servers = {
        "scheduler": team.address,
        "worker": bob_lease["worker"],
        "nanny": nanny_address(team),
        "session": bob_lease["address"],
    }
    dask = dask_handlers()
    every = set(MADE_UP) | {r.op for r in interfaces.handler_table() if r.kind == "handler"}
    every |= set().union(*dask.values())
    every -= {"*", "register-client"}  # a client's stream, not a call (it would stay open)
    probes = []
    for server, address in servers.items():
        listed = open_ops(server)
        for op in sorted(every - set(listed)):
            # nothing of alice's, nothing of bob's: a closed handler must not care
            probes.append((server, address, op, PROBE_ARG))
    replies = probe(team, [(address, op, kwargs) for _, address, op, kwargs in probes])
    where = {address: server for server, address in servers.items()}
    answered, unexplained = [], []
    for address, op, _, reply in replies:
        server = where[address]
        if reply == NO_HANDLER:
            continue
        if op == "close" and reply == 'answered: "OK"':
            continue  # Dask's comm loop itself: it closes the caller's own connection, no handler
        if reply.startswith("answered"):
            answered.append((server, op, reply[:200]))
        elif not any(m in reply for m in CLOSED + UNANSWERED):
            unexplained.append((server, op, reply[:200]))
    assert answered == [], answered
    # an error that is not a refusal would be an open handler that failed on empty arguments
    assert unexplained == [], unexplained
    # Dask's own handlers on the scheduler, worker and nanny are closed with their refusal
    for server in ("scheduler", "worker", "nanny"):
        refused = {
            op
            for address, op, _, reply in replies
            if where[address] == server and any(m in reply for m in CLOSED)
        }
        assert dask[server] - set(open_ops(server)) - {"register-client", "close"} <= refused, (
            server
        )
    assert bobs_state(team) == bob
    assert alice["lease"]["id"] in {
        ls["id"] for g in snapshot(team.address)["gpus"] for ls in g["leases"]
    }


def test_each_listed_handler_refuses_alice_with_bobs_ids(team):
    """Every handler the table lists for the scheduler, worker, nanny and session, called by
    alice with bob's lease, request, client, worker and session, her own token and her own
    lease's secret: refused (or, for the few open to anyone, answered with nothing of bob's
    session), and bob's lease, session and variables are as they were."""
    bob = bobs_state(team)
    alice = kernel_facts(team.alice)
    mine = alice["lease"]
    theirs = kernel_facts(team.bob)["lease"]
    tok = team.tokens[ALICE]
    as_bob = {"user": BOB, "token": tok}  # his name, her token
    as_me = {"user": ALICE, "token": tok}  # her name and token, his ids
    lease_view = {k: theirs[k] for k in ("id", "user", "worker", "gpu_indices", "bytes")}
    lease_view["isolation"] = "user"
    spec = {"memory": 2**20}
    calls: dict[tuple[str, str], list[dict]] = {
        ("scheduler", "gpu_request"): [
            {**as_bob, "kernel": "k", "spec": spec, "client": alice["client"]},
            {**as_me, "kernel": "k", "spec": spec, "client": bob["client"]},
        ],
        ("scheduler", "gpu_wait"): [
            {"id": theirs["request"], **as_me},
            {"id": theirs["request"], **as_bob},
        ],
        ("scheduler", "gpu_cancel"): [
            {"id": bob["lease"], **as_me},
            {"id": bob["lease"], **as_bob},
        ],
        ("scheduler", "gpu_release"): [
            {"lease": bob["lease"], **as_me},
            {"lease": bob["lease"], **as_bob},
        ],
        ("scheduler", "gpu_lease_info"): [
            {"lease": bob["lease"], **as_me},
            {"lease": bob["lease"], **as_bob},
        ],
        ("scheduler", "gpu_run_update"): [
            # a run naming bob's lease as hers; one under his name; one without a token
            {"run": "run-alice", **as_me, "leases": [bob["lease"]], "state": "running"},
            {"run": "run-bob", **as_bob, "leases": [bob["lease"]], "state": "failed"},
            {"run": "run-bob", "user": BOB, "leases": [bob["lease"]], "state": "failed"},
        ],
        ("scheduler", "gpu_scale"): [{"n": 0, **as_me}, {"n": 0, **as_bob}],
        ("scheduler", "gpu_drain"): [
            # bob's worker drained by alice (it would move or end his session): no proof, a
            # made-up one, and a proof made with a key that is not the pool's
            {"workers": [theirs["worker"]], "timeout": 1},
            {
                "workers": [theirs["worker"]],
                "timeout": 1,
                "proof": {"time": time.time(), "nonce": "n", "mac": "0" * 64},
            },
            {
                "workers": [theirs["worker"]],
                "timeout": 1,
                "proof": proof_with("not-the-pool-key", "drain", theirs["worker"]),
            },
        ],
        ("scheduler", "register-worker"): [
            {"address": "tcp://6.6.6.6:1", "nthreads": 1, "resources": {"GPU": 1000}}
        ],
        ("scheduler", "heartbeat_worker"): [
            {"address": theirs["worker"], "metrics": {}, "resources": {"GPU": 1000}}
        ],
        ("worker", "gpu_session_start"): [
            {"lease": lease_view, "secret": "s", "client": bob["client"]},
            {"lease": lease_view, "secret": "s", "key": "not-the-pool-key"},
        ],
        ("worker", "gpu_session_signal"): [
            {"lease": bob["lease"], "signal": "kill"},
            {"lease": bob["lease"], "signal": "kill", "key": "not-the-pool-key"},
        ],
        ("worker", "gpu_session_offload"): [{"lease": bob["lease"]}],
        ("worker", "gpu_offload_fetch"): [{"lease": bob["lease"], "key": "not-the-pool-key"}],
        ("worker", "gpu_offload_discard"): [{"lease": bob["lease"]}],
        ("worker", "gpu_offload_spill"): [{"lease": bob["lease"], "key": "not-the-pool-key"}],
        ("nanny", "close_gracefully"): [{"key": "not-the-nannys-key"}, {}],
        # bob's session, with the secret of alice's own lease
        ("session", "execute"): [
            {"secret": mine["secret"], "code": "open('/tmp/owned', 'w')", "inputs": {}},
            {"code": "open('/tmp/owned', 'w')", "inputs": {}},
        ],
        ("session", "pull"): [{"secret": mine["secret"], "name": "secret_weights"}],
        ("session", "ping"): [{"secret": mine["secret"]}],
        ("session", "free_port"): [{"secret": mine["secret"]}],
        ("session", "interrupt"): [{"secret": mine["secret"]}],
        ("session", "offload"): [{"secret": mine["secret"], "path": "/tmp/stolen"}],
        ("session", "restore"): [{"secret": mine["secret"], "path": "/tmp/planted"}],
        ("session", "assign"): [
            {
                "key": "not-the-spawn-key",
                "secret": mine["secret"],
                "lease": lease_view,
                "gpus": [],
            }
        ],
    }
    # open to anyone: answered, with nothing of bob's session in the reply
    anyone: dict[tuple[str, str], dict] = {
        ("scheduler", "identity"): {},
        ("scheduler", "gpu_snapshot"): {},
        ("scheduler", "gpu_usage"): {},
        ("scheduler", "register_nanny"): {"address": "tcp://6.6.6.6:1"},
        ("worker", "identity"): {},
        ("worker", "gpu_inventory"): {},
        ("worker", "gpu_session_starter"): {},
        ("nanny", "identity"): {},
        ("session", "identity"): {},
    }
    servers = {
        "scheduler": team.address,
        "worker": theirs["worker"],
        "nanny": nanny_address(team),
        "session": theirs["address"],
    }
    probes = [(servers[s], op, kw) for (s, op), variants in calls.items() for kw in variants]
    probes += [(servers[s], op, kw) for (s, op), kw in sorted(anyone.items())]
    leaks = (f'"{theirs["address"]}"', f'"pid": {theirs["pid"]}', theirs["secret"])
    replies = probe(team, probes)
    where = {address: server for server, address in servers.items()}
    wrong = []
    for address, op, kwargs, reply in replies:
        server = where[address]
        if (server, op) in anyone:
            if not reply.startswith("answered") or any(v in reply for v in leaks):
                wrong.append((server, op, reply[:300]))
        elif op == "gpu_wait" and '"state": "unknown"' in reply:
            continue  # a granted request is gone: nothing of bob's is said
        elif reply.startswith("answered") or reply == "no reply":
            wrong.append((server, op, kwargs, reply[:300]))
    runs = snapshot(team.address).get("runs") or []
    forged_runs = [r for r in runs if r.get("id") in ("run-alice", "run-bob")]
    opened = sorted({f"{w[0]}.{w[1]}" for w in wrong})  # the doors, then what each answered
    assert wrong == [] and not forged_runs, ([r.get("id") for r in forged_runs], opened, wrong)
    assert bobs_state(team) == bob
    # the test knows how to attack every handler the table lists, and no other (checked after the
    # attack: the table is what issue 20 added, the attack is what a user could always do)
    from jupyter_gpu import interfaces

    table = {
        (r.server, r.op)
        for r in interfaces.handler_table()
        if r.server in servers and r.kind == "handler" and r.op not in ("*", "register-client")
    }
    assert table == set(calls) | set(anyone), table ^ (set(calls) | set(anyone))


def proof_with(key: str, purpose: str, address: str) -> dict:
    """A proof of holding ``key`` in the pool's format (``common/poolkey.py``: an HMAC over the
    purpose, address, time and a nonce), as anyone can make one with a key of their own."""
    t, nonce = time.time(), secrets.token_urlsafe(12)
    text = f"jupyter-gpu|{purpose}|{address}|{t!r}|{nonce}"
    return {
        "time": t,
        "nonce": nonce,
        "mac": hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest(),
    }


def test_a_users_queue_is_capped_and_a_wrong_token_is_never_audited(team):
    """Before: 10,000 queued requests of one user made another's cell wait minutes, and every
    refused request with a wrong token was written to the audit store, under the victim's name."""
    bob = bobs_state(team)
    alice = kernel_facts(team.alice)
    db = str(team.secrets / "audit.sqlite")

    def refused_rows(user: str) -> int:
        with sqlite3.connect(db) as con:
            return con.execute("SELECT count(*) FROM refused WHERE user = ?", (user,)).fetchone()[0]

    before = refused_rows(BOB)
    tok = team.tokens[ALICE]
    whole = {"gpus": 1}  # a whole GPU: waits while bob and alice hold a part of each (or one)
    flood = [
        (team.address, "gpu_request", {"user": BOB, "token": "wrong", "kernel": "k", "spec": whole})
        for _ in range(200)
    ]
    flood += [
        (
            team.address,
            "gpu_request",
            {"user": ALICE, "token": tok, "kernel": "k", "spec": whole, "client": alice["client"]},
        )
        for _ in range(QUEUE_CAP * 4)
    ]
    replies = probe(team, flood)
    wrong_token = [r for _, _, kw, r in replies if kw["user"] == BOB]
    answered = [
        json.loads(r.split(": ", 1)[1]) for _, _, kw, r in replies if r.startswith("answered")
    ]
    mine = [q for q in answered if q.get("id")]  # hers (a wrong token's answer, if any, has none)
    full = [r for _, _, kw, r in replies if "as many as one user may" in r]
    try:
        # the cap counts what waits: one of them may have found a GPU free (and be starting)
        waiting = [q for q in mine if q["state"] == "queued"]
        broken = []
        if refused_rows(BOB) != before:
            broken.append(f"{refused_rows(BOB) - before} wrong-token requests audited as bob's")
        if len(waiting) != QUEUE_CAP or len(mine) > QUEUE_CAP + 1:
            broken.append(f"{len(waiting)} of her requests wait (the cap is {QUEUE_CAP})")
        # her full queue is audited once (not once a refusal): the store does not fill either
        if refused_rows(ALICE) > 2:
            broken.append(f"{refused_rows(ALICE)} refusals of hers audited")
        assert broken == [], broken
        assert all(r.startswith("error") and "NotAuthorized" in r for r in wrong_token), {
            r[:120] for r in wrong_token
        }
        assert len(full) == QUEUE_CAP * 4 - len(mine), full[:2]
        assert bobs_state(team) == bob
    finally:
        cancel = [
            (team.address, "gpu_cancel", {"id": q["id"], "user": ALICE, "token": tok}) for q in mine
        ]
        probe(team, cancel)


GONE_CLIENT = textwrap.dedent("""
    import json, os
    from distributed import Client
    c = Client(ADDRESS, timeout=30, set_as_default=False)
    def ask(spec, **client):
        try:
            return c.sync(c.scheduler.gpu_request, user=USER, kernel=KERNEL, spec=spec,
                          token=os.environ["JUPYTER_GPU_TOKEN"], **client)
        except Exception as exc:
            return {"id": None, "state": "refused", "reason": repr(exc)[:200]}
    made = [
        # her client's: granted at once, and granted or waiting
        ask({"memory": 2**20}, client=c.id), ask({"gpus": 1}, client=c.id),
        ask({"memory": 2**20}),  # no client: the pool's rpc, as any program can call it
        ask({"memory": 2**20}, client="Client-made-up"),  # a client that does not exist
    ]
    c.close()
    print(json.dumps(made))
    """)


def test_a_users_requests_and_leases_end_with_her_client(team):
    """Before: requests and leases were not tied to a live client: made without one, or naming
    one that does not exist, they outlived the kernel that made them (10,000 of them, and a whole
    GPU, held for nobody). Now each is refused, or ends with the client it came from."""
    bob = bobs_state(team)
    kernel = f"k-gone-{secrets.token_hex(3)}"
    res = team.alice.run(
        f"ADDRESS = {team.address!r}\nUSER = {ALICE!r}\nKERNEL = {kernel!r}\n" + GONE_CLIENT
    )
    assert res.error is None, res.error_text
    made = json.loads(res.stdout.strip().splitlines()[-1])
    assert all(r["state"] in ("granted", "starting", "queued") for r in made[:2]), made
    ids = {r["id"] for r in made} - {None}

    def left() -> list[str]:
        snap = snapshot(team.address)
        held = [
            ls["id"]
            for g in snap["gpus"]
            for ls in g["leases"]
            if ls.get("kernel") == kernel or ls.get("request") in ids
        ]
        return held + [q["id"] for q in snap["queue"] if q["id"] in ids]

    # her client closed (all she did): what it was granted or queued ends with it
    assert wait_until(lambda: not left(), 30), f"still held or queued: {left()} ({made})"
    assert bobs_state(team) == bob
