"""Two data scientists on one pool: alice tries, from her kernel and from her %%gpu cells,
everything that used to work against bob; none of it does, and bob's variables, session and leases
are untouched.

Real parts only: the accounts are real (``useradd``), the pool is ``jupyter-gpu pool up`` +
``jupyter-gpu worker`` run as root with a token file, each kernel runs as its user's account with
that user's token. The attacks are the ones the isolation issue lists (and a few more); each test
says which.
"""

from __future__ import annotations

import json
import os
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

ALICE, BOB, NOBODY = f"{PREFIX}alice", f"{PREFIX}bob", f"{PREFIX}ghost"


@pytest.fixture(scope="module", params=["tokens", "hub"])
def team(request):
    """The team, its pool checking identities with its token file or with JupyterHub's tokens."""
    with team_pool((ALICE, BOB), identity=request.param) as t:
        bob = t.kernel(BOB)
        res = bob.run(
            "%%gpu\nimport numpy as np\nsecret_weights = np.arange(5) * 7\nprint('bob ready')"
        )
        assert res.error is None and "bob ready" in res.stdout, res.error_text
        t.bob = bob
        t.alice = t.kernel(ALICE)
        res = t.alice.run("%%gpu\nprint('alice ready')")
        assert res.error is None, res.error_text
        yield t


def bobs_lease(team) -> dict:
    """Bob's lease as the broker tells bob (the test knows what an attacker may not)."""
    res = team.bob.run(
        "import json\n_c = get_ipython().find_magic('gpu').__self__.conn\n"
        "print(json.dumps(_c.session.lease))"
    )
    return json.loads(res.stdout)


def bob_is_fine(team) -> None:
    res = team.bob.run("%%gpu\nprint(int(secret_weights.sum()))")
    assert res.error is None and res.stdout.strip() == "70", (res.stdout, res.error_text)


def alice_cell(team, code: str) -> str:
    res = team.alice.run("%%gpu\n" + code, timeout=120)
    assert res.error is None, res.error_text
    return res.stdout


def test_sessions_run_as_their_users_with_private_tmp_and_shm(team):
    out = alice_cell(
        team,
        "import os, pwd, tempfile\n"
        "print(pwd.getpwuid(os.getuid()).pw_name, oct(os.umask(0o077)))\n"
        "open('/tmp/alice-was-here', 'w').write('x'); open('/dev/shm/alice-shm', 'w').write('x')\n"
        "print(sorted(os.listdir('/dev/shm')))",
    )
    name, umask, listing = out.split(None, 2)
    assert name == ALICE and umask == "0o77"
    # no other session's folder is visible
    assert "jupyter-gpu" not in listing or "alice-shm" in listing
    bob = team.bob.run(
        "%%gpu\nimport os\nprint(os.path.exists('/tmp/alice-was-here'), "
        "os.path.exists('/dev/shm/alice-shm'), os.getuid())"
    )
    seen_tmp, seen_shm, uid = bob.stdout.split()
    assert seen_tmp == "False" and seen_shm == "False" and int(uid) == team.users[BOB].pw_uid
    lease = bobs_lease(team)
    assert lease["containment"].startswith("cgroup")
    snap = snapshot(team.address)
    assert snap["pool"]["users_isolated"] is True


def test_alice_cannot_read_or_signal_bobs_session_process(team):
    pid = bobs_lease(team)["pid"]
    out = alice_cell(
        team,
        textwrap.dedent(f"""
        import os, signal
        for what in ('mem', 'environ', 'cmdline', 'maps'):
            try:
                open('/proc/{pid}/' + what, 'rb').read(64); print(what, 'READ')
            except OSError as exc:
                print(what, type(exc).__name__)
        try:
            os.kill({pid}, signal.SIGKILL); print('kill WORKED')
        except OSError as exc:
            print('kill', type(exc).__name__)
        """),
    )
    assert "READ" not in out.replace("cmdline READ", "") and "kill PermissionError" in out, out
    bob_is_fine(team)


