"""``%gpu status`` and ``%gpu queue``: the pool snapshot rendered for a notebook (HTML and plain
text)."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any

from jupyter_gpu.common.rightsizing import right_size
from jupyter_gpu.common.units import format_bytes

QUEUE_HEADERS = ["#", "id", "user", "request", "priority", "waiting", "reason", "estimated start"]


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


def estimated_start(item: dict, now: float) -> str:
    """A waiting request's estimated start and what it rests on (``broker/estimates.py``): ``in 40
    s (median of alice's last 12 cells: 40 s)``, or ``unknown (why)``."""
    note = f" ({item['eta_note']})" if item.get("eta_note") else ""
    if item.get("eta") is None:
        return f"unknown{note}"
    return f"in {max(0.0, item['eta'] - now):.0f} s{note}"


def queue_rows(snapshot: dict) -> list[list[str]]:
    now = snapshot.get("time") or time.time()
    rows = []
    for q in snapshot["queue"]:
        eta = estimated_start(q, now)
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
        return _table(QUEUE_HEADERS, rows)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        plain, rich = self._parts()
        return {"text/plain": plain, "text/html": rich}


@dataclass
class Section:
    """One part of ``%gpu status``: a title, a note under it, a table (or what to say when it has no
    rows; a section without rows and without ``empty`` is left out)."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    empty: str | None = "none"
    note: str = ""

    def plain(self) -> list[str]:
        if not self.rows and self.empty is None:
            return []
        title = f"{self.title} ({self.note}):" if self.note else f"{self.title}:"
        return ["", title, _table(self.headers, self.rows)[0] if self.rows else self.empty or ""]

    def rich(self) -> str:
        if not self.rows and self.empty is None:
            return ""
        note = f"<p>{html.escape(self.note[0].upper() + self.note[1:])}.</p>" if self.note else ""
        body = _table(self.headers, self.rows)[1] if self.rows else f"<p>{self.empty}</p>"
        return f"<h4>{html.escape(self.title)}</h4>{note}{body}"


def gpu_rows(snap: dict) -> list[list[str]]:
    """Every GPU: its name (and host, in a pool across machines), memory leased, utilization and
    who holds which share."""
    several_hosts = len({g.get("host") for g in snap["gpus"]}) > 1
    rows = []
    for g in snap["gpus"]:
        holders = ", ".join(
            f"{ls['user']} {ls.get('bytes_on_gpu', ls['bytes']) / g['total_bytes']:.2g}"
            f" ({ls['state']})"
            for ls in g["leases"]
        )
        util = g.get("utilization")
        rows.append(
            [
                (f"{g.get('host')}: " if several_hosts else "")
                + g["name"]
                + (" [virtual]" if g.get("virtual") else "")
                + (" [MIG]" if g.get("mig") else ""),
                f"{format_bytes(g['leased_bytes'])} / {format_bytes(g['total_bytes'])}",
                "-" if util is None else f"{util:.0f}%",
                holders or "-",
            ]
        )
    return rows


def session_rows(snap: dict, user: str, kernel: str) -> list[list[str]]:
    """``user``'s leases, once each: share, state, isolation, peak memory, right-size hint."""
    rows: list[list[str]] = []
    for g in snap["gpus"]:
        for ls in g["leases"]:
            if ls["user"] != user or ls["id"] in {r[0] for r in rows}:
                continue
            here = " (this kernel)" if ls["kernel"] == kernel else ""
            peak = format_bytes(ls["peak_bytes"]) if ls.get("peak_bytes") is not None else "-"
            busy = ls.get("gpu_utilization")
            sizing = right_size(ls.get("peak_bytes"), ls.get("bytes"))
            rows.append(
                [
                    ls["id"],
                    f"{ls['fraction']:g} of {g['name']}{here}",
                    ls["state"] + (" (preemptible)" if ls.get("preemptible") else ""),
                    ls.get("isolation", "none"),
                    f"{peak} of {format_bytes(ls['bytes'])}"
                    + (f", {busy:.0f}% SM busy" if busy is not None else ""),
                    f"ask --memory {sizing.suggestion()}" if sizing else "-",
                    ls.get("notebook") or "-",
                ]
            )
    return rows


def host_memory_rows(snap: dict, user: str, kernel: str) -> list[list[str]]:
    """``user``'s sessions whose variables wait in host memory for their kernel's next cell."""
    now = snap.get("time") or time.time()
    rows = []
    for p in snap.get("in_host_memory") or ():
        if p["user"] != user:
            continue
        size = f", {format_bytes(p['bytes'])}" if p.get("bytes") is not None else ""
        kept = (
            "being moved"
            if p.get("state") == "pending"
            else (f"{len(p.get('saved') or ())} variable(s){size}")
        )
        rows.append(
            [
                p["id"],
                "this kernel" if p.get("kernel") == kernel else (p.get("notebook") or "-"),
                kept,
                f"{now - p['since']:.0f} s ago" if p.get("since") else "-",
                p.get("reason") or "-",
            ]
        )
    return rows


class StatusView:
    """Pool, GPUs with their leases, my session and jobs, my queued requests."""

    def __init__(
        self, snapshot: dict, user: str, kernel: str, jobs: dict, session: Any, address: str
    ):
        self.snapshot, self.user, self.kernel = snapshot, user, kernel
        self.jobs, self.session, self.address = jobs, session, address

    def _head(self) -> str:
        pool = self.snapshot["pool"]
        return (
            f"Pool {self.address} ({'embedded' if pool.get('embedded') else 'shared'}): "
            f"{len(self.snapshot['gpus'])} GPU(s) on {pool.get('workers')} worker(s)"
            + (
                ", virtual GPUs (fractions are counted, not enforced)"
                if pool.get("virtual")
                else ""
            )
            + isolation_note(pool)
        )

    def _sections(self) -> list[Section]:
        snap, me = self.snapshot, self.user
        return [
            Section(
                f"My sessions ({me})",
                ["lease", "share", "state", "isolation", "peak memory", "right-size", "notebook"],
                session_rows(snap, me, self.kernel),
            ),
            Section(
                "My sessions in host memory",
                ["lease", "kernel", "kept", "left its GPU", "why"],
                host_memory_rows(snap, me, self.kernel),
                empty=None,
                note="the next %%gpu cell of their kernel brings them back",
            ),
            Section(
                "My queued requests",
                QUEUE_HEADERS,
                [r for r in queue_rows(snap) if r[2] == me],
            ),
            Section(
                "My --async jobs in this kernel",
                ["job", "cell", "state"],
                [[j.id, j.label, j.state] for j in self.jobs.values()],
                empty=None,
            ),
        ]

    def _parts(self) -> tuple[str, str]:
        head, cluster = self._head(), cluster_text(self.snapshot["pool"])
        gpu_plain, gpu_html = _table(["GPU", "leased", "util", "held by"], gpu_rows(self.snapshot))
        quota = quota_text(self.snapshot.get("quotas") or {}, self.user)
        sections = self._sections()
        plain = [head, *([cluster] if cluster else []), "", gpu_plain]
        plain += [line for section in sections for line in section.plain()]
        rich = (
            f"<p><b>{html.escape(head)}</b></p>"
            + (f"<p>{html.escape(cluster)}</p>" if cluster else "")
            + gpu_html
            + "".join(section.rich() for section in sections)
            + f"<h4>My quota</h4><p>{html.escape(quota)}</p>"
        )
        return "\n".join([*plain, "", quota]), rich

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
