"""The pool's audit store: every lease, preemption and refused request, in SQLite.

Why SQLite: one file next to the scheduler, no server, atomic writes, and it outlives the scheduler,
so ``jupyter-gpu usage`` reports GPU-hours across restarts. The path is Dask config
``jupyter-gpu.audit-db``; without one the store lives in memory (usage for the life of the pool
only).

Lease ids restart with the scheduler, so every row also carries the scheduler's ``boot`` id; leases
a dead scheduler left open are closed at the next start ("the scheduler stopped"), at its last
heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import uuid
from typing import Any

from jupyter_gpu.common.protocol import LeaseView, TeamUsage, UsageReport, UserUsage
from jupyter_gpu.common.rightsizing import MIN_RESERVED_FOR_HINT, OVERSIZED_BELOW

log = logging.getLogger(__name__)
MAX_SPEC = 2048  # characters of a refused request (and its reason) kept in the store

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    boot TEXT NOT NULL, id TEXT NOT NULL, request TEXT, user TEXT NOT NULL, team TEXT, kernel TEXT,
    notebook TEXT, worker TEXT, gpus TEXT, fraction REAL NOT NULL, bytes INTEGER, priority TEXT,
    preemptible INTEGER NOT NULL DEFAULT 0, started REAL NOT NULL, ended REAL, gpu_seconds REAL,
    peak_bytes INTEGER, end_reason TEXT, PRIMARY KEY (boot, id));
CREATE INDEX IF NOT EXISTS leases_started ON leases (started);
CREATE TABLE IF NOT EXISTS preemptions (
    boot TEXT NOT NULL, time REAL NOT NULL, lease TEXT NOT NULL, user TEXT, team TEXT, for_request TEXT,
    for_user TEXT, for_team TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS refused (
    boot TEXT NOT NULL, time REAL NOT NULL, request TEXT, user TEXT, team TEXT, spec TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS boots (boot TEXT PRIMARY KEY, started REAL NOT NULL, heartbeat REAL NOT NULL);
"""


