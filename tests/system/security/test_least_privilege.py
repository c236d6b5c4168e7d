"""Least privilege (issue 20): no Dask process runs as root, the pool key stays in the pool's account,
nothing a peer sends is unpickled, and a session is confined before anything in it runs.

The pool is ``jupyter-gpu pool up`` and ``jupyter-gpu worker`` started as root with a token file, as
an administrator starts them (``team.py``): both give root up for a service account of their own,
and the worker's launcher keeps root. alice attacks from her kernel and her cells (a valid token,
arbitrary code); the test, as root, checks what the machine says (``/proc``, the logs, the files).
Each test names the attack of the issue it replays; every one of them worked before.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import textwrap

import psutil
import pytest

from tests.support.harness import snapshot, wait_until, worker_pid
from tests.system.security.team import PREFIX, can_make_accounts, team_pool

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(600),
    pytest.mark.skipif(can_make_accounts() is not None, reason=str(can_make_accounts())),
]

ALICE, BOB = f"{PREFIX}alice", f"{PREFIX}bob"
PIDS_LIMIT = 96


@pytest.fixture(scope="module")
def team():
    env = {"DASK_JUPYTER_GPU__SESSION__PIDS_LIMIT": str(PIDS_LIMIT)}
    with team_pool((ALICE, BOB), extra_env=env) as t:
        t.bob = t.kernel(BOB)
        res = t.bob.run(
            "%%gpu\nimport numpy as np\nsecret_weights = np.arange(5) * 7\nprint('bob ready')"
        )
        assert res.error is None and "bob ready" in res.stdout, res.error_text
        t.alice = t.kernel(ALICE)
        res = t.alice.run("%%gpu\nprint('alice ready')")
        assert res.error is None, res.error_text
        yield t


def lease_of(team, kernel) -> dict:
    res = kernel.run(
        "import json\n_c = get_ipython().find_magic('gpu').__self__.conn\n"
        "print(json.dumps(_c.session.lease))"
    )
    return json.loads(res.stdout)


def bob_is_fine(team) -> None:
    res = team.bob.run("%%gpu\nprint(int(secret_weights.sum()))")
    assert res.error is None and res.stdout.strip() == "70", (res.stdout, res.error_text)


def alice_cell(team, code: str, timeout: float = 180) -> str:
    res = team.alice.run("%%gpu\n" + code, timeout=timeout)
    assert res.error is None, res.error_text
    return res.stdout


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


# ---------------------------------------------------------------------- who runs as whom
def test_no_dask_process_runs_as_root_only_the_launcher_and_its_zygote_do(team):
    """Before: the scheduler, the nannies, the Dask workers and the zygote ran as root (any of them
    taken over was root on the GPU machine)."""
    svc = team.service.pw_uid
    scheduler = tree(team.services.scheduler.pid)
    assert {p.uids().effective for p in scheduler} == {svc}, [(p.pid, p.uids()) for p in scheduler]
    worker = tree(team.services.worker.pid)
    root = [p for p in worker if p.uids().effective == 0]
    launcher = [p for p in root if p.ppid() == team.services.worker.pid]
    zygote = [p for p in root if "jupyter_gpu.launcher.zygote" in " ".join(p.cmdline())]
    assert len(launcher) == 1 and set(root) == {*launcher, *zygote}, [
        (p.pid, " ".join(p.cmdline())[:120]) for p in root
    ]
    assert psutil.Process(team.services.worker.pid).uids().effective == svc
    dask = [p for p in worker if p not in root]
    users = {team.users[ALICE].pw_uid, team.users[BOB].pw_uid}
    # the nannies' process, the Dask workers: the service account; sessions: their users
    assert {p.uids().effective for p in dask} <= {svc} | users
    sessions = {lease_of(team, k)["pid"]: k for k in (team.alice, team.bob)}
    assert psutil.Process(lease_of(team, team.alice)["pid"]).uids().effective == (
        team.users[ALICE].pw_uid
    )
    assert sessions and all(
        psutil.Process(pid).ppid() in {p.pid for p in zygote} for pid in sessions
    )


def test_zygotes_start_from_root_with_nothing_anyone_else_can_write_on_their_path(team):
    """Before: the zygote was started with ``-m`` from the worker's working folder (on its module
    path): a module there was imported as root."""
    modules = ("jupyter_gpu.launcher.zygote", "jupyter_gpu.session.zygote")
    forked = [p for p in tree(team.services.worker.pid) if set(modules) & set(p.cmdline())]
    # a session forked from a zygote keeps its command line: the zygotes are the others
    zygotes = [p for p in forked if p.ppid() not in {q.pid for q in forked}]
    assert zygotes
    for p in zygotes:
        cmd = p.cmdline()
        assert cmd[1:3] == ["-I", "-c"], cmd
        assert p.cwd() == "/", p.cwd()
        path = json.loads(cmd[5])
        from jupyter_gpu.common.safe_python import why_unsafe

        assert all(why_unsafe(entry, p.uids().effective) is None for entry in path), path
    assert [p for p in zygotes if "jupyter_gpu.launcher.zygote" in p.cmdline()]


def test_dask_workers_scratch_space_is_a_private_folder_of_the_service_account(team):
    """Before: root workers used Dask's default ``/tmp/dask-scratch-space``, which Dask puts on
    the worker's module path: a user who made that folder first (after a reboot, a tmp cleaner)
    had her ``pynvml.py`` imported as root. The folder Dask works in (it holds each worker's lock
    file open) is a fresh one of the service account's, which nobody else may write, and nothing
    on its way down may be written by another account either."""
    locks = []
    for p in tree(team.services.worker.pid):
        try:
            locks += [f.path for f in p.open_files() if f.path.endswith(".dirlock")]
        except psutil.Error:
            continue
    assert locks, "no Dask worker holds a scratch-space lock"
    for lock in locks:
        assert not lock.startswith("/tmp/dask-scratch-space/"), lock
        folder, private = os.path.dirname(lock), None
        while folder not in ("/", ""):
            st = os.stat(folder)
            if os.path.basename(folder).startswith("jupyter-gpu-dask-"):
                private = st
                break
            assert st.st_uid == team.service.pw_uid and not st.st_mode & 0o022, (folder, lock)
            folder = os.path.dirname(folder)
        assert private is not None, lock
        assert private.st_uid == team.service.pw_uid and not private.st_mode & 0o077, lock


# ---------------------------------------------------------------------- the pool key
def test_the_pool_key_never_leaves_the_pools_account(team):
    """Before: the scheduler's ``identity`` (open to anyone, and ``Client.scheduler_info()`` in a
    cell) carried every worker's start-up information, with the pool key."""
    with open(team.services.pool_key_path()) as f:
        key = f.read().strip()
    out = alice_cell(
        team,
        textwrap.dedent(f"""
        import asyncio, json
        from distributed import Client
        from distributed.core import rpc
        async def go():
            async with rpc({team.address!r}) as r:
                return await r.identity()
        ident = asyncio.run(go())
        c = Client({team.address!r}, timeout=30, set_as_default=False)
        info = c.scheduler_info()
        c.close()
        print(json.dumps({{"identity": ident, "info": info}}, default=str))
        """),
    )
    seen = json.loads(out)
    assert key not in out, "alice's cell read the pool key from identity or scheduler_info"
    assert seen["identity"]["workers"] == {} and seen["info"]["workers"] == {}, out[:2000]
    st = os.stat(team.services.pool_key_path())
    assert st.st_uid == team.service.pw_uid and st.st_mode & 0o077 == 0
    assert key not in json.dumps(snapshot(team.address))
    for name in ("scheduler", "worker"):
        assert key not in team.services.full_log(name), name
    for k in (team.alice, team.bob):
        with open(f"/proc/{lease_of(team, k)['pid']}/environ", "rb") as f:
            assert key.encode() not in f.read()


