"""``%gpu status`` and ``%gpu queue``: the pool snapshot rendered for a notebook (HTML and plain
text)."""

from __future__ import annotations

import html
import time
from typing import Any

from jupyter_gpu.common.rightsizing import right_size
from jupyter_gpu.common.units import format_bytes


def _table(headers: list[str], rows: list[list[str]]) -> tuple[str, str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    plain = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    plain += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    rich = (
        "<table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        + "</table>"
    )
    return "\n".join(plain), rich


def queue_rows(snapshot: dict) -> list[list[str]]:
    now = snapshot.get("time") or time.time()
    rows = []
    for q in snapshot["queue"]:
        eta = f"in {max(0, q['eta'] - now):.0f} s" if q.get("eta") else "unknown"
        if q.get("eta") and q.get("eta_basis"):
            eta += {"progress": " (from progress)", "idle": " (idle sessions move)"}.get(
                q["eta_basis"], " (rough)"
            )
        rows.append(
            [
                str(q["position"]),
                q["id"],
                q["user"],
                q["request"],
                q.get("priority", ""),
                f"{now - q['since']:.0f} s",
                q.get("reason") or "",
                eta,
            ]
        )
    return rows


def quota_text(quotas: dict, user: str) -> str:
    """``user``'s standing: their team's guarantee, limit and what the team and the user hold
    now."""
    if not quotas.get("configured"):
        return "Quota: this pool has no quotas configured (every user may use idle capacity; fair share orders the queue)."
    me = next((u for u in quotas.get("users", []) if u["user"] == user), None)
    team_name = me["team"] if me else quotas.get("default_team", "default")
    team = next((t for t in quotas.get("teams", []) if t["team"] == team_name), None)
    if team is None:
        return f"Quota: you are in team {team_name}, which has no quota entry."
    limit = f", limit {team['limit']:g}" if team.get("limit") is not None else ", no limit"
    text = (
        f"Quota: team {team_name} is guaranteed {team['guarantee']:g} GPU{limit}; it holds "
        f"{team['held']:g} GPU now"
    )
    if team["held"] > team["guarantee"] + 1e-9:
        text += " (over its guarantee: the part above it runs on idle capacity and is preemptible)"
    if me is not None:
        text += f". You hold {me['held']:g} GPU" + (
            f" of your limit {me['limit']:g}" if me.get("limit") is not None else ""
        )
    return text + "."


def isolation_note(pool: dict) -> str:
    """What a shared pool promises about users (DESIGN 2b): said plainly when sessions do not run as
    their users (the worker is not root), so nobody takes a shared pool for an isolated one."""
    if pool.get("embedded"):
        return ""
    if pool.get("users_isolated"):
        return ". Users are isolated: each session runs as its user's account"
    return (
        ". Users are NOT isolated from each other: sessions run as the worker's account (start "
        "`jupyter-gpu "
        "worker` as root, with a token file on the pool, to isolate them; see docs/security.md)"
    )


def cluster_text(pool: dict) -> str:
    """The cluster manager behind ``%gpu scale``, what it was asked for, and its jobs on their
    way or ended (the manager's own words: ``job 123 PENDING (Resources)``); '' for a pool
    without one."""
    cluster = pool.get("cluster") or {}
    if not cluster or cluster.get("kind") == "embedded":
        return ""
    name = {"slurm": "Slurm"}.get(cluster.get("kind") or "", "a Dask cluster manager")
    parts = [f"Workers come from {name} ({cluster.get('manager')})"]
    if cluster.get("adaptive"):
        parts.append(
            f"adaptive {cluster['adaptive']['minimum']}..{cluster['adaptive']['maximum']} workers"
        )
    elif cluster.get("target") is not None:
        parts.append(f"{cluster['target']} worker(s) asked for")

    def job(j: dict) -> str:
        state = j.get("state") or "submitted"
        return f"job {j.get('job_id') or j.get('name')} {state}" + (
            f" ({j['reason']})" if j.get("reason") else ""
        )

    pending = [job(j) for j in cluster.get("jobs") or () if not j.get("workers")]
    ended = [job(j) for j in cluster.get("ended") or ()][:3]
    if pending:
        parts.append("on their way: " + ", ".join(pending))
    if ended:
        parts.append("ended by themselves: " + ", ".join(ended))
    return "; ".join(parts) + "."


class QueueView:
    def __init__(self, snapshot: dict, user: str):
        self.snapshot, self.user = snapshot, user

    def _parts(self) -> tuple[str, str]:
        rows = queue_rows(self.snapshot)
        if not rows:
            return (
                "The queue is empty: every request has been granted.",
                "<p>The queue is empty.</p>",
            )
        return _table(
            ["#", "id", "user", "request", "priority", "waiting", "reason", "estimated start"], rows
        )

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        plain, rich = self._parts()
        return {"text/plain": plain, "text/html": rich}


class StatusView:
    """Pool, GPUs with their leases, my session and jobs, my queued requests."""

    def __init__(
        self, snapshot: dict, user: str, kernel: str, jobs: dict, session: Any, address: str
    ):
        self.snapshot, self.user, self.kernel = snapshot, user, kernel
        self.jobs, self.session, self.address = jobs, session, address

    def _parts(self) -> tuple[str, str]:
        snap = self.snapshot
        pool = snap["pool"]
        head = (
            f"Pool {self.address} ({'embedded' if pool.get('embedded') else 'shared'}): "
            f"{len(snap['gpus'])} GPU(s) on {pool.get('workers')} worker(s)"
            + (
                ", virtual GPUs (fractions are counted, not enforced)"
                if pool.get("virtual")
                else ""
            )
            + isolation_note(pool)
        )
        gpu_rows = []
        # a pool across machines: say which
        several_hosts = len({g.get("host") for g in snap["gpus"]}) > 1
        for g in snap["gpus"]:
            holders = (
                ", ".join(
                    f"{ls['user']} {ls.get('bytes_on_gpu', ls['bytes']) / g['total_bytes']:.2g}"
                    f" ({ls['state']})"
                    for ls in g["leases"]
                )
                or "-"
            )
            util = g.get("utilization")
            gpu_rows.append(
                [
                    (f"{g.get('host')}: " if several_hosts else "")
                    + g["name"]
                    + (" [virtual]" if g.get("virtual") else "")
                    + (" [MIG]" if g.get("mig") else ""),
                    f"{format_bytes(g['leased_bytes'])} / {format_bytes(g['total_bytes'])}",
                    "-" if util is None else f"{util:.0f}%",
                    holders,
                ]
            )
        gpu_plain, gpu_html = _table(["GPU", "leased", "util", "held by"], gpu_rows)
        mine: list[list[str]] = []
        for g in snap["gpus"]:
            for ls in g["leases"]:
                if ls["user"] == self.user and ls["id"] not in {m[0] for m in mine}:
                    here = " (this kernel)" if ls["kernel"] == self.kernel else ""
                    peak = (
                        format_bytes(ls["peak_bytes"]) if ls.get("peak_bytes") is not None else "-"
                    )
                    sizing = right_size(ls.get("peak_bytes"), ls.get("bytes"))
                    state = ls["state"] + (" (preemptible)" if ls.get("preemptible") else "")
                    mine.append(
                        [
                            ls["id"],
                            f"{ls['fraction']:g} of {g['name']}{here}",
                            state,
                            ls.get("isolation", "none"),
                            f"{peak} of {format_bytes(ls['bytes'])}"
                            + (
                                f", {ls['gpu_utilization']:.0f}% SM busy"
                                if ls.get("gpu_utilization") is not None
                                else ""
                            ),
                            f"ask --memory {sizing.suggestion()}" if sizing else "-",
                            ls.get("notebook") or "-",
                        ]
                    )
        my_plain, my_html = _table(
            ["lease", "share", "state", "isolation", "peak memory", "right-size", "notebook"], mine
        )
        now = snap.get("time") or time.time()
        parked = [
            [
                p["id"],
                "this kernel" if p.get("kernel") == self.kernel else (p.get("notebook") or "-"),
                (
                    "being moved"
                    if p.get("state") == "pending"
                    else f"{len(p.get('saved') or ())} variable(s)"
                    + (f", {format_bytes(p['bytes'])}" if p.get("bytes") is not None else "")
                ),
                f"{now - p['since']:.0f} s ago" if p.get("since") else "-",
                p.get("reason") or "-",
            ]
            for p in snap.get("in_host_memory") or ()
            if p["user"] == self.user
        ]
        p_plain, p_html = _table(["lease", "kernel", "kept", "left its GPU", "why"], parked)
        queued = [r for r in queue_rows(snap) if r[2] == self.user]
        q_plain, q_html = _table(
            ["#", "id", "user", "request", "priority", "waiting", "reason", "estimated start"],
            queued,
        )
        jobs = [[j.id, j.label, j.state] for j in self.jobs.values()]
        j_plain, j_html = _table(["job", "cell", "state"], jobs)
        cluster = cluster_text(pool)
        plain = (
            [head]
            + ([cluster] if cluster else [])
            + ["", gpu_plain, "", f"My sessions ({self.user}):", my_plain if mine else "none"]
        )
        if parked:
            plain += [
                "",
                "My sessions in host memory (the next %%gpu cell of their kernel brings them back):",
                p_plain,
            ]
        plain += ["", "My queued requests:", q_plain if queued else "none"]
        if jobs:
            plain += ["", "My --async jobs in this kernel:", j_plain]
        quota = quota_text(snap.get("quotas") or {}, self.user)
        plain += ["", quota]
        rich = (
            f"<p><b>{html.escape(head)}</b></p>"
            + (f"<p>{html.escape(cluster)}</p>" if cluster else "")
            + f"{gpu_html}<h4>My sessions ({html.escape(self.user)})</h4>"
            + (my_html if mine else "<p>none</p>")
            + (
                "<h4>My sessions in host memory</h4><p>The next <code>%%gpu</code> cell of their "
                "kernel brings "
                f"them back.</p>{p_html}"
                if parked
                else ""
            )
            + "<h4>My queued requests</h4>"
            + (q_html if queued else "<p>none</p>")
            + (f"<h4>My --async jobs</h4>{j_html}" if jobs else "")
            + f"<h4>My quota</h4><p>{html.escape(quota)}</p>"
        )
        return "\n".join(plain), rich

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        plain, rich = self._parts()
        others = everyones_sessions(self.snapshot, self.user)
        if others is not None:
            plain, rich = plain + "\n\n" + others[0], rich + others[1]
        return {"text/plain": plain, "text/html": rich}


def everyones_sessions(snapshot: dict, user: str) -> tuple[str, str] | None:
    """For the pool's administrators (a JupyterHub admin, or the Hub's admin scope: the
    snapshot's ``viewer``), every other user's sessions and queued requests, which ``%gpu cancel
    ID`` may end; None for everyone else, who see whose work holds each GPU in the table above."""
    if not (snapshot.get("viewer") or {}).get("admin"):
        return None
    seen: set[str] = set()
    rows = []
    for g in snapshot.get("gpus") or ():
        for ls in g["leases"]:
            if ls["user"] != user and ls["id"] not in seen:
                seen.add(ls["id"])
                share = f"{ls['fraction']:g} of {g['name']}"
                rows.append([ls["id"], ls["user"], share, ls["state"], ls.get("notebook") or "-"])
    rows += [[r[1], r[2], r[3], "queued", "-"] for r in queue_rows(snapshot) if r[2] != user]
    plain, rich = _table(["id", "user", "share", "state", "notebook"], rows)
    title = "Everyone else's work (you are an administrator of this pool: %gpu cancel ID ends it)"
    return (
        f"{title}:\n{plain if rows else 'none'}",
        f"<h4>{html.escape(title)}</h4>" + (rich if rows else "<p>none</p>"),
    )
