"""The audit store (SQLite, across scheduler restarts), tokens, and the `token create` / `usage`
commands."""

import json
import os
import time

import pytest

from jupyter_gpu.broker.audit import AuditStore
from jupyter_gpu.broker.identity import TokenStore
from jupyter_gpu.cli import main


def lease(id, user, team, fraction, started):
    return {
        "id": id,
        "request": "R1",
        "user": user,
        "team": team,
        "kernel": "k",
        "notebook": "a.ipynb",
        "worker": "w",
        "gpus": ["w#0"],
        "fraction": fraction,
        "bytes": 1,
        "priority": "interactive",
        "started": started,
    }


def test_leases_preemptions_refusals_and_usage_survive_a_restart(tmp_path):
    path = str(tmp_path / "audit.sqlite")
    first = AuditStore(path)
    first.open_boot(now=0.0)
    first.lease_started(lease("L1", "alice", "ml", 0.5, 0.0), preemptible=False)
    first.lease_started(lease("L2", "bob", "ml", 1.0, 0.0), preemptible=True)
    first.lease_ended("L1", 7200.0, "released by its owner", peak_bytes=123)
    first.preempted(
        lease("L2", "bob", "ml", 1.0, 0.0),
        {"id": "R9", "user": "carol", "team": "viz"},
        "reclaimed",
    )
    first.refused(None, "mallory", None, {"fraction": 0.5}, "wrong token")
    first.heartbeat(now=3600.0)
    first.close()  # the scheduler dies with L2 still open
    second = AuditStore(path)
    assert second.open_boot(now=9000.0) == 1  # L2 closed at the dead scheduler's last heartbeat
    # ids restart: no clash
    second.lease_started(lease("L1", "carol", "viz", 0.25, 9000.0), preemptible=False)
    rows = {(r["user"], r["id"]): r for r in second.rows("leases")}
    assert rows[("alice", "L1")]["gpu_seconds"] == pytest.approx(3600.0)
    assert (
        rows[("alice", "L1")]["peak_bytes"] == 123
        and rows[("alice", "L1")]["end_reason"] == "released by its owner"
    )
    assert (
        rows[("bob", "L2")]["end_reason"] == "the scheduler stopped"
        and rows[("bob", "L2")]["ended"] == 3600.0
    )
    assert rows[("bob", "L2")]["preemptible"] == 1
    assert second.rows("preemptions")[0]["for_user"] == "carol"
    assert second.rows("refused")[0]["user"] == "mallory"
    usage = second.usage(since=0.0, now=9000.0 + 3600.0)
    by_user = {u["user"]: u["gpu_hours"] for u in usage["users"]}
    assert by_user == {
        "alice": pytest.approx(1.0),
        "bob": pytest.approx(1.0),
        "carol": pytest.approx(0.25),
    }
    by_team = {t["team"]: t["gpu_hours"] for t in usage["teams"]}
    assert by_team == {"ml": pytest.approx(2.0), "viz": pytest.approx(0.25)}
    assert usage["preemptions"] == 1 and usage["refused"] == 1
    # --since counts only the part of a lease after it
    assert {u["user"]: u["gpu_hours"] for u in second.usage(since=3600.0, now=9000.0)["users"]}[
        "alice"
    ] == pytest.approx(0.5)
    second.close()


def test_tokens_are_stored_hashed_and_checked(tmp_path):
    path = str(tmp_path / "tokens.json")
    store = TokenStore(path)
    token = store.create("alice")
    assert token not in open(path).read() and oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert store.check("alice", token) is None
    assert "is wrong" in store.check("alice", token + "x")
    assert "none was sent" in store.check("alice", None)
    assert "does not know the user 'bob'" in store.check("bob", token)
    assert TokenStore(path).check("alice", token) is None  # another process reads the same file
    newer = store.create("alice")  # a new token replaces the old one
    assert store.check("alice", token) is not None and store.check("alice", newer) is None


def test_cli_token_create_and_usage(tmp_path, capsys):
    tokens = str(tmp_path / "t.json")
    assert main(["token", "create", "dave", "--file", tokens]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenStore(tokens).check("dave", token) is None
    assert json.load(open(tokens))["users"]["dave"]["hash"]
    db = str(tmp_path / "a.sqlite")
    store = AuditStore(db)
    store.open_boot(now=0.0)
    store.lease_started(lease("L1", "dave", "ml", 0.5, 1.0), preemptible=False)
    store.lease_ended("L1", 7201.0, "done", None)
    store.close()
    assert main(["usage", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "dave" in out and "1.000" in out and "ml" in out
    assert main(["usage", "--db", db, "--since", "not a time"]) == 2


def test_usage_counts_oversized_leases_per_user(tmp_path):
    from jupyter_gpu.broker.audit import format_usage

    store = AuditStore(str(tmp_path / "audit.sqlite"))
    store.open_boot(now=0.0)
    for lid, peak in (("L1", 100 << 20), ("L2", 6 << 30), ("L3", None)):
        store.lease_started(
            {**lease(lid, "alice", "ml", 0.5, 0.0), "bytes": 8 << 30}, preemptible=False
        )
        store.lease_ended(lid, 60.0, "released by its owner", peak_bytes=peak)
    usage = store.usage(since=0.0, now=120.0)
    alice = usage["users"][0]
    assert (alice["leases"], alice["measured"], alice["oversized"]) == (3, 2, 1)
    assert "1/2" in format_usage(usage).splitlines()[-4]
    store.close()


def test_usage_without_since_starts_at_the_first_lease_recorded(tmp_path):
    """``jupyter-gpu usage`` said "GPU-hours from 1970-01-01": no ``--since`` meant since the epoch."""
    from jupyter_gpu.broker.audit import format_usage

    store = AuditStore(str(tmp_path / "audit.sqlite"))
    try:
        assert "no lease has been recorded yet" in format_usage(store.usage(now=100.0))
        store.open_boot(now=0.0)
        started = time.mktime((2026, 3, 14, 9, 30, 0, 0, 0, -1))
        store.lease_started(lease("L1", "erin", "ml", 0.5, started), preemptible=False)
        store.lease_ended("L1", started + 3600, "done", None)
        head = format_usage(store.usage(now=started + 7200)).splitlines()[0]
        assert head.startswith("GPU-hours from the first lease recorded (2026-03-14 09:30) to"), (
            head
        )
        assert "1970" not in head
        since = format_usage(store.usage(since=started - 60, now=started + 7200)).splitlines()[0]
        assert since.startswith("GPU-hours from 2026-03-14 09:29 to"), since
    finally:
        store.close()