def test_a_worker_that_cannot_prove_the_pool_key_cannot_join_beat_or_offer(team):
    """Before: anyone holding the key (anyone: it was public) registered a fake worker with a fake
    GPU, and ``heartbeat_worker`` (no key at all) rewrote a real worker's resources."""
    worker = sorted({g["worker"] for g in snapshot(team.address)["gpus"]})[0]
    out = alice_cell(
        team,
        textwrap.dedent(f"""
        import asyncio
        from distributed import Worker
        from distributed.core import rpc
        async def go():
            try:  # a real Dask worker of hers, with whatever start-up information she likes
                w = Worker({team.address!r}, nthreads=1, dashboard=False, host="127.0.0.1")
                await asyncio.wait_for(w.start(), 30)
                print("JOINED")
                await w.close()
            except BaseException as exc:
                print("join refused", type(exc).__name__)
            metrics = {{"bandwidth": {{"total": 1, "workers": {{}}, "types": {{}}}},
                        "digests_total_since_heartbeat": {{}}, "memory": 1,
                        "spilled_bytes": {{"memory": 0, "disk": 0}}}}
            async with rpc({team.address!r}) as s:
                try:
                    reply = await s.heartbeat_worker(address={worker!r}, metrics=metrics,
                                                     resources={{"GPU": 1000}})
                    if isinstance(reply, dict) and reply.get("status") == "error":
                        print("beat refused", reply["exception_text"][:160])
                    else:
                        print("BEAT", reply)
                except Exception as exc:
                    print("beat refused", str(exc)[:120])
        asyncio.run(go())
        """),
    )
    assert "JOINED" not in out and "BEAT" not in out and "beat refused" in out, out
    assert "with a proof that it holds the pool key" in out, out
    # her client's stream: a worker's report there names no worker (the stream's own is a client)
    res = team.alice.run(
        "_c = get_ipython().find_magic('gpu').__self__.conn.client\n"
        "_c._send_to_scheduler({'op': 'gpu_register_worker', 'worker': 'tcp://6.6.6.6:1', "
        "'gpus': [{'index': 0, 'uuid': 'FAKE', 'name': 'fake', 'total_bytes': 2**50}]})\n"
        "_c._send_to_scheduler({'op': 'gpu_session_ended', 'worker': "
        f"{worker!r}, 'lease': {lease_of(team, team.bob)['id']!r}, 'reason': 'forged'}})\n"
        "print('sent')"
    )
    assert "sent" in res.stdout, res.error_text
    assert not wait_until(
        lambda: any(g["uuid"] == "FAKE" for g in snapshot(team.address)["gpus"]), 3
    )
    bob_is_fine(team)


