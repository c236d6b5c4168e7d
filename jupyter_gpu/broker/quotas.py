"""Who may use how much of the pool: teams and users with guaranteed GPUs, limits and priorities.

The pool's quota file (YAML or TOML) is named by Dask config ``jupyter-gpu.pool-config``. Without one the
pool has no quotas: every user is in the default team, nothing is preemptible, and the queue is ordered
by fair share of recent use, priority and age only. The file looks like::

    default-team: default        # users named nowhere land here
    half-life: 1h                # how fast past use is forgotten by fair share
    reserve-after: 60s           # a gang (or a within-guarantee request) waiting this long gets GPUs reserved
    min-run-time: 60s            # a preemptible lease is never reclaimed before it ran this long
    idle-timeout: null           # admin limit: idle leases are released after this long (null: never)
    suspend-idle-after: 60s      # an interactive cell that finds no room moves sessions idle this long to host
                                 # memory (their next cell reads them back); 0s for a busy team pool, null: never
    teams:
      ml:   {guarantee: 2.0, limit: 3, priority: 10, members: [alice, bob]}
      viz:  {guarantee: 0.5, members: [carol]}
    users:
      bob:  {limit: 1.0}         # a user's own limit inside their team
      dave: {guarantee: 0.25}    # a user with a guarantee and no team gets a team of their own

Guarantees and limits are in GPUs (fractions allowed); a member's use counts against their team's quota.
Use beyond the guarantee is allowed when capacity is idle, and such leases are marked ``preemptible``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TEAM = "default"


class QuotaConfigError(ValueError):
    """The pool's quota file is malformed; the message names the file and the entry."""


@dataclass
class Team:
    """A team: a guaranteed share of the pool for its members together, an optional cap, a priority."""

    name: str
    guarantee: float = 0.0
    limit: float | None = None
    priority: int = 0
    members: set[str] = field(default_factory=set)


@dataclass
class UserQuota:
    """A user's own settings inside their team (all optional)."""

    name: str
    team: str
    limit: float | None = None
    priority: int = 0


@dataclass
class PoolQuotas:
    """The whole quota configuration, with the lookups the policy needs."""

    teams: dict[str, Team] = field(default_factory=dict)
    users: dict[str, UserQuota] = field(default_factory=dict)
    default_team: str = DEFAULT_TEAM
    half_life: float = 3600.0
    reserve_after: float = 60.0
    min_run_time: float = 60.0
    idle_timeout: float | None = None
    suspend_idle_after: float | None = 60.0
    configured: bool = False
    source: str | None = None

    def __post_init__(self) -> None:
        self.teams.setdefault(self.default_team, Team(self.default_team))

    def team_of(self, user: str) -> str:
        """The team whose quota holds ``user``; unknown users fall into the default team."""
        quota = self.users.get(user)
        return quota.team if quota is not None else self.default_team

    def team(self, user_or_team: str) -> Team:
        return self.teams.get(user_or_team) or self.teams[self.team_of(user_or_team)]

    def user_limit(self, user: str) -> float | None:
        quota = self.users.get(user)
        return quota.limit if quota else None

    def priority(self, user: str) -> int:
        """Configured priority: the team's plus the user's own (higher is served first)."""
        quota = self.users.get(user)
        return self.team(self.team_of(user)).priority + (quota.priority if quota else 0)

    def total_guarantee(self) -> float:
        return sum(t.guarantee for t in self.teams.values())


def _seconds(value: Any, what: str) -> float | None:
    if value is None:
        return None
    from dask.utils import parse_timedelta

    try:
        return float(parse_timedelta(value, default="s"))
    except (TypeError, ValueError, KeyError) as exc:
        raise QuotaConfigError(f"{what}: {value!r} is not a duration (e.g. 90s, 10m, 1h)") from exc