class AuditStore:
    """Writes the pool's history; reads it back as usage per user and team."""

    def __init__(self, path: str | None = None):
        self.path = os.path.expanduser(path) if path else ":memory:"
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
            # the pool's history is the pool's: created readable and writable by its account only
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        old = os.umask(0o077)  # and the WAL and shared-memory files SQLite makes beside it
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            if self.path != ":memory:":
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        finally:
            os.umask(old)
        self.boot = uuid.uuid4().hex[:12]

    # ------------------------------------------------------------------ writing (the broker)
    def open_boot(self, now: float | None = None) -> int:
        """Start this scheduler's boot; close leases earlier boots left open. Returns how many were
        closed."""
        now = time.time() if now is None else now
        closed = 0
        for boot, heartbeat in self.db.execute("SELECT boot, heartbeat FROM boots").fetchall():
            cur = self.db.execute(
                "UPDATE leases SET ended = MAX(started, ?), gpu_seconds = fraction * MAX(0, ? - "
                "started), "
                "end_reason = 'the scheduler stopped' WHERE boot = ? AND ended IS NULL",
                (heartbeat, heartbeat, boot),
            )
            closed += cur.rowcount
        self.db.execute("INSERT INTO boots VALUES (?, ?, ?)", (self.boot, now, now))
        if closed:
            log.info("audit: closed %d lease(s) left open by an earlier scheduler", closed)
        return closed

    def heartbeat(self, now: float | None = None) -> None:
        self.db.execute(
            "UPDATE boots SET heartbeat = ? WHERE boot = ?",
            (time.time() if now is None else now, self.boot),
        )

    def lease_started(self, lease: LeaseView, preemptible: bool) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO leases (boot, id, request, user, team, kernel, notebook, "
            "worker, gpus, fraction,"
            " bytes, priority, preemptible, started) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                self.boot,
                lease["id"],
                lease.get("request"),
                lease["user"],
                lease.get("team"),
                lease.get("kernel"),
                lease.get("notebook"),
                lease.get("worker"),
                json.dumps(lease.get("gpus") or []),
                float(lease["fraction"]),
                lease.get("bytes"),
                lease.get("priority"),
                int(preemptible),
                float(lease["started"]),
            ),
        )

    def lease_ended(
        self, lease_id: str, ended: float | None, reason: str, peak_bytes: int | None
    ) -> None:
        self.db.execute(
            "UPDATE leases SET ended = ?, gpu_seconds = fraction * MAX(0, ? - started), end_reason "
            "= ?, "
            "peak_bytes = ? WHERE boot = ? AND id = ?",
            (ended, ended, reason, peak_bytes, self.boot, lease_id),
        )

    def preempted(
        self, lease: LeaseView, request: dict[str, Any], reason: str, now: float | None = None
    ) -> None:
        self.db.execute(
            "INSERT INTO preemptions VALUES (?,?,?,?,?,?,?,?,?)",
            (
                self.boot,
                time.time() if now is None else now,
                lease["id"],
                lease.get("user"),
                lease.get("team"),
                request.get("id"),
                request.get("user"),
                request.get("team"),
                reason,
            ),
        )

    def refused(
        self,
        request: str | None,
        user: str | None,
        team: str | None,
        spec: Any,
        reason: str,
        now: float | None = None,
    ) -> None:
        self.db.execute(
            "INSERT INTO refused VALUES (?,?,?,?,?,?,?)",
            (
                self.boot,
                time.time() if now is None else now,
                request,
                user,
                team,
                json.dumps(spec, default=str)[:MAX_SPEC],  # what a caller sent: bounded
                reason[:MAX_SPEC],
            ),
        )

    # ------------------------------------------------------------------ reading (CLI, handler)
    def usage(self, since: float = 0.0, now: float | None = None) -> UsageReport:
        """GPU-hours per user and per team from ``since`` (open leases counted up to now)."""
        now = time.time() if now is None else now
        rows = self.db.execute(
            "SELECT user, COALESCE(team, ''), SUM(fraction * MAX(0, MIN(COALESCE(ended, ?), ?) - "
            "MAX(started, ?)))"
            " / 3600.0, COUNT(*) FROM leases WHERE COALESCE(ended, ?) >= ? GROUP BY user, team "
            "ORDER BY user",
            (now, now, since, now, since),
        ).fetchall()
        users: list[UserUsage] = [
            {"user": u, "team": t or None, "gpu_hours": round(h or 0.0, 6), "leases": n}
            for u, t, h, n in rows
        ]
        # right-sizing: how many of each user's measured leases used under a quarter of what they
        # reserved
        sized = self.db.execute(
            "SELECT user, COUNT(*), SUM(CASE WHEN peak_bytes < ? * bytes AND bytes >= ? THEN 1 "
            "ELSE 0 END) "
            "FROM leases WHERE peak_bytes IS NOT NULL AND COALESCE(ended, ?) >= ? GROUP BY user",
            (OVERSIZED_BELOW, MIN_RESERVED_FOR_HINT, now, since),
        ).fetchall()
        by_user = {u: (n, over) for u, n, over in sized}
        for row in users:
            measured, oversized = by_user.get(row["user"], (0, 0))
            row["measured"], row["oversized"] = measured, oversized
        teams: dict[str, TeamUsage] = {}
        for row in users:
            team = teams.setdefault(
                row["team"] or "-", {"team": row["team"] or "-", "gpu_hours": 0.0, "leases": 0}
            )
            team["gpu_hours"] += row["gpu_hours"]
            team["leases"] += row["leases"]
        preemptions = self.db.execute(
            "SELECT COUNT(*) FROM preemptions WHERE time >= ?", (since,)
        ).fetchone()[0]
        refused = self.db.execute(
            "SELECT COUNT(*) FROM refused WHERE time >= ?", (since,)
        ).fetchone()[0]
        first = self.db.execute("SELECT MIN(started) FROM leases").fetchone()[0]
        return {
            "since": since,
            "until": now,
            "first": first,  # the first lease recorded (None: none yet)
            "users": users,
            "teams": sorted(teams.values(), key=lambda t: t["team"]),
            "preemptions": preemptions,
            "refused": refused,
        }

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of ``table`` as dicts (tests, exports)."""
        if table not in ("leases", "preemptions", "refused", "boots"):
            raise ValueError(f"no table {table}")
        cur = self.db.execute(f"SELECT * FROM {table}")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def close(self) -> None:
        self.db.close()


def audit_from_config() -> AuditStore:
    """The store at Dask config ``jupyter-gpu.audit-db`` (in memory when unset)."""
    from jupyter_gpu.common import config

    return AuditStore(config.get("audit-db"))


def _oversized(user: UserUsage) -> str:
    return f"{user['oversized']}/{user['measured']}" if user.get("measured") else "-"


def _period(usage: UsageReport) -> str:
    """``GPU-hours from ... to ...``: the period asked for, or from the first lease recorded."""

    def when(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))

    until = when(usage["until"])
    first = usage.get("first")
    if usage["since"] > 0:
        return f"GPU-hours from {when(usage['since'])} to {until}"
    if first is None:
        return f"GPU-hours to {until}: no lease has been recorded yet"
    return f"GPU-hours from the first lease recorded ({when(first)}) to {until}"


def format_usage(usage: UsageReport) -> str:
    """``jupyter-gpu usage`` output: GPU-hours per team, then per user.

    Without ``--since`` the period starts with the store's first lease, and says so (it read
    "from 1970-01-01": the start of the epoch, which is what ``since=0`` meant)."""
    lines = [_period(usage), ""]
    lines += [
        f"{'team':<20} {'GPU-hours':>10} {'leases':>7}",
    ]
    lines += [f"{t['team']:<20} {t['gpu_hours']:>10.3f} {t['leases']:>7}" for t in usage["teams"]]
    lines += ["", f"{'user':<20} {'team':<14} {'GPU-hours':>10} {'leases':>7} {'oversized':>10}"]
    lines += [
        f"{u['user']:<20} {u['team'] or '-':<14} {u['gpu_hours']:>10.3f} {u['leases']:>7} "
        f"{_oversized(u):>10}"
        for u in usage["users"]
    ]
    lines += [
        "(oversized: leases whose measured peak stayed under a quarter of what they reserved, of "
        "those "
        "measured)"
    ]
    if usage.get("others_hidden"):
        lines += ["(other users' rows are shown to the pool's administrators only)"]
    lines += ["", f"preemptions: {usage['preemptions']}   refused requests: {usage['refused']}"]
    return "\n".join(lines)