def test_a_message_on_alices_client_stream_cannot_act_as_bobs_client(team):
    """Before: Dask merged the stream's own ``client`` under the message: alice's ``close-client``
    naming bob's client closed it, and his leases ended with it."""
    bobs = team.bob.run(
        "print(get_ipython().find_magic('gpu').__self__.conn.client.id)"
    ).stdout.strip()
    lease = lease_of(team, team.bob)["id"]
    # a client of hers besides her kernel's (the message closes the client it came from)
    res = team.alice.run(
        "from distributed import Client\n"
        f"_c = Client({team.address!r}, set_as_default=False, timeout=30)\n"
        f"_c._send_to_scheduler({{'op': 'close-client', 'client': {bobs!r}}})\n"
        "import time; time.sleep(1); print('sent')"
    )
    assert "sent" in res.stdout, res.error_text
    assert not wait_until(
        lambda: (
            lease not in {ls["id"] for g in snapshot(team.address)["gpus"] for ls in g["leases"]}
        ),
        3,
    )
    bob_is_fine(team)


# ---------------------------------------------------------------------- nothing is unpickled
PICKLE_ATTACK = textwrap.dedent("""
    import asyncio, json, os
    from distributed.core import rpc
    from distributed.protocol import Serialize, ToPickle
    class Planted:
        def __init__(self, path):
            self.path = path
        def __reduce__(self):
            return (open, (self.path, "w"))
    async def one(address, path, wrap):
        try:
            async with rpc(address) as r:
                reply = await asyncio.wait_for(r.identity(junk=wrap(Planted(path))), 20)
            return "answered: " + str(reply)[:80]
        except Exception as exc:
            return f"{type(exc).__name__}: {str(exc)[:160]}"
    async def go():
        out = {}
        for kind, (address, path) in TARGETS.items():
            for wrap in (ToPickle, Serialize):
                out[f"{kind} {wrap.__name__}"] = await one(address, path + wrap.__name__, wrap)
        print(json.dumps(out))
    asyncio.run(go())
    """)


def test_no_server_of_the_pool_unpickles_what_a_peer_sends(team, tmp_path):
    """Before: ``identity(junk=ToPickle(obj))`` ran ``obj.__reduce__`` in the scheduler, a worker,
    a nanny, and bob's session (as bob, before his lease secret was checked): Dask unpickles while
    it reads, before any handler."""
    folder = f"/var/tmp/jgpu-pickles-{secrets.token_hex(4)}"
    os.mkdir(folder)
    os.chmod(folder, 0o1777)
    try:
        worker = lease_of(team, team.bob)["worker"]
        nanny = [
            s.laddr.port
            for s in psutil.Process(team.services.worker.pid).net_connections(kind="tcp")
            if s.status == psutil.CONN_LISTEN
        ]
        assert nanny, "the nanny's port"
        targets = {
            "scheduler": team.address,
            "worker": worker,
            "nanny": f"tcp://127.0.0.1:{nanny[0]}",
            "session": lease_of(team, team.bob)["address"],
        }
        planted = {kind: (address, f"{folder}/{kind}-") for kind, address in targets.items()}
        out = alice_cell(team, f"TARGETS = {planted!r}\n" + PICKLE_ATTACK)
        replies = json.loads(out)
        assert os.listdir(folder) == [], (os.listdir(folder), replies)
        for what, reply in replies.items():
            # a pickle is refused as it is read; a serialized value is refused by a server that
            # deserializes, and left unread (frames) by one that does not (the scheduler, a
            # session): either way, nothing ran
            if what.endswith("ToPickle") or what.split()[0] in ("worker", "nanny"):
                assert "reads no pickled data" in reply, (what, reply)
        # everyone still answers
        assert snapshot(team.address)["gpus"]
        bob_is_fine(team)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------- a confined session