def test_session_addresses_are_private_and_a_session_answers_only_its_owner(team):
    lease = bobs_lease(team)
    snap = snapshot(team.address)
    seen = [ls for g in snap["gpus"] for ls in g["leases"]]
    assert seen and all(
        "address" not in ls and "pid" not in ls and "secret" not in ls for ls in seen
    )
    # alice is given bob's address anyway (worst case): without the secret, nothing runs there
    out = alice_cell(
        team,
        textwrap.dedent(f"""
        import asyncio
        from distributed.core import rpc
        async def go():
            async with rpc({lease["address"]!r}) as r:
                for call in (r.pull(name='secret_weights'), r.execute(code='secret_weights[:] = 0', inputs={{}}),
                             r.ping(), r.pull(name='secret_weights', secret='guess'),
                             r.interrupt(), r.offload(path='/tmp/x')):
                    try:
                        reply = await call
                    except Exception as exc:
                        reply = repr(exc)
                    print(str(reply)[:120])
        asyncio.run(go())
        """),
    )
    assert out.count("answers only the kernel that holds its lease") >= 5, out
    assert "data" not in out
    # the broker does not tell alice about bob's request or lease either
    res = team.alice.run(
        "_c = get_ipython().find_magic('gpu').__self__.conn\n"
        "def _try(op, **kw):\n"
        "    try:\n"
        "        print(_c.scheduler_call(op, **kw))\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, exc)\n"
        f"_try('gpu_lease_info', lease={lease['id']!r}, user={ALICE!r})\n"
        f"_try('gpu_wait', id={lease['request']!r}, timeout=0, user={ALICE!r})"
    )
    assert res.stdout.count("belongs to another user") == 2 and lease["secret"] not in res.stdout, (
        res.stdout
    )
    bob_is_fine(team)


def test_alice_cannot_reach_bobs_host_memory_copy(team):
    lease = bobs_lease(team)
    worker = worker_pid(lease["worker"])  # its folder, not another pool's with a lease of that id
    launchers = [  # a root-started worker's sessions are its launcher's
        p.pid
        for p in psutil.Process(team.services.worker.pid).children()
        if p.uids().effective == 0
    ]
    assert wait_until(lambda: _standby_files(lease["id"], worker, launchers), 20), (
        "bob's idle session wrote no standby copy"
    )
    path = _standby_files(lease["id"], worker, launchers)[0]
    st = os.stat(path)
    assert st.st_uid == team.users[BOB].pw_uid and st.st_mode & 0o077 == 0
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0
    for where in ("cell", "kernel"):
        code = (
            f"import os\ntry:\n    open({path!r}, 'rb').read(8); print('READ')\nexcept OSError as "
            "exc:\n"
            "    print(type(exc).__name__)"
        )
        out = alice_cell(team, code) if where == "cell" else team.alice.run(code).stdout
        assert "READ" not in out, (where, out)
    bob_is_fine(team)


def _standby_files(lease: str, worker: int, launchers: list[int]) -> list[str]:
    import glob

    # this pool's only: a worker's own folder (``<lease>``), or its launcher's (``<lease>-<random>``)
    found = glob.glob(f"/dev/shm/jupyter-gpu-{worker}-*/{lease}/standby")
    for launcher in launchers:
        found += glob.glob(f"/dev/shm/jupyter-gpu-{launcher}-launcher-*/{lease}-*/standby")
    return found


def test_pool_secrets_are_off_limits(team):
    identities = "hub.token" if team.hub is not None else "tokens.json"
    for name in (identities, "pool.yaml", "audit.sqlite"):
        path = team.secrets / name
        assert os.stat(path).st_mode & 0o077 == 0, (name, oct(os.stat(path).st_mode))
        code = (
            f"try:\n    open({str(path)!r}).read(1); print('READ')\nexcept OSError as exc:\n"
            "    print(type(exc).__name__)"
        )
        # in her cell the folder is not even there (a private /tmp); in her kernel it is there, and
        # closed
        assert alice_cell(team, code).strip() in ("PermissionError", "FileNotFoundError")
        assert "PermissionError" in team.alice.run(code).stdout
    key = team.services.pool_key_path()  # the service account's, where pool up made it
    assert os.stat(key).st_mode & 0o077 == 0
    res = team.alice.run(
        f"try:\n    open({key!r}).read(1); print('READ')\nexcept OSError as exc:\n"
        "    print(type(exc).__name__)"
    )
    assert "PermissionError" in res.stdout


DASK_ATTACKS = textwrap.dedent("""
    import os
    from distributed import Client
    def state(c):  # the whole scheduler state (every user's work): refused, or it would be a dict of it
        reply = c.sync(c.scheduler.get_cluster_state, exclude=[])
        if reply.get('status') == 'error':
            raise PermissionError(reply.get('exception_text'))
        return reply
    c = Client({address!r}, timeout=20, set_as_default=False)
    for name, call in [('run_on_scheduler', lambda: c.run_on_scheduler(os.getpid)),
                       ('run on workers', lambda: c.run(os.getpid)),
                       ('submit', lambda: c.submit(os.getpid, pure=False).result(timeout=20)),
                       ('register plugin', lambda: c.register_plugin(object())),
                       ('scheduler state', lambda: state(c))]:
        try:
            call(); print(name, 'WORKED')
        except Exception as exc:
            print(name, 'refused:', type(exc).__name__, str(exc)[:80])
    c.close()
    """)


