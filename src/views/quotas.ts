/**
 * The Quotas section: each team's guarantee, limit and what it holds, drawn as a bar, and my own standing.
 *
 * The broker decides who belongs to which team (broker/quotas.py's ``team_of``) and lists every user the
 * quota file names, team members included, under ``users`` with their team; the panel only looks itself
 * up there, falling back to the default team where users named nowhere land.
 */
import { formatBytes, formatShare } from '../format';
import { IQuotaTeam, IQuotas } from '../wire';

/** One team's row in the Quotas section. */
export interface ITeamQuotaView {
  team: string;
  /** The team this server's user belongs to (highlighted). */
  mine: boolean;
  guarantee: number;
  limit: number | null;
  held: number;
  members: string[];
  /** The row's bar, as shares (0..1) of its scale (the limit, else the larger of guarantee and held). */
  withinShare: number;
  overShare: number;
  guaranteeAt: number;
  /** Holds more than its guarantee: it runs on borrowed capacity, and those leases are preemptible. */
  over: boolean;
  text: string;
}

export interface IQuotaView {
  configured: boolean;
  teams: ITeamQuotaView[];
  myTeam: string | null;
  myHeld: number;
  myLimit: number | null;
  /** My idle sessions' copies booked in host memory (bytes; broker/hosts.py). */
  myParkedBytes: number;
  identity: 'tokens' | 'names' | null;
}

/** Held counts as over the guarantee only beyond this (the broker rounds shares to 4 decimals). */
const EPS = 1e-6;

/** The team the broker lists ``me`` under, else the default team (where users named nowhere land). */
export function myTeamOf(quotas: IQuotas, me: string): string | null {
  const entry = (quotas.users ?? []).find(u => u.user === me);
  return entry ? entry.team : (quotas.default_team ?? null);
}

/** One team's row: its numbers, its bar's geometry, and whether it is borrowing (over its guarantee). */
export function teamQuotaRow(team: IQuotaTeam, mine: boolean): ITeamQuotaView {
  const guarantee = Math.max(0, team.guarantee ?? 0);
  const limit = typeof team.limit === 'number' ? team.limit : null;
  const held = Math.max(0, team.held ?? 0);
  // With a limit the bar is the limit; without, it grows with use so that borrowing shows beyond the tick.
  const scale = Math.max(limit ?? 0, guarantee, held) || 1;
  const text = `${formatShare(held)} of ${formatShare(guarantee)} GPU guaranteed${
    limit !== null ? ` · limit ${formatShare(limit)}` : ''
  }`;
  return {
    team: team.team,
    mine,
    guarantee,
    limit,
    held,
    members: [...(team.members ?? [])].sort(),
    withinShare: Math.min(held, guarantee) / scale,
    overShare: Math.max(0, held - guarantee) / scale,
    guaranteeAt: guarantee / scale,
    over: held > guarantee + EPS,
    text
  };
}

/**
 * The rows of the Quotas section: my team first, then by name. A team with nothing to say (no guarantee,
 * no limit, no members, nothing held: typically the implicit default team) is left out unless it is mine.
 */
export function teamQuotaRows(quotas: IQuotas, me: string): ITeamQuotaView[] {
  const myTeam = myTeamOf(quotas, me);
  return (quotas.teams ?? [])
    .filter(
      t =>
        t.team === myTeam ||
        (t.guarantee ?? 0) > 0 ||
        typeof t.limit === 'number' ||
        (t.members ?? []).length > 0 ||
        (t.held ?? 0) > 0
    )
    .map(t => teamQuotaRow(t, t.team === myTeam))
    .sort((a, b) => Number(b.mine) - Number(a.mine) || a.team.localeCompare(b.team));
}

/**
 * The Quotas section's model, or null when the snapshot has no ``quotas`` (an older broker). ``myShare`` is
 * what I hold by the leases' bytes, used only when the broker does not list me (it lists every user who holds
 * GPUs, so that means I hold none).
 */
export function quotaView(quotas: IQuotas | undefined, me: string, myShare: number): IQuotaView | null {
  if (!quotas) {
    return null;
  }
  if (!quotas.configured) {
    return {
      configured: false,
      teams: [],
      myTeam: null,
      myHeld: myShare,
      myLimit: null,
      myParkedBytes: 0,
      identity: null
    };
  }
  const entry = (quotas.users ?? []).find(u => u.user === me);
  return {
    configured: true,
    teams: teamQuotaRows(quotas, me),
    myTeam: myTeamOf(quotas, me),
    myHeld: entry ? entry.held : myShare,
    myLimit: entry && typeof entry.limit === 'number' ? entry.limit : null,
    myParkedBytes: entry?.parked_bytes ?? 0,
    identity: quotas.identity ?? null
  };
}

/** The line under the Quotas rows about me: what I hold and my own limit inside the team. */
export function myQuotaText(q: IQuotaView): string {
  const held = `${formatShare(q.myHeld)} GPU held`;
  const limit = q.myLimit !== null ? `your limit ${formatShare(q.myLimit)} GPU` : 'no limit of your own';
  const parked = q.myParkedBytes > 0 ? ` · ${formatBytes(q.myParkedBytes)} of idle sessions in host memory` : '';
  return `${held} · ${limit}${parked}`;
}