CONFINED = textwrap.dedent("""
    import json, os, resource
    tids = os.listdir('/proc/self/task')
    namespaces = {t: os.readlink(f'/proc/self/task/{t}/ns/mnt') for t in tids}
    for t in tids:  # each thread's view of /tmp: the session's own, or (before) the host's
        try:
            open(f'/proc/self/task/{t}/root/tmp/{MARK}-{t}', 'w').close()
        except OSError:
            pass
    fds = {}
    for fd in os.listdir('/proc/self/fd'):
        try:
            fds[fd] = os.readlink(f'/proc/self/fd/{fd}')
        except OSError:
            pass
    for fd, target in fds.items():  # a forged line, on every pipe it holds
        if target.startswith('pipe:'):
            try:
                os.set_blocking(int(fd), False)
                os.write(int(fd), f'\\n{MARK} forged by alice\\n'.encode())
            except OSError:
                pass
    print(json.dumps({"threads": len(tids), "ns": namespaces, "fds": fds, "cwd": os.getcwd(),
                      "core": resource.getrlimit(resource.RLIMIT_CORE),
                      "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
                      "cgroup": open('/proc/self/cgroup').read()}))
    """)


def test_a_session_is_confined_before_any_thread_or_user_code_exists(team):
    """Before: private /tmp and /dev/shm were entered after the session's threads existed (7 of 8
    stayed in the host's mount namespace: ``/proc/self/task/<tid>/root/tmp`` wrote the host's
    /tmp); the session kept root-opened descriptors (the worker's log, read and forged through
    ``os.dup(2)``); no pids limit."""
    mark = f"jgpu-confined-{secrets.token_hex(4)}"
    out = alice_cell(team, f"MARK = {mark!r}\n" + CONFINED)
    # the forged line went to every pipe the session holds, its output's too: it may come after the
    # JSON line or before it
    seen = json.loads(next(ln for ln in reversed(out.strip().splitlines()) if ln.startswith("{")))
    worker_log = str(team.services.root / "worker.log")
    paths = {fd: t for fd, t in seen["fds"].items() if t.startswith("/")}
    # each attack of the issue that still works, named (all are checked, not the first only)
    broken = []
    if not (seen["threads"] > 1 and len(set(seen["ns"].values())) == 1):
        broken.append(f"threads in different mount namespaces: {seen['ns']}")
    if next(iter(seen["ns"].values())) == os.readlink("/proc/self/ns/mnt"):
        broken.append("the session's thread is in the host's mount namespace")
    if [f for f in os.listdir("/tmp") if f.startswith(mark)]:
        broken.append("a thread of the session wrote the host's /tmp")
    # /dev/null, and what the session opened itself in its own, private /tmp
    if not all(t == "/dev/null" or t.startswith("/tmp/") for t in paths.values()):
        broken.append(f"the session holds descriptors it did not open: {paths}")
    if worker_log in paths.values():
        broken.append("the session holds the worker's log open")
    # the session's /tmp is not the host's: what it opened there is not here
    if any(os.path.exists(t) for t in paths.values() if t.startswith("/tmp/")):
        broken.append(f"the session's /tmp files are the host's: {paths}")
    if seen["cwd"] != team.users[ALICE].pw_dir:
        broken.append(f"cwd {seen['cwd']}")
    if tuple(seen["core"]) != (0, 0) or tuple(seen["nproc"]) != (PIDS_LIMIT, PIDS_LIMIT):
        broken.append(f"rlimits core {seen['core']} nproc {seen['nproc']}")
    # her forged lines reach the worker's log marked as her session's, never as the worker's own
    lease = lease_of(team, team.alice)["id"]
    if wait_until(lambda: mark in team.services.full_log("worker"), 10):
        forged = [ln for ln in team.services.full_log("worker").splitlines() if mark in ln]
        if not all(f"[session {lease}]" in ln for ln in forged):
            broken.append(f"forged lines in the worker's log as its own: {forged}")
    else:
        broken.append("the session's output does not reach the worker's log")
    assert broken == [], broken