def test_dasks_generic_api_is_refused_from_a_kernel_and_from_a_cell(team):
    for where in ("kernel", "cell"):
        code = DASK_ATTACKS.format(address=team.address)
        out = (
            alice_cell(team, code) if where == "cell" else team.alice.run(code, timeout=180).stdout
        )
        assert "WORKED" not in out and out.count("refused") == 5, (where, out)
    bob_is_fine(team)


WORKER_ATTACKS = textwrap.dedent("""
    import asyncio, os
    from distributed.core import rpc
    def show(reply):
        if isinstance(reply, dict):
            return reply.get('exception_text') or reply.get('error') or str(reply)[:90]
        return str(reply)[:90]
    async def go():
        async with rpc({scheduler!r}) as s:
            for call in (s.gpu_register_worker(worker='tcp://6.6.6.6:1', gpus=[{{'index': 0, 'uuid': 'FAKE',
                             'name': 'fake', 'total_bytes': 2**50}}]),
                         s.gpu_session_ended(lease={lease!r}, reason='forged by alice')):
                try:
                    print(show(await call))
                except Exception as exc:
                    print('refused:', repr(exc)[:200])
            # forged notes: refused too (the snapshot below shows they changed nothing)
            for call in (s.gpu_lease_state(lease={lease!r}, state='running', peak_bytes=10**13),
                         s.gpu_run_update(run='r', world_size='many'),
                         s.gpu_run_metrics(run='r', rank=0, items=[])):
                try:
                    await call
                except Exception:
                    pass
        async with rpc({worker!r}) as w:
            for call in (w.gpu_session_signal(lease={lease!r}, signal='kill'),
                         w.gpu_session_offload(lease={lease!r}), w.gpu_offload_fetch(lease={lease!r}),
                         w.run(function=b''), getattr(w, 'plugin-add')(plugin=b''), w.get_data(keys=[])):
                try:
                    print(show(await call))
                except Exception as exc:
                    print('refused:', repr(exc)[:200])
    asyncio.run(go())
    """)


def test_handlers_meant_for_workers_and_the_broker_refuse_alice(team):
    lease = bobs_lease(team)
    out = alice_cell(
        team,
        WORKER_ATTACKS.format(scheduler=team.address, worker=lease["worker"], lease=lease["id"]),
    )
    assert out.count("only the pool's workers may call this") == 2, out
    assert out.count("only the pool's broker may call this") == 3, out
    assert out.count("not available on a jupyter-gpu worker") == 3, out
    # the snapshot works for everyone, and shows no fake GPU or forged peak
    snap = snapshot(team.address)
    assert all(g["uuid"] != "FAKE" for g in snap["gpus"])
    mine = next(ls for g in snap["gpus"] for ls in g["leases"] if ls["id"] == lease["id"])
    assert mine["state"] != "ended" and (mine["peak_bytes"] or 0) < 10**12
    bob_is_fine(team)


def test_a_user_without_an_account_is_refused_at_once_naming_the_fix(team):
    from jupyter_gpu.headless.kernel import GpuKernel

    token = team.new_token(NOBODY)

    k = GpuKernel(
        team.address, user=NOBODY, account=ALICE, env={"JUPYTER_GPU_TOKEN": token}
    ).start()
    team.kernels.append(k)
    res = k.run("%%gpu\nprint('should not run')", timeout=120)
    assert res.error is not None and "should not run" not in res.stdout
    assert "has no account" in res.error_text and f"useradd {NOBODY}" in res.error_text, (
        res.error_text
    )


def test_without_root_the_pool_works_and_says_users_are_not_isolated():
    """A worker that does not run as root cannot give sessions their users' accounts: the pool still
    works, and ``%gpu status`` (and the snapshot the panel and ``jupyter-gpu status`` read) say
    plainly that users are not isolated from each other."""
    # not alice: the module's team holds her account
    service, carol = f"{PREFIX}svc", f"{PREFIX}carol"
    with team_pool((carol, service), worker_account=service) as t:
        alice = t.kernel(carol)
        res = alice.run("%%gpu\nimport os, pwd\nprint(pwd.getpwuid(os.getuid()).pw_name)")
        assert res.error is None and res.stdout.strip() == service, (res.stdout, res.error_text)
        assert snapshot(t.address)["pool"]["users_isolated"] is False
        status = "".join(alice.run("%gpu status").data())
        assert "Users are NOT isolated from each other" in status, status