def _gpus(value: Any, what: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise QuotaConfigError(f"{what}: {value!r} is not a number of GPUs") from exc
    if number < 0:
        raise QuotaConfigError(f"{what}: must be >= 0, got {number}")
    return number


def parse_quotas(data: dict | None, source: str | None = None) -> PoolQuotas:
    """Build ``PoolQuotas`` from the parsed file; raises ``QuotaConfigError`` naming the bad entry."""
    data = dict(data or {})
    where = source or "pool config"
    default_team = str(data.get("default-team", DEFAULT_TEAM))
    teams: dict[str, Team] = {}
    users: dict[str, UserQuota] = {}
    for name, entry in (data.get("teams") or {}).items():
        entry = entry or {}
        team = Team(name=str(name), guarantee=_gpus(entry.get("guarantee", 0), f"{where}: teams.{name}.guarantee"),
                    limit=_gpus(entry.get("limit"), f"{where}: teams.{name}.limit", allow_none=True),
                    priority=int(entry.get("priority", 0)), members={str(m) for m in entry.get("members") or ()})
        if team.limit is not None and team.limit < team.guarantee:
            raise QuotaConfigError(f"{where}: teams.{name}: limit {team.limit} is below its guarantee "
                                   f"{team.guarantee}")
        teams[team.name] = team
        for member in team.members:
            if member in users:
                raise QuotaConfigError(f"{where}: user {member!r} is a member of two teams "
                                       f"({users[member].team} and {name})")
            users[member] = UserQuota(name=member, team=team.name)
    for name, entry in (data.get("users") or {}).items():
        entry = entry or {}
        name = str(name)
        team_name = entry.get("team") or (users[name].team if name in users else None)
        if entry.get("guarantee") is not None and team_name is None:
            # a user with a guarantee of their own and no team: a one-member team carries it
            team_name = name
            teams.setdefault(name, Team(name=name, members={name}))
            teams[name].guarantee = _gpus(entry["guarantee"], f"{where}: users.{name}.guarantee")
        team_name = team_name or default_team
        if team_name not in teams:
            teams[team_name] = Team(name=team_name)
        teams[team_name].members.add(name)
        users[name] = UserQuota(name=name, team=team_name,
                                limit=_gpus(entry.get("limit"), f"{where}: users.{name}.limit", allow_none=True),
                                priority=int(entry.get("priority", 0)))
    return PoolQuotas(teams=teams, users=users, default_team=default_team,
                      half_life=_seconds(data.get("half-life", "1h"), f"{where}: half-life") or 3600.0,
                      reserve_after=_seconds(data.get("reserve-after", "60s"), f"{where}: reserve-after") or 0.0,
                      min_run_time=_seconds(data.get("min-run-time", "60s"), f"{where}: min-run-time") or 0.0,
                      idle_timeout=_seconds(data.get("idle-timeout"), f"{where}: idle-timeout"),
                      suspend_idle_after=_seconds(data.get("suspend-idle-after", "60s"),
                                                  f"{where}: suspend-idle-after"),
                      configured=True, source=source)


def load_quotas(path: str) -> PoolQuotas:
    """Read a quota file (``.toml`` as TOML, anything else as YAML)."""
    path = os.path.expanduser(path)
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ImportError:  # Python 3.10: the same parser, as a package
                import tomli as tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            import yaml

            with open(path) as f:
                data = yaml.safe_load(f)
    except OSError as exc:
        raise QuotaConfigError(f"cannot read the pool config {path}: {exc}") from exc
    except Exception as exc:  # a YAML/TOML syntax error: say which file
        raise QuotaConfigError(f"the pool config {path} is not valid: {exc}") from exc
    quotas = parse_quotas(data, source=path)
    log.info("pool quotas from %s: %d team(s), %d user(s), %.2f GPU guaranteed", path, len(quotas.teams),
             len(quotas.users), quotas.total_guarantee())
    return quotas


def quotas_from_config() -> PoolQuotas:
    """The quotas named by Dask config ``jupyter-gpu.pool-config``, or none (fair share only)."""
    from jupyter_gpu.common import config

    path = config.get("pool-config")
    return load_quotas(str(path)) if path else PoolQuotas()