def test_a_session_cannot_start_more_processes_than_its_pids_limit(team):
    """Before: no pids limit (RLIMIT_NPROC above pid_max): a fork bomb took the machine."""
    out = alice_cell(
        team,
        textwrap.dedent(f"""
        import subprocess
        started, error = [], None
        try:
            for i in range({PIDS_LIMIT * 2}):
                started.append(subprocess.Popen(['sleep', '60']))
        except OSError as exc:
            error = type(exc).__name__
        for p in started:
            p.kill(); p.wait()
        print(len(started), error)
        """),
    )
    count, error = out.split()
    assert int(count) < PIDS_LIMIT and error != "None", out
    bob_is_fine(team)


# ---------------------------------------------------------------------- the launcher's grant
def forged_grant(user: str, lease: str, worker: str, gpus: list[int]) -> str:
    """A grant in the launcher's format (docs/security.md: the payload's canonical JSON and its
    Ed25519 signature) signed with a key that is not the broker's: what anyone can make."""
    import base64
    import time

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    now = time.time()
    grant = {
        "v": 1, "user": user, "as_user": True, "lease": lease, "worker": worker, "gpus": gpus,
        "bytes": 2**20, "issued": now, "expires": now + 120, "nonce": secrets.token_urlsafe(16),
    }  # fmt: skip
    payload = json.dumps(grant, sort_keys=True, separators=(",", ":")).encode()
    signature = Ed25519PrivateKey.generate().sign(b"jupyter-gpu grant v1\0" + payload)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(payload)}.{b64(signature)}"


