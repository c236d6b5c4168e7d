"""The broker trusts JupyterHub, and only as far as the Hub says: a revoked token is refused once its
cached answer is old, a user removed from a Hub group loses that group's quota at the next refresh,
and with the Hub down running cells finish while new requests say why.

The kernels here run as the users' accounts with what a Hub-started kernel has (``JUPYTERHUB_USER``
and ``JUPYTERHUB_API_TOKEN``: a token the Hub made for the user, as its token page does) and the
pool's address; nothing of the pool's own user or token variables.
"""

from __future__ import annotations

import time

import pytest

from jupyter_gpu.headless.kernel import GpuKernel
from tests.support.harness import wait_until
from tests.system.hub.conftest import ALICE, BOB, CACHE_S, GROUP

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


def hub_kernel(hubpool, user: str, token: str) -> GpuKernel:
    return GpuKernel(
        hubpool.address,
        account=user,
        env={"JUPYTERHUB_USER": user, "JUPYTERHUB_API_TOKEN": token},
        cwd=f"/home/{user}",
    ).start()


def test_a_revoked_hub_token_is_refused_once_its_cached_answer_is_old(hubpool):
    token, token_id = hubpool.hub.user_token(BOB)
    kernel = hub_kernel(hubpool, BOB, token)
    try:
        res = kernel.run("%%gpu --fresh\nprint('accepted')")
        assert res.error is None and "accepted" in res.stdout, res.error_text
        hubpool.hub.revoke(BOB, token_id)
        revoked = time.monotonic()
        refused = None
        while refused is None and time.monotonic() - revoked < CACHE_S + 120:
            res = kernel.run("%%gpu --fresh\nprint('still accepted')")
            if res.error is not None:
                refused = res
        waited = time.monotonic() - revoked
        assert refused is not None, "a revoked token was still accepted"
        assert "revoked" in refused.error_text and "RequestRefused" in refused.error_text
        print(f"refused {waited:.1f} s after the revocation (cache time {CACHE_S} s)")
        # nothing of bob's is left on a GPU
        assert not hubpool.leases_of(BOB)
    finally:
        kernel.shutdown(now=True)


def test_a_user_removed_from_a_hub_group_loses_its_teams_quota_at_the_next_refresh(hubpool):
    token, _ = hubpool.hub.user_token(BOB)
    kernel = hub_kernel(hubpool, BOB, token)

    def team_of_bobs_lease() -> str:
        res = kernel.run("%gpu release\n")
        assert res.error is None, res.error_text
        res = kernel.run("%%gpu\nx = 1")
        assert res.error is None, res.error_text
        (lease,) = hubpool.leases_of(BOB)
        return lease["team"]

    def members() -> list[str]:
        teams = hubpool.snapshot()["quotas"]["teams"]
        return next(t["members"] for t in teams if t["team"] == "ml")

    try:
        assert wait_until(lambda: BOB in members(), 60), "bob is not in team ml (group jghml)"
        assert team_of_bobs_lease() == "ml"
        quota = kernel.run("%gpu status")
        assert "team ml" in quota.text, quota.text
        hubpool.hub.set_group(GROUP, [ALICE])
        assert wait_until(lambda: BOB not in members(), 60), "bob still in team ml"
        assert team_of_bobs_lease() == "default"
    finally:
        hubpool.hub.set_group(GROUP, [ALICE, BOB])
        kernel.shutdown(now=True)


def test_with_the_hub_down_running_cells_finish_and_new_requests_say_why(hubpool):
    token, _ = hubpool.hub.user_token(BOB)
    kernel = hub_kernel(hubpool, BOB, token)
    try:
        res = kernel.run("%%gpu\nprint('ready')")
        assert res.error is None, res.error_text
        running = kernel.submit(
            "%%gpu\nimport time\nprint('started', flush=True)\n"
            "for i in range(4):\n    time.sleep(2)\nprint('finished', i)"
        )
        kernel.wait_for_output(running, "started", timeout=120)
        hubpool.hub.stop(kill=True)  # the Hub crashes: its proxy and servers stay
        done = kernel.collect(running, timeout=120)
        assert done.error is None and "finished 3" in done.stdout, done.error_text
        # the same session keeps working: it needs no new grant
        res = kernel.run("%%gpu\nprint('still here')")
        assert res.error is None and "still here" in res.stdout, res.error_text
        time.sleep(CACHE_S + 1)  # the Hub's last answer about this token is too old now
        res = kernel.run("%%gpu --fresh\nprint('a new session')")
        assert res.error is not None
        assert "did not answer" in res.error_text and "Hub" in res.error_text, res.error_text
    finally:
        kernel.shutdown(now=True)
        if hubpool.hub.proc is None or hubpool.hub.proc.poll() is not None:
            hubpool.hub.start()


def test_an_admin_sees_and_cancels_everyones_work_others_only_their_own(hubpool):
    from tests.system.hub.conftest import ADMIN

    alice = hub_kernel(hubpool, ALICE, hubpool.hub.user_token(ALICE)[0])
    bob = hub_kernel(hubpool, BOB, hubpool.hub.user_token(BOB)[0])
    admin = hub_kernel(hubpool, ADMIN, hubpool.hub.user_token(ADMIN)[0])
    try:
        res = alice.run("%%gpu\nx = 1")
        assert res.error is None, res.error_text
        (lease,) = hubpool.leases_of(ALICE)
        # bob sees who holds what (the pool-wide view), not a list of others' work to cancel
        status = bob.run("%gpu status").text
        assert ALICE in status and "Everyone else's work" not in status
        res = bob.run(f"%gpu cancel {lease['id']}")
        assert "you can cancel only your own work" in res.text + res.error_text
        assert hubpool.leases_of(ALICE)
        # the Hub's admin: everyone's work, and a cancel that works
        status = admin.run("%gpu status").text
        assert "Everyone else's work" in status and lease["id"] in status, status
        res = admin.run(f"%gpu cancel {lease['id']}")
        assert res.error is None, res.error_text
        assert wait_until(lambda: not hubpool.leases_of(ALICE), 30)
        res = alice.run("%%gpu\nprint(x)")
        assert f"cancelled by {ADMIN}, an administrator of the pool" in res.error_text + res.text
    finally:
        for kernel in (alice, bob, admin):
            kernel.shutdown(now=True)
