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
    host-memory-per-gpu: proportional  # a session that does not ask gets this much host memory per GPU
                                 # it holds: its machine's memory for sessions / its GPUs, or a size (16GiB)
    cpus-per-gpu: proportional   # ... and this many CPU cores per GPU: the machine's share, or a number (4)
    teams:
      ml:   {guarantee: 2.0, limit: 3, priority: 10, members: [alice, bob]}
      viz:  {guarantee: 0.5, members: [carol]}
      nlp:  {guarantee: 1.0, hub-group: nlp}   # members: the JupyterHub group nlp, read from the Hub
    users:
      bob:  {limit: 1.0}         # a user's own limit inside their team
      dave: {guarantee: 0.25}    # a user with a guarantee and no team gets a team of their own

A team with ``hub-group`` (a pool behind JupyterHub, ``broker/hub_identity.py``) holds the members of
that Hub group as the Hub lists them, read again every ``jupyter-gpu.hub.groups-refresh``: a user
added to the group in the Hub gets the team's quota at the next refresh, and one removed loses it. A
user the file puts in a team stays there; a user in two such groups is in the first of the file.

Guarantees and limits are in GPUs (fractions allowed); a member's use counts against their team's quota.
Use beyond the guarantee is allowed when capacity is idle, and such leases are marked ``preemptible``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from jupyter_gpu.broker.hosts import SessionDefaults

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
    hub_group: str | None = None  # members also come from this JupyterHub group


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
    # what a session that does not ask gets on its machine (broker/hosts.py)
    session_defaults: SessionDefaults = field(default_factory=SessionDefaults)
    # users whose team the file names (a team's members, a user's team or own guarantee): Hub groups
    # do not move them
    placed: set[str] = field(default_factory=set)
    # user -> team, as the last Hub group listing placed them (``set_hub_members``)
    hub_members: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.teams.setdefault(self.default_team, Team(self.default_team))

    def hub_groups(self) -> dict[str, str]:
        """Team -> the JupyterHub group whose members it holds (``hub-group``), in file order."""
        return {t.name: t.hub_group for t in self.teams.values() if t.hub_group}

    def set_hub_members(self, groups: Mapping[str, Collection[str]]) -> bool:
        """Place the members of the Hub groups that teams name (``groups``: group -> user names,
        as the Hub lists them now) in those teams, and take out whoever left; returns whether
        anyone moved. Requests made from now on count against the new team; leases already
        granted keep the team they were granted under."""
        placed: dict[str, str] = {}
        for team, group in self.hub_groups().items():
            for user in sorted(groups.get(group, ())):
                if user not in self.placed and user not in placed:
                    placed[user] = team
        if placed == self.hub_members:
            return False
        for user, team in self.hub_members.items():
            self.teams[team].members.discard(user)
            quota = self.users.get(user)
            if quota is not None and quota.team == team:
                if quota.limit is None and quota.priority == 0:
                    del self.users[user]  # the Hub alone had named them
                else:
                    quota.team = self.default_team
                    self.teams[self.default_team].members.add(user)
        for user, team in placed.items():
            quota = self.users.get(user)
            if quota is None:
                self.users[user] = UserQuota(name=user, team=team)
            else:
                self.teams[quota.team].members.discard(user)
                quota.team = team
            self.teams[team].members.add(user)
        log.info(
            "quota teams from JupyterHub groups: %s",
            ", ".join(f"{u} in {t}" for u, t in sorted(placed.items())) or "no members",
        )
        self.hub_members = placed
        return True

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


TOP_KEYS = (
    "default-team",
    "half-life",
    "reserve-after",
    "min-run-time",
    "idle-timeout",
    "suspend-idle-after",
    "host-memory-per-gpu",
    "cpus-per-gpu",
    "teams",
    "users",
)
TEAM_KEYS = ("guarantee", "limit", "priority", "members", "hub-group")
USER_KEYS = ("team", "guarantee", "limit", "priority")


class _Where:
    """Names an entry of the file for an error: the file, the line where the file has it, and its key path."""

    def __init__(self, source: str | None, lines: dict[tuple[str, ...], int] | None = None):
        self.source = source or "pool config"
        self.lines = lines or {}

    def __call__(self, *keys: Any) -> str:
        path = tuple(str(k) for k in keys)
        line = None
        for n in range(len(path), 0, -1):  # the entry's own line, else its nearest parent's
            line = self.lines.get(path[:n])
            if line is not None:
                break
        at = f"{self.source}, line {line}" if line else self.source
        return f"{at}: {'.'.join(path)}" if path else at


def _seconds(value: Any, what: str) -> float | None:
    if value is None:
        return None
    from dask.utils import parse_timedelta

    try:
        seconds = float(parse_timedelta(value, default="s"))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise QuotaConfigError(
            f"{what}: {value!r} is not a duration (write e.g. 90s, 10m, 1h)"
        ) from exc
    if not math.isfinite(seconds) or seconds < 0:
        raise QuotaConfigError(f"{what}: {value!r} is not a duration (write e.g. 90s, 10m, 1h)")
    return seconds