def test_with_the_pool_key_a_session_still_never_runs_as_root_or_as_someone_unsigned(team):
    """Before: ``gpu_session_start(account=None)`` with the pool key started a session that stayed
    root (it read the token file). Even holding the key (the test reads it, as root), a worker
    call starts no session as another user without the broker's grant, and none as root."""
    import asyncio

    from distributed.core import rpc

    with open(team.services.pool_key_path()) as f:
        key = f.read().strip()
    worker = lease_of(team, team.bob)["worker"]
    index = next(g["index"] for g in snapshot(team.address)["gpus"] if g["worker"] == worker)
    # each for the lease it is sent with (below): only its signature is wrong
    forged = {n: forged_grant(BOB, f"L-forged{n}", worker, [index]) for n in (2, 3)}
    started: dict[str, int] = {}

    async def start(n: int, **kwargs) -> str:
        # a lease id of its own each time: one the worker started stays (a started pid is shown)
        lease = {"id": f"L-forged{n}", "gpu_indices": [index], "bytes": 2**20, "isolation": "none"}
        try:
            async with rpc(worker) as w:
                reply = await w.gpu_session_start(lease=lease, secret="s", key=key, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure is a refusal here
            return f"refused: {exc}"
        if isinstance(reply, dict) and reply.get("pid"):
            started[f"{kwargs}"] = reply["pid"]
            return f"started pid {reply['pid']}"
        return f"refused: {reply}"

    async def go() -> list[str]:
        return [
            await start(0, account=None),  # the attack: no account, the worker's own
            await start(1, account=BOB),  # no grant
            await start(2, account=BOB, grant=forged[2]),  # a grant the broker did not sign
            await start(3, account="root", grant=forged[3]),
        ]

    async def end() -> None:  # what the worker started (a test's leftover, not the broker's)
        async with rpc(worker) as w:
            for n in range(4):
                try:
                    await w.gpu_session_signal(lease=f"L-forged{n}", signal="kill", key=key)
                except Exception:  # noqa: BLE001 - nothing runs for that lease
                    pass

    try:
        replies = asyncio.run(go())
        uids = {how: psutil.Process(pid).uids().effective for how, pid in started.items()}
    finally:
        asyncio.run(end())
    # with no account asked for, the worker may start one as its own (the service account, which
    # holds the key anyway); never as root, never as a user the broker did not sign for
    assert all(uid == team.service.pw_uid for uid in uids.values()), (
        f"sessions started as root or as another account without the broker's grant: {uids}",
        replies,
    )
    assert all(r.startswith("refused") for r in replies[1:]), replies
    assert "no signed grant" in replies[1] and "signature is not the broker's" in replies[2], (
        replies
    )
    for p in tree(team.services.worker.pid):
        if p.uids().effective == 0:
            assert "jupyter_gpu.session" not in " ".join(p.cmdline()[3:]) or "zygote" in " ".join(
                p.cmdline()
            )
    assert pwd.getpwuid(psutil.Process(worker_pid(worker)).uids().effective).pw_name == (
        team.service.pw_name
    )
    bob_is_fine(team)


# ---------------------------------------------------------------------- what a user can find
# alice's cell: every value named like the pool key in what identity and scheduler_info show her
# (none, or a guess), then each worker-only call of the issue with it, against bob's work; each
# reply is printed as JSON
WITH_WHAT_SHE_FINDS = textwrap.dedent("""
    import asyncio, json
    from distributed import Client
    from distributed.core import rpc
    def found(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if "key" in str(k) and "pool" in str(k) and isinstance(v, str):
                    yield v
                yield from found(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from found(v)
    async def call(address, op, **kwargs):
        try:
            async with rpc(address, timeout=20) as r:
                reply = await asyncio.wait_for(getattr(r, op)(**kwargs), 20)
            return json.dumps(reply, default=lambda b: f"<{len(b)} bytes>")[:300]
        except Exception as exc:
            return f"error {type(exc).__name__}: {str(exc)[:200]}"
    async def ident():
        async with rpc(SCHEDULER) as r:
            return await r.identity()
    with Client(SCHEDULER, timeout=30, set_as_default=False) as c:
        seen = [asyncio.run(ident()), c.scheduler_info()]
    keys = sorted(set(found(seen))) or ["no-key-found"]
    fake = [{"index": 0, "uuid": "FAKE", "name": "fake", "total_bytes": 2**50}]
    async def go():
        out = {"keys": len(keys)}
        for i, key in enumerate(keys):
            out[f"register {i}"] = await call(SCHEDULER, "gpu_register_worker", key=key,
                                              worker="tcp://6.6.6.6:1", gpus=fake)
            out[f"fetch by path {i}"] = await call(WORKER, "gpu_offload_fetch", key=key, path=COPY)
            out[f"fetch by lease {i}"] = await call(WORKER, "gpu_offload_fetch", key=key,
                                                    lease=LEASE)
            out[f"ended {i}"] = await call(SCHEDULER, "gpu_session_ended", key=key, lease=LEASE,
                                           worker=WORKER, reason="forged by alice")
            out[f"signal {i}"] = await call(WORKER, "gpu_session_signal", key=key, lease=LEASE,
                                            signal="kill")
        return out
    print(json.dumps(asyncio.run(go())))
    """)


def test_what_a_user_is_shown_opens_no_worker_only_call(team):
    """Before: the key alice read from ``identity`` let her offer a fake GPU (``gpu_register_worker``:
    best-fit sent the next user's cell there, and the fake session's pickled exception ran in his
    kernel), take bob's parked variables (``gpu_offload_fetch``), end his session and forge the
    reason he is shown (``gpu_session_signal``, ``gpu_session_ended``). She uses only what she
    finds (she is told bob's lease and where his standby copy lies, worst case)."""
    lease = lease_of(team, team.bob)
    assert wait_until(lambda: standby_copies(team, lease), 20), "bob's session parked no copy"
    cfg = {
        "SCHEDULER": team.address,
        "WORKER": lease["worker"],
        "LEASE": lease["id"],
        "COPY": standby_copies(team, lease)[0],
    }
    setup = "".join(f"{k} = {v!r}\n" for k, v in cfg.items())
    out = alice_cell(team, setup + WITH_WHAT_SHE_FINDS)
    replies = json.loads(out.strip().splitlines()[-1])
    fetched = [r for what, r in replies.items() if what.startswith("fetch") and '"data":' in r]
    assert not fetched, f"she read bob's copy: {replies}"
    assert not any(g["uuid"] == "FAKE" for g in snapshot(team.address)["gpus"]), replies
    assert not [r for what, r in replies.items() if what.startswith("signal") and '"ok": true' in r]
    leases = {ls["id"]: ls for g in snapshot(team.address)["gpus"] for ls in g["leases"]}
    assert lease["id"] in leases and leases[lease["id"]]["state"] != "ended", replies
    assert psutil.pid_exists(lease["pid"]), replies
    bob_is_fine(team)


def standby_copies(team, lease: dict) -> list[str]:
    """Where this pool's worker keeps ``lease``'s standby copy: its Dask worker's own folder
    (``<lease>``, before issue 20), or its launcher's (``<lease>-<random>``). Another pool on the
    machine may have a lease of that id: its folders are named by other pids."""
    import glob

    found = glob.glob(f"/dev/shm/jupyter-gpu-{worker_pid(lease['worker'])}-*/{lease['id']}/standby")
    for p in psutil.Process(team.services.worker.pid).children():
        if p.uids().effective == 0:  # a root-started worker's launcher
            found += glob.glob(f"/dev/shm/jupyter-gpu-{p.pid}-launcher-*/{lease['id']}-*/standby")
    return found


# ---------------------------------------------------------------------- paths a user owns, ports
def session_folder(team, lease: dict) -> str | None:
    """``lease``'s folder in host memory (its owner's, seen at the same path in its session): the
    Dask worker's ``<base>/<lease>`` before issue 20, the launcher's ``<base>/<lease>-<random>``."""
    import glob

    found = glob.glob(f"/dev/shm/jupyter-gpu-{worker_pid(lease['worker'])}-*/{lease['id']}")
    for p in psutil.Process(team.services.worker.pid).children():
        if p.uids().effective == 0:
            found += glob.glob(f"/dev/shm/jupyter-gpu-{p.pid}-launcher-*/{lease['id']}-*")
    return next((f for f in found if os.path.isdir(f)), None)


# alice's cell: a thread of hers swaps a name in her own session folder between a file of hers and
# a link to bob's standby copy, while she asks the worker for that name (``gpu_offload_fetch``,
# by its name before issue 20, by her lease after) with every pool key she finds, TRIES times or
# for 8 s, four calls at a time; prints the tries, what came back that is not her file (won), and
# how many swaps her thread made. (Before issue 20, only some of a session's threads were in its
# mount namespace, where its folder is: she finds it through one of them.)
SWAP_RACE = WITH_WHAT_SHE_FINDS.split("fake = ")[0] + textwrap.dedent("""
    import os, threading, time
    MINE = b"alice's own bytes"
    here = next(p for p in [FOLDER] + [f"/proc/self/task/{t}/root{FOLDER}"
                                       for t in os.listdir("/proc/self/task")]
                if os.access(p, os.W_OK))
    stop, swaps = threading.Event(), [0]
    def swapper():
        name, f, link = (os.path.join(here, n) for n in ("swapped", "swapped.f", "swapped.l"))
        while not stop.is_set():
            with open(f, "wb") as h:
                h.write(MINE)
            os.rename(f, name)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(BOB_COPY, link)
            os.rename(link, name)
            swaps[0] += 1
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    async def fetch(r, key, how, won, refusals):
        try:
            reply = await asyncio.wait_for(r.gpu_offload_fetch(key=key, **how), 20)
        except Exception as exc:
            refusals.add(f"{type(exc).__name__}: {str(exc)[:120]}")
            return "argument" in str(exc)
        data = reply.get("data") if isinstance(reply, dict) else None
        if data is not None and data != MINE:
            won.append(len(data))
        elif data is None:
            refusals.add(str(reply)[:160])
            return "argument" in str(reply)
        return False
    async def race():
        won, refusals = [], set()
        name = os.path.join(FOLDER, "swapped")
        # the name before issue 20, her lease after: the form this worker takes
        forms = [{"path": name}, {"lease": LEASE}]
        async with rpc(WORKER, timeout=20) as r:
            forms = [how for how in forms if not await fetch(r, keys[0], how, won, refusals)]
        tries, deadline = [0], time.monotonic() + 8
        async def one_caller():
            async with rpc(WORKER, timeout=20) as r:
                while tries[0] < TRIES and time.monotonic() < deadline and len(won) < 3:
                    for key in keys:
                        for how in forms or [{"path": name}]:
                            tries[0] += 1
                            await fetch(r, key, how, won, refusals)
        await asyncio.gather(*(one_caller() for _ in range(4)))
        return {"tries": tries[0], "won": won, "refusals": sorted(refusals)[:4]}
    time.sleep(0.2)
    out = asyncio.run(race())
    out["swaps"] = swaps[0] if thread.is_alive() else f"the swapper stopped after {swaps[0]}"
    stop.set()
    thread.join(5)
    print(json.dumps(out))
""")


def test_a_link_swapped_into_her_own_folder_never_hands_her_another_users_copy(team):
    """Before: ``offload_fetch`` checked a path (``owns``, ``isfile``) and then opened it again as
    root; alice, who owns her session's folder, swapped a link to bob's standby copy in between and
    got his variables (1 in 10 to 1 in 300 tries; with the key ``identity`` showed her). Here she
    races it 3,000 times (8 s at most) with whatever key she finds: no reply may carry anything but
    her own file."""
    alice, bob = lease_of(team, team.alice), lease_of(team, team.bob)
    assert wait_until(lambda: standby_copies(team, bob), 20), "bob's session parked no copy"
    assert wait_until(lambda: session_folder(team, alice), 20), "alice's session has no folder"
    cfg = {
        "SCHEDULER": team.address,
        "WORKER": alice["worker"],
        "LEASE": alice["id"],
        "FOLDER": session_folder(team, alice),
        "BOB_COPY": standby_copies(team, bob)[0],
        "TRIES": 3000,
    }
    setup = "".join(f"{k} = {v!r}\n" for k, v in cfg.items())
    out = json.loads(alice_cell(team, setup + SWAP_RACE).strip().splitlines()[-1])
    print("alice's race:", out)
    assert isinstance(out["swaps"], int) and out["swaps"] > 0, f"she could not race: {out}"
    assert not out["won"], f"she got {len(out['won'])} files not hers (bytes): {out}"
    assert out["tries"] >= 50, out
    bob_is_fine(team)


# bob, a process of his account on the GPU machine, connects to alice's run's rendezvous store on
# the address its ranks use and on every other address of the machine, and on each that answers
# lists the store's keys (torch's own client call) and reads them, and posts a key of his own
STORE_STRANGER = textwrap.dedent("""
    import datetime, json, socket, sys
    import psutil
    import torch.distributed as dist
    cfg = json.loads(sys.argv[1])
    hosts = {cfg["addr"]} | {a.address for addrs in psutil.net_if_addrs().values()
                             for a in addrs if a.family == socket.AF_INET}
    out = {"answered": [], "read": {}, "posted": [], "errors": []}
    for host in sorted(hosts):
        try:
            store = dist.TCPStore(host, cfg["port"], is_master=False,
                                  timeout=datetime.timedelta(seconds=3))
        except Exception as exc:
            out["errors"].append(f"{host}: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        out["answered"].append(host)
        try:
            for key in store.list_keys():
                out["read"][f"{host} {key}"] = store.get(key).decode(errors="replace")[:80]
        except Exception as exc:
            out["errors"].append(f"{host} list/get: {type(exc).__name__}: {str(exc)[:100]}")
        try:
            store.set("bob/rank", "6.6.6.6:1")
            out["posted"].append(host)
        except Exception as exc:
            out["errors"].append(f"{host} set: {type(exc).__name__}: {str(exc)[:100]}")
    print(json.dumps(out))
""")
# alice's run: rank 0 leaves where its store listens in her home, then both ranks wait until the
# test says the stranger is done
HELD_RUN = textwrap.dedent("""
    %%gpu --workers 2
    import json, os, pwd, time
    import torch.distributed as dist
    home = pwd.getpwuid(os.getuid()).pw_dir
    if os.environ["RANK"] == "0":
        with open(os.path.join(home, "store.tmp"), "w") as f:
            addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            json.dump({"addr": addr, "port": port}, f)
        os.rename(os.path.join(home, "store.tmp"), os.path.join(home, "store.json"))
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(home, "store.done")) and time.monotonic() < deadline:
            time.sleep(0.1)
    dist.barrier()
    print("run done", flush=True)
""")


def test_a_runs_rendezvous_store_is_reachable_and_readable_by_its_ranks_only(team):
    """Before: rank 0's rendezvous store (torch's ``TCPStore``) listened on every interface, and
    anyone who connected read where the ranks listen and could post a rank of their own (and even
    on the ranks' address only, torch's store serves ``list_keys()`` to any client). Here bob
    tries it while alice's ``--workers 2`` run holds its store: he may reach it on no address but
    the one its ranks use, and read or post no key of the run there."""
    import subprocess
    import sys
    import threading

    home = team.users[ALICE].pw_dir
    ran: dict = {}
    run = threading.Thread(target=lambda: ran.update(res=team.alice.run(HELD_RUN, timeout=300)))
    run.start()
    try:
        assert wait_until(lambda: os.path.exists(f"{home}/store.json"), 240), ran
        store = json.loads(open(f"{home}/store.json").read())
        bob = team.users[BOB]
        proc = subprocess.run(
            [sys.executable, "-c", STORE_STRANGER, json.dumps(store)],
            user=bob.pw_uid,
            group=bob.pw_gid,
            extra_groups=[],
            cwd=bob.pw_dir,
            env={"HOME": bob.pw_dir, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        open(f"{home}/store.done", "w").close()
        run.join(300)
        for name in ("store.json", "store.done"):
            if os.path.exists(f"{home}/{name}"):
                os.unlink(f"{home}/{name}")
    res = ran["res"]
    assert res.error is None and "run done" in res.stdout, res.error_text
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print("bob at the store:", out)
    assert set(out["answered"]) <= {store["addr"]}, f"the store answers elsewhere too: {out}"
    assert not out["read"], f"bob read the run's keys: {out}"
    assert not out["posted"], f"bob posted a key in the run's store: {out}"
    bob_is_fine(team)