@overload
def _gpus(value: Any, what: str, allow_none: Literal[False] = False) -> float: ...
@overload
def _gpus(value: Any, what: str, allow_none: bool) -> float | None: ...
def _gpus(value: Any, what: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QuotaConfigError(
            f"{what}: {value!r} is not a number of GPUs (write a number >= 0, e.g. 1.5)"
        )
    number = float(value)
    if not math.isfinite(number):
        raise QuotaConfigError(
            f"{what}: {value!r} is not a number of GPUs (write a finite number >= 0, e.g. 1.5)"
        )
    if number < 0:
        raise QuotaConfigError(f"{what}: must be >= 0, got {number:g}")
    return number


def session_defaults(
    memory: Any, cpus: Any, what: _Where | None = None, minimum: Any = None
) -> SessionDefaults:
    """``SessionDefaults`` from ``host-memory-per-gpu`` and ``cpus-per-gpu`` as written: the word
    ``proportional`` (or null) for the machine's share, else a size and a number of cores."""
    from jupyter_gpu.common.units import parse_size

    where = what or _Where("Dask config jupyter-gpu.session-defaults")
    per_gpu_memory: int | None = None
    if memory not in (None, "proportional"):
        try:
            per_gpu_memory = (
                memory if isinstance(memory, int) and memory > 0 else parse_size(memory)
            )
        except ValueError as exc:
            raise QuotaConfigError(
                f"{where('host-memory-per-gpu')}: {exc}; or write proportional for each "
                "machine's memory for sessions divided by its GPUs"
            ) from None
    per_gpu_cpus: float | None = None
    if cpus not in (None, "proportional"):
        if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not cpus >= 0:
            raise QuotaConfigError(
                f"{where('cpus-per-gpu')}: {cpus!r} is not a number of CPU cores (write e.g. 4, "
                "or proportional for each machine's cores for sessions divided by its GPUs)"
            )
        if not math.isfinite(cpus):
            raise QuotaConfigError(f"{where('cpus-per-gpu')}: {cpus!r} is not finite")
        per_gpu_cpus = float(cpus)
    least = 0
    if minimum:
        try:
            least = minimum if isinstance(minimum, int) else parse_size(minimum)
        except ValueError as exc:
            raise QuotaConfigError(
                f"{where('min-host-memory')}: {exc}; write a size (1GiB)"
            ) from None
    return SessionDefaults(
        host_memory_per_gpu=per_gpu_memory, cpus_per_gpu=per_gpu_cpus, min_host_memory=least
    )


def _priority(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise QuotaConfigError(
            f"{what}: {value!r} is not a whole number (a priority: higher goes first, e.g. 10)"
        )
    return value


def _mapping(value: Any, what: str, known: tuple[str, ...] | None = None) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise QuotaConfigError(
            f"{what}: must be a mapping of names to settings, not {type(value).__name__} {value!r}"
        )
    if known is not None:
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise QuotaConfigError(
                f"{what}: unknown setting(s) {', '.join(unknown)}; the settings here are "
                f"{', '.join(known)} (a typo?)"
            )
    return value


def _names(value: Any, what: str) -> set[str]:
    if value is None:
        return set()
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise QuotaConfigError(
            f"{what}: must be a list of user names, e.g. [alice, bob], not {value!r}"
        )
    return set(value)


def parse_quotas(
    data: Any,
    source: str | None = None,
    lines: dict[tuple[str, ...], int] | None = None,
    defaults: SessionDefaults | None = None,
) -> PoolQuotas:
    """Build ``PoolQuotas`` from the parsed file; raises ``QuotaConfigError`` naming the file, the line (when
    known) and the entry, and saying what to write instead. Unknown settings are refused (a typo would
    otherwise silently mean "no quota")."""
    where = _Where(source, lines)
    data = _mapping(data, where(), TOP_KEYS)
    default_team = data.get("default-team", DEFAULT_TEAM)
    if not isinstance(default_team, str) or not default_team:
        raise QuotaConfigError(
            f"{where('default-team')}: must be a team name, not {default_team!r}"
        )
    teams: dict[str, Team] = {}
    users: dict[str, UserQuota] = {}
    placed: set[str] = set()
    for name, entry in _mapping(data.get("teams"), where("teams")).items():
        entry = _mapping(entry, where("teams", name), TEAM_KEYS)
        hub_group = entry.get("hub-group")
        if hub_group is not None and (not isinstance(hub_group, str) or not hub_group):
            raise QuotaConfigError(
                f"{where('teams', name, 'hub-group')}: must be the name of a JupyterHub group, "
                f"e.g. hub-group: ml, not {hub_group!r}"
            )
        team = Team(
            name=str(name),
            guarantee=_gpus(entry.get("guarantee", 0), where("teams", name, "guarantee")),
            limit=_gpus(entry.get("limit"), where("teams", name, "limit"), allow_none=True),
            priority=_priority(entry.get("priority", 0), where("teams", name, "priority")),
            members=_names(entry.get("members"), where("teams", name, "members")),
            hub_group=hub_group,
        )
        if team.limit is not None and team.limit < team.guarantee:
            raise QuotaConfigError(
                f"{where('teams', name)}: limit {team.limit:g} is below its guarantee "
                f"{team.guarantee:g}"
            )
        teams[team.name] = team
        for member in team.members:
            if member in users:
                raise QuotaConfigError(
                    f"{where('teams', name, 'members')}: user {member!r} is a member of two "
                    f"teams ({users[member].team} and {name})"
                )
            users[member] = UserQuota(name=member, team=team.name)
            placed.add(member)
    for name, entry in _mapping(data.get("users"), where("users")).items():
        entry = _mapping(entry, where("users", name), USER_KEYS)
        name = str(name)
        team_name = entry.get("team") or (users[name].team if name in users else None)
        if team_name is not None and not isinstance(team_name, str):
            raise QuotaConfigError(
                f"{where('users', name, 'team')}: must be a team name, not {team_name!r}"
            )
        if entry.get("guarantee") is not None and team_name is None:
            # a user with a guarantee of their own and no team: a one-member team carries it
            team_name = name
            teams.setdefault(name, Team(name=name, members={name}))
            teams[name].guarantee = _gpus(entry["guarantee"], where("users", name, "guarantee"))
        if team_name is not None:
            placed.add(name)
        team_name = team_name or default_team
        if team_name not in teams:
            teams[team_name] = Team(name=team_name)
        teams[team_name].members.add(name)
        users[name] = UserQuota(
            name=name,
            team=team_name,
            limit=_gpus(entry.get("limit"), where("users", name, "limit"), allow_none=True),
            priority=_priority(entry.get("priority", 0), where("users", name, "priority")),
        )
    base = defaults or SessionDefaults()
    per_gpu = session_defaults(
        data.get("host-memory-per-gpu", base.host_memory_per_gpu),
        data.get("cpus-per-gpu", base.cpus_per_gpu),
        where,
        data.get("min-host-memory", base.min_host_memory),
    )
    return PoolQuotas(
        teams=teams,
        users=users,
        default_team=default_team,
        session_defaults=per_gpu,
        half_life=_seconds(data.get("half-life", "1h"), where("half-life")) or 3600.0,
        reserve_after=_seconds(data.get("reserve-after", "60s"), where("reserve-after")) or 0.0,
        min_run_time=_seconds(data.get("min-run-time", "60s"), where("min-run-time")) or 0.0,
        idle_timeout=_seconds(data.get("idle-timeout"), where("idle-timeout")),
        suspend_idle_after=_seconds(
            data.get("suspend-idle-after", "60s"), where("suspend-idle-after")
        ),
        configured=True,
        source=source,
        placed=placed,
    )


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Key path -> 1-based line of every mapping key in a YAML document (for errors that name the line)."""
    import yaml

    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (str(key.value),)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _toml_lines(text: str) -> dict[tuple[str, ...], int]:
    """The same for TOML, from its text: ``[a.b]`` tables and ``key = ...`` lines under them."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            table = tuple(p.strip().strip('"') for p in line.strip("[]").split("."))
            lines.setdefault(table, n)
        elif "=" in line and not line.startswith("#"):
            key = line.split("=", 1)[0].strip().strip('"')
            lines.setdefault(table + tuple(p.strip() for p in key.split(".")), n)
    return lines


def load_quotas(path: str, defaults: SessionDefaults | None = None) -> PoolQuotas:
    """Read a quota file (``.toml`` as TOML, anything else as YAML)."""
    path = os.path.expanduser(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise QuotaConfigError(
            f"cannot read the pool's quota file {path} (jupyter-gpu.pool-config): "
            f"{exc.strerror or exc}. Fix the path or its permissions, or unset "
            "jupyter-gpu.pool-config for a pool without quotas."
        ) from exc
    text = raw.decode("utf-8", "replace")
    try:
        if path.endswith(".toml"):
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # Python 3.10: the same parser, as a package
                import tomli as tomllib

            data = tomllib.loads(text)
            lines = _toml_lines(text)
        else:
            import yaml

            data = yaml.safe_load(text)
            lines = _yaml_lines(text)
    # a YAML/TOML syntax error: say which file (the parser's text has the line)
    except Exception as exc:
        raise QuotaConfigError(
            f"the pool's quota file {path} is not valid "
            f"{'TOML' if path.endswith('.toml') else 'YAML'}: {exc}"
        ) from exc
    quotas = parse_quotas(data, source=path, lines=lines, defaults=defaults)
    log.info(
        "pool quotas from %s: %d team(s), %d user(s), %.2f GPU guaranteed",
        path,
        len(quotas.teams),
        len(quotas.users),
        quotas.total_guarantee(),
    )
    return quotas


def quotas_from_config() -> PoolQuotas:
    """The quotas named by Dask config ``jupyter-gpu.pool-config``, or none (fair share only)."""
    from jupyter_gpu.common import config

    path = config.get("pool-config")
    defaults = session_defaults(
        config.get("session-defaults.host-memory-per-gpu"),
        config.get("session-defaults.cpus-per-gpu"),
        minimum=config.get("session-defaults.min-host-memory"),
    )
    if path:
        return load_quotas(str(path), defaults)
    return PoolQuotas(session_defaults=defaults)
