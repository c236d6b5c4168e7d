/**
 * The panel's data model: the pool snapshot as the server extension sends it, and the pure functions that
 * turn it into what the panel draws (per-GPU lease splits, my share, the queue, my sessions, runs).
 *
 * Nothing here touches JupyterLab, the DOM or the network, so every rule the panel shows (what counts as
 * "mine", how a lease's share of a GPU is computed, how bytes and durations read) is unit-tested with jest
 * in src/__tests__/model.spec.ts.
 */

/** One utilisation / memory sample of a GPU (the broker keeps the last minute or so). */
export interface ISample {
  t: number;
  utilization?: number | null;
  memory_used_bytes?: number | null;
}

/** A lease as the broker's snapshot lists it under the GPU(s) it holds memory on. */
export interface ILease {
  id: string;
  user: string;
  kernel?: string;
  notebook?: string | null;
  cell?: string | null;
  fraction?: number | null;
  bytes?: number | null;
  /** Bytes of this lease on the GPU it is listed under (a gang lease spans GPUs). */
  bytes_on_gpu?: number | null;
  isolation?: string | null;
  state?: string | null;
  started?: number | null;
  cell_started?: number | null;
  peak_bytes?: number | null;
  preemptible?: boolean;
  rank?: number | null;
  world_size?: number | null;
  priority?: string | null;
}

export interface IGpu {
  id: string;
  worker?: string;
  host?: string;
  index: number;
  uuid?: string;
  name?: string;
  total_bytes: number;
  leased_bytes?: number;
  virtual?: boolean;
  mig?: boolean;
  utilization?: number | null;
  memory_used_bytes?: number | null;
  samples?: ISample[];
  leases?: ILease[];
}

export interface IQueueItem {
  id: string;
  user: string;
  kernel?: string;
  notebook?: string | null;
  cell?: string | null;
  request: string;
  priority?: string;
  position: number;
  reason: string;
  eta?: number | null;
  since?: number | null;
}

/** One rank of a scale-out run (``%%gpu --workers N``), as far as the broker knows it. */
export interface IRunRank {
  rank: number;
  step?: number | null;
  total?: number | null;
  progress?: number | null;
  loss?: number | null;
  state?: string | null;
}

/** A metric point a run reported with ``jupyter_gpu.report(...)``. */
export interface IRunMetric {
  t?: number;
  step?: number;
  rank?: number;
  loss?: number;
  [key: string]: unknown;
}

/** One batched report of a rank, as the broker keeps it (``jupyter_gpu.report(step=..., loss=...)``). */
export interface IRankReport {
  step?: number | null;
  time?: number | null;
  metrics?: Record<string, unknown> | null;
}

/**
 * A scale-out run as the broker's ``gpu_run_update`` / ``gpu_run_metrics`` record it: ``ranks`` maps each
 * rank to its stream of reports. A summary per rank (``IRunRank``) is accepted too.
 */
export interface IRun {
  id: string;
  user?: string;
  name?: string | null;
  notebook?: string | null;
  cell?: string | null;
  state?: string;
  world_size?: number;
  attempt?: number;
  ranks?: IRunRank[] | Record<string, IRunRank | IRankReport[]>;
  metrics?: IRunMetric[];
  started?: number | null;
}

/** A team as the broker's ``quotas`` view lists it (GPUs; fractions allowed). */
export interface IQuotaTeam {
  team: string;
  guarantee: number;
  limit?: number | null;
  priority?: number;
  /** GPUs the team's leases hold now. */
  held: number;
  members?: string[];
}

/** A user named in the quota file, or holding GPUs now. */
export interface IQuotaUser {
  user: string;
  team: string;
  limit?: number | null;
  priority?: number;
  held: number;
}

/** The snapshot's ``quotas``: ``configured`` is false for a pool without a quota file (the embedded pool). */
export interface IQuotas {
  configured: boolean;
  default_team?: string;
  teams?: IQuotaTeam[];
  users?: IQuotaUser[];
  /** ``tokens``: the broker checks JUPYTER_GPU_TOKEN on requests and cancels; ``names``: names are trusted. */
  identity?: 'tokens' | 'names';
}

export interface IPoolInfo {
  address?: string | null;
  embedded?: boolean;
  scalable?: boolean;
  /** Set by the server extension: the pool is scalable and this server's user may scale it. */
  can_scale?: boolean;
  /** Who may scale (Dask config jupyter-gpu.scale-users); null: everyone. */
  scale_users?: string[] | null;
  workers?: number;
  virtual?: boolean;
  default_fraction?: number;
}

/** What GET jupyter-gpu/api/snapshot and the stream websocket send. */
export type ISnapshot =
  | { state: 'no-pool'; me?: string }
  | { state: 'unreachable'; error?: string; address?: string; me?: string }
  | {
      state: 'ok';
      me?: string;
      time: number;
      pool: IPoolInfo;
      gpus: IGpu[];
      queue: IQueueItem[];
      runs?: IRun[];
      /** Sessions taken off their GPU whose variables wait in host memory for the owner's next cell. */
      in_host_memory?: IParked[];
      quotas?: IQuotas;
      /** Whether this Jupyter server has a pool token to send with cancels (never the token itself). */
      token_set?: boolean;
    };

/** A session moved to host memory (suspended, reclaimed or timed out), as the broker reports it. */
export interface IParked {
  id: string;
  user: string;
  notebook?: string | null;
  cell?: string | null;
  /** ``pending`` while the variables are being written, then ``saved``. */
  state?: string | null;
  saved?: string[];
  lost?: string[];
  bytes?: number | null;
  /** The session had copied its variables while idle: moving it was a rename (standby.py). */
  standby?: boolean | null;
  /** How long moving it off its GPU took (seconds). */
  move_seconds?: number | null;
  since?: number | null;
  reason?: string | null;
}

/** One of my sessions waiting in host memory. */
export interface IParkedView {
  id: string;
  notebook: string | null;
  cell: string | null;
  /** e.g. ``3 variables, 64.0 MiB, moved in 0.4 s`` (``being moved`` while pending). */
  what: string;
  /** How long ago it left its GPU. */
  since: string;
  reason: string | null;
  /** Names that could not be kept (not picklable). */
  lost: string[];
}

/** One coloured segment of a GPU's memory bar. */
export interface ISegmentView {
  leaseId: string;
  user: string;
  mine: boolean;
  notebook: string | null;
  cell: string | null;
  fraction: number | null;
  bytes: number;
  /** Share of this GPU's total memory, 0..1. */
  share: number;
  isolation: string;
  state: string;
  preemptible: boolean;
}

export interface IGpuView {
  id: string;
  title: string;
  host: string;
  badge: 'virtual' | 'MIG' | null;
  totalBytes: number;
  leasedBytes: number;
  freeBytes: number;
  usedBytes: number | null;
  utilization: number | null;
  /** Utilisation samples, 0..100. */
  utilSeries: number[];
  /** Memory-in-use samples as a share of total, 0..1. */
  memSeries: number[];
  segments: ISegmentView[];
}

export interface IQueueView {
  id: string;
  position: number;
  user: string;
  mine: boolean;
  request: string;
  reason: string;
  eta: string;
  waited: string;
  notebook: string | null;
}

export interface ISessionView {
  id: string;
  gpus: string[];
  notebook: string | null;
  cell: string | null;
  state: string;
  elapsed: string;
  peak: string;
  /** Peak memory measured in the session (CUDA allocator), null until a cell has used CUDA. */
  peakBytes: number | null;
  bytes: number;
  isolation: string;
  /** ``peak X of Y reserved`` when the peak is known, else ``Y reserved``. */
  usage: string;
  /** A smaller ``--memory`` to ask for next time, when the session used under a quarter of its reservation. */
  rightSize: string | null;
  /** Granted beyond the team's guarantee: the pool may reclaim it for a team that is owed its guarantee. */
  preemptible: boolean;
}

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
  identity: 'tokens' | 'names' | null;
}

export interface IRunView {
  id: string;
  title: string;
  user: string;
  mine: boolean;
  state: string;
  ranks: { rank: number; progress: number | null; label: string; state: string }[];
  loss: number[];
}

export interface IViewModel {
  state: 'loading' | 'no-pool' | 'unreachable' | 'ok';
  error: string | null;
  address: string | null;
  me: string;
  virtual: boolean;
  scalable: boolean;
  embedded: boolean;
  workers: number;
  defaultFraction: number | null;
  gpus: IGpuView[];
  queue: IQueueView[];
  sessions: ISessionView[];
  /** My sessions whose variables wait in host memory; my next ``%%gpu`` cell there brings them back. */
  inHostMemory: IParkedView[];
  runs: IRunView[];
  /** The pool's quotas as they concern the panel; null when the broker sends none (an older broker). */
  quotas: IQuotaView | null;
  /** The pool checks tokens and this server has none to send: its cancels will be refused. */
  tokenMissing: boolean;
  /** My leased memory in GPU-equivalents (sum over GPUs of my bytes / that GPU's total). */
  myShare: number;
  myQueued: number;
  /** Whole pool, in GPU-equivalents: leased and total. */
  poolLeased: number;
  poolTotal: number;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

/** Bytes in binary units, the same form the Python side prints (``16.0 GiB``, ``512 B``). */
export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !isFinite(n)) {
    return '?';
  }
  let value = n;
  for (const unit of UNITS) {
    if (Math.abs(value) < 1024 || unit === 'TiB') {
      return unit === 'B' ? `${Math.round(value)} B` : `${value.toFixed(1)} ${unit}`;
    }
    value /= 1024;
  }
  return `${value.toFixed(1)} TiB`;
}

/** A duration in seconds as people read it in a narrow panel: ``42s``, ``3m 05s``, ``2h 07m``. */
export function formatDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) {
    return '–';
  }
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) {
    return `${s}s`;
  }
  const m = Math.floor(s / 60);
  if (m < 60) {
    return `${m}m ${String(s % 60).padStart(2, '0')}s`;
  }
  const h = Math.floor(m / 60);
  return `${h}h ${String(m % 60).padStart(2, '0')}m`;
}

/** A GPU fraction as the magic spells it: ``0.25``, ``1``, ``2.5``. */
export function formatShare(share: number): string {
  const rounded = Math.round(share * 100) / 100;
  return String(rounded);
}

/**
 * An SVG polyline ``points`` string for a sparkline of ``values`` in a ``width`` x ``height`` box, scaled to
 * ``max`` (values above are clipped). Empty for fewer than two values: a single point draws nothing useful.
 */
export function sparklinePoints(values: number[], width: number, height: number, max?: number): string {
  const finite = values.filter(v => typeof v === 'number' && isFinite(v));
  if (finite.length < 2) {
    return '';
  }
  const top = max !== undefined && max > 0 ? max : Math.max(...finite) || 1;
  const low = max !== undefined ? 0 : Math.min(0, ...finite);
  const span = top - low || 1;
  const step = width / (finite.length - 1);
  return finite
    .map((v, i) => {
      const clipped = Math.min(Math.max(v, low), top);
      const y = height - ((clipped - low) / span) * height;
      return `${(i * step).toFixed(1)},${y.toFixed(1)}`;
    })
    .join(' ');
}

function gpuTitle(gpu: IGpu): string {
  return gpu.name || `GPU ${gpu.index}`;
}

function badgeOf(gpu: IGpu): IGpuView['badge'] {
  if (gpu.virtual) {
    return 'virtual';
  }
  return gpu.mig ? 'MIG' : null;
}

function leaseBytesOn(lease: ILease): number {
  const onGpu = lease.bytes_on_gpu;
  if (typeof onGpu === 'number' && onGpu >= 0) {
    return onGpu;
  }
  return lease.bytes ?? 0; // older brokers: a lease listed under one GPU holds all its bytes there
}

/** The panel's view of one GPU: lease segments sorted mine-first, then by size, so my share reads first. */
export function gpuView(gpu: IGpu, me: string): IGpuView {
  const total = gpu.total_bytes > 0 ? gpu.total_bytes : 0;
  const segments: ISegmentView[] = (gpu.leases ?? []).map(lease => {
    const bytes = leaseBytesOn(lease);
    return {
      leaseId: lease.id,
      user: lease.user,
      mine: lease.user === me,
      notebook: lease.notebook ?? null,
      cell: lease.cell ?? null,
      fraction: lease.fraction ?? null,
      bytes,
      share: total ? Math.min(1, bytes / total) : 0,
      isolation: lease.isolation || 'none',
      state: lease.state || 'unknown',
      preemptible: !!lease.preemptible
    };
  });
  segments.sort((a, b) => Number(b.mine) - Number(a.mine) || b.bytes - a.bytes || a.leaseId.localeCompare(b.leaseId));
  const leased =
    typeof gpu.leased_bytes === 'number' ? gpu.leased_bytes : segments.reduce((sum, s) => sum + s.bytes, 0);
  const samples = gpu.samples ?? [];
  return {
    id: gpu.id,
    title: gpuTitle(gpu),
    host: gpu.host ?? '',
    badge: badgeOf(gpu),
    totalBytes: total,
    leasedBytes: leased,
    freeBytes: Math.max(0, total - leased),
    usedBytes: gpu.memory_used_bytes ?? null,
    utilization: gpu.utilization ?? null,
    utilSeries: samples.map(s => (typeof s.utilization === 'number' ? s.utilization : 0)),
    memSeries: samples.map(s => (total && typeof s.memory_used_bytes === 'number' ? s.memory_used_bytes / total : 0)),
    segments
  };
}

function num(value: unknown): number | null {
  return typeof value === 'number' && isFinite(value) ? value : null;
}

/** A rank's summary from its report stream: the last step, loss and (if reported) total steps. */
function summarise(rank: number, reports: IRankReport[]): { summary: IRunRank; loss: number[] } {
  const loss: number[] = [];
  let last: IRankReport | undefined;
  for (const r of reports) {
    last = r;
    const l = num(r.metrics?.loss);
    if (l !== null) {
      loss.push(l);
    }
  }
  const m = last?.metrics ?? {};
  return {
    summary: {
      rank,
      step: num(last?.step) ?? num(m.step),
      total: num(m.total) ?? num(m.total_steps) ?? num(m.steps),
      loss: loss.length ? loss[loss.length - 1] : null
    },
    loss
  };
}

function rankData(run: IRun): { ranks: IRunRank[]; lossByRank: Map<number, number[]> } {
  const lossByRank = new Map<number, number[]>();
  const raw = run.ranks;
  if (!raw) {
    return { ranks: [], lossByRank };
  }
  const entries: [number, IRunRank | IRankReport[]][] = Array.isArray(raw)
    ? raw.map(r => [r.rank, r] as [number, IRunRank])
    : Object.entries(raw).map(([k, v]) => [Number(k), v] as [number, IRunRank | IRankReport[]]);
  const ranks = entries.map(([rank, value]) => {
    if (Array.isArray(value)) {
      const { summary, loss } = summarise(rank, value);
      lossByRank.set(rank, loss);
      return summary;
    }
    return { ...value, rank: typeof value.rank === 'number' ? value.rank : rank };
  });
  return { ranks: ranks.sort((a, b) => a.rank - b.rank), lossByRank };
}

/**
 * A run's per-rank progress (0..1) and its loss curve (rank 0's, else every report's). Progress is
 * step/total when a total is reported, else relative to the furthest rank (ranks of a synchronous run
 * should move together: a lagging bar is the signal).
 */
export function runView(run: IRun, me: string): IRunView {
  const { ranks: rankList, lossByRank } = rankData(run);
  const furthest = Math.max(0, ...rankList.map(r => num(r.step) ?? 0));
  const ranks = rankList.map(r => {
    let progress: number | null = null;
    if (typeof r.progress === 'number') {
      progress = r.progress;
    } else if (typeof r.step === 'number' && typeof r.total === 'number' && r.total > 0) {
      progress = r.step / r.total;
    } else if (typeof r.step === 'number' && furthest > 0) {
      progress = r.step / furthest;
    }
    if (progress !== null) {
      progress = Math.min(1, Math.max(0, progress));
    }
    const parts: string[] = [];
    if (typeof r.step === 'number') {
      parts.push(typeof r.total === 'number' ? `step ${r.step}/${r.total}` : `step ${r.step}`);
    }
    if (typeof r.loss === 'number') {
      parts.push(`loss ${r.loss.toPrecision(3)}`);
    }
    return { rank: r.rank, progress, label: parts.join(' · '), state: r.state || '' };
  });
  let loss: number[];
  if (lossByRank.size) {
    loss = lossByRank.get(0) ?? [...lossByRank.values()][0];
  } else {
    const metrics = (run.metrics ?? []).filter(m => typeof m.loss === 'number');
    const rankZero = metrics.filter(m => m.rank === undefined || m.rank === 0);
    loss = (rankZero.length ? rankZero : metrics).map(m => m.loss as number);
  }
  const title = run.name || run.cell || run.notebook || run.id;
  const worldSize = run.world_size ?? ranks.length;
  return {
    id: run.id,
    title: worldSize ? `${title} (${worldSize} GPUs)` : title,
    user: run.user ?? '',
    mine: run.user === me,
    state: `${run.state || 'running'}${run.attempt ? ` (retry ${run.attempt})` : ''}`,
    ranks,
    loss
  };
}

/** The default fraction, validated: a number in (0, 1] or a whole number of GPUs, else null. */
export function validFraction(value: unknown): number | null {
  if (typeof value !== 'number' || !isFinite(value) || value <= 0) {
    return null;
  }
  if (value > 1 && Math.floor(value) !== value) {
    return null;
  }
  return value;
}

const MiB = 2 ** 20;
const GiB = 2 ** 30;
/*
 * The right-sizing rule is jupyter_gpu/rightsizing.py's (the kernel's hint and %gpu status use it), repeated
 * here so that the panel and the notebook never suggest different sizes for the same session.
 */
/** A session that peaked under this share of its reservation was over-sized. */
const OVERSIZED_BELOW = 0.25;
/** Below this reservation the saving is not worth a hint. */
const MIN_RESERVED_FOR_HINT = GiB;
/** Headroom over the measured peak: the peak excludes the CUDA context and varies between runs. */
const HEADROOM = 1.25;
/** The smallest ``--memory`` suggested. */
const MIN_SUGGESTION = 256 * MiB;

/**
 * The ``--memory`` to suggest for a session that peaked at ``peakBytes``: the smallest power of two (256 MiB,
 * 512 MiB, 1 GiB, 2 GiB, ...) that is at least 1.25 x the peak. Powers of two keep suggestions few and easy
 * to read, and the packer places such requests without leaving odd gaps.
 */
export function suggestMemory(peakBytes: number): number {
  const need = Math.max(MIN_SUGGESTION, Math.floor(Math.max(0, peakBytes) * HEADROOM));
  let size = MIN_SUGGESTION;
  while (size < need) {
    size *= 2;
  }
  return size;
}

/** A size as the magic's ``--memory`` reads it: ``512MiB``, ``1GiB``, ``1.5GiB``. */
export function formatMemoryOption(bytes: number): string {
  const trim = (v: number) => String(Math.round(v * 100) / 100);
  return bytes >= GiB ? `${trim(bytes / GiB)}GiB` : `${trim(bytes / MiB)}MiB`;
}

/**
 * The right-sizing hint of a session that reserved ``reservedBytes`` and peaked at ``peakBytes``, or null.
 * It speaks only when the peak is known and under a quarter of a reservation of at least 1 GiB: memory
 * reserved and unused is memory others wait for, while a small miss is not worth nagging about.
 */
export function rightSizeHint(peakBytes: number | null, reservedBytes: number): string | null {
  if (peakBytes === null || !isFinite(peakBytes) || !(reservedBytes >= MIN_RESERVED_FOR_HINT)) {
    return null;
  }
  const peak = Math.max(0, peakBytes);
  if (peak >= reservedBytes * OVERSIZED_BELOW) {
    return null;
  }
  const suggestion = suggestMemory(peak);
  if (suggestion >= reservedBytes) {
    return null;
  }
  return `used ${formatBytes(peak)} of ${formatBytes(reservedBytes)}: ask --memory ${formatMemoryOption(
    suggestion
  )} next time`;
}

/** ``peak X of Y reserved``, or ``Y reserved`` while no peak has been measured (no CUDA use yet). */
export function usageText(peakBytes: number | null, reservedBytes: number): string {
  const reserved = `${formatBytes(reservedBytes)} reserved`;
  return peakBytes === null ? reserved : `peak ${formatBytes(peakBytes)} of ${reserved}`;
}

/** A quantity of GPUs as the quota file writes it: ``0.5``, ``1``, ``2.25``. */
function gpus(value: number): string {
  return formatShare(value);
}

const EPS = 1e-6;

/**
 * The team whose quota holds ``me``, by the broker's own rules: a user entry names it, else a team that lists
 * me as a member, else the default team (where users named nowhere land).
 */
export function myTeamOf(quotas: IQuotas, me: string): string | null {
  const entry = (quotas.users ?? []).find(u => u.user === me);
  if (entry) {
    return entry.team;
  }
  const member = (quotas.teams ?? []).find(t => (t.members ?? []).includes(me));
  if (member) {
    return member.team;
  }
  return quotas.default_team ?? null;
}

/** One team's row: its numbers, its bar's geometry, and whether it is borrowing (over its guarantee). */
export function teamQuotaRow(team: IQuotaTeam, mine: boolean): ITeamQuotaView {
  const guarantee = Math.max(0, team.guarantee ?? 0);
  const limit = typeof team.limit === 'number' ? team.limit : null;
  const held = Math.max(0, team.held ?? 0);
  // With a limit the bar is the limit; without, it grows with use so that borrowing shows beyond the tick.
  const scale = Math.max(limit ?? 0, guarantee, held) || 1;
  const text = `${gpus(held)} of ${gpus(guarantee)} GPU guaranteed${limit !== null ? ` · limit ${gpus(limit)}` : ''}`;
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
    return { configured: false, teams: [], myTeam: null, myHeld: myShare, myLimit: null, identity: null };
  }
  const entry = (quotas.users ?? []).find(u => u.user === me);
  return {
    configured: true,
    teams: teamQuotaRows(quotas, me),
    myTeam: myTeamOf(quotas, me),
    myHeld: entry ? entry.held : myShare,
    myLimit: entry && typeof entry.limit === 'number' ? entry.limit : null,
    identity: quotas.identity ?? null
  };
}

/** The line under the Quotas rows about me: what I hold and my own limit inside the team. */
export function myQuotaText(q: IQuotaView): string {
  const held = `${gpus(q.myHeld)} GPU held`;
  const limit = q.myLimit !== null ? `your limit ${gpus(q.myLimit)} GPU` : 'no limit of your own';
  return `${held} · ${limit}`;
}

const EMPTY: Omit<IViewModel, 'state' | 'me'> = {
  error: null,
  address: null,
  virtual: false,
  scalable: false,
  embedded: false,
  workers: 0,
  defaultFraction: null,
  gpus: [],
  queue: [],
  sessions: [],
  inHostMemory: [],
  runs: [],
  quotas: null,
  tokenMissing: false,
  myShare: 0,
  myQueued: 0,
  poolLeased: 0,
  poolTotal: 0
};

/**
 * The whole view model from one snapshot. ``now`` is in seconds (like the snapshot's ``time``); elapsed
 * times use the snapshot's own clock when present so that a skewed browser clock cannot show negative ages.
 */
export function buildViewModel(snapshot: ISnapshot | null, nowSeconds: number, meOverride?: string): IViewModel {
  if (!snapshot) {
    return { ...EMPTY, state: 'loading', me: meOverride ?? '' };
  }
  const me = meOverride ?? snapshot.me ?? '';
  if (snapshot.state === 'no-pool') {
    return { ...EMPTY, state: 'no-pool', me };
  }
  if (snapshot.state === 'unreachable') {
    return {
      ...EMPTY,
      state: 'unreachable',
      me,
      error: snapshot.error ?? 'the pool does not answer',
      address: snapshot.address ?? null
    };
  }
  const now = typeof snapshot.time === 'number' ? snapshot.time : nowSeconds;
  const gpus = (snapshot.gpus ?? []).map(g => gpuView(g, me));

  // A lease spanning several GPUs (a gang rank or whole GPUs) is listed under each: one session per id.
  const sessions = new Map<string, ISessionView>();
  let myShare = 0;
  let poolLeased = 0;
  let poolTotal = 0;
  for (const gpu of snapshot.gpus ?? []) {
    const view = gpus.find(g => g.id === gpu.id)!;
    if (view.totalBytes) {
      poolTotal += 1;
      poolLeased += Math.min(1, view.leasedBytes / view.totalBytes);
    }
    for (const lease of gpu.leases ?? []) {
      if (lease.user !== me) {
        continue;
      }
      const seg = view.segments.find(s => s.leaseId === lease.id);
      myShare += seg ? seg.share : 0;
      const existing = sessions.get(lease.id);
      const gpuLabel = gpu.host ? `${gpu.index}@${gpu.host}` : String(gpu.index);
      if (existing) {
        existing.gpus.push(gpuLabel);
        continue;
      }
      sessions.set(lease.id, {
        id: lease.id,
        gpus: [gpuLabel],
        notebook: lease.notebook ?? null,
        cell: lease.cell ?? null,
        state: lease.state || 'unknown',
        elapsed: formatDuration(typeof lease.started === 'number' ? now - lease.started : null),
        peak: typeof lease.peak_bytes === 'number' ? formatBytes(lease.peak_bytes) : '–',
        peakBytes: typeof lease.peak_bytes === 'number' ? lease.peak_bytes : null,
        bytes: lease.bytes ?? 0,
        isolation: lease.isolation || 'none',
        usage: '',
        rightSize: null,
        preemptible: !!lease.preemptible
      });
    }
  }
  for (const s of sessions.values()) {
    s.usage = usageText(s.peakBytes, s.bytes);
    // --memory sizes one GPU's share: a session spanning GPUs (a gang rank, whole GPUs) gets no suggestion
    s.rightSize = s.gpus.length === 1 ? rightSizeHint(s.peakBytes, s.bytes) : null;
  }
  const queue: IQueueView[] = [...(snapshot.queue ?? [])]
    .sort((a, b) => a.position - b.position)
    .map(q => ({
      id: q.id,
      position: q.position,
      user: q.user,
      mine: q.user === me,
      request: q.request,
      reason: q.reason,
      eta: typeof q.eta === 'number' ? formatDuration(q.eta - now) : 'unknown',
      waited: formatDuration(typeof q.since === 'number' ? now - q.since : null),
      notebook: q.notebook ?? null
    }));
  const pool = snapshot.pool ?? {};
  return {
    state: 'ok',
    me,
    error: null,
    address: pool.address ?? null,
    virtual: !!pool.virtual || gpus.some(g => g.badge === 'virtual'),
    // the Scale button is for users the pool lets scale (older servers send no can_scale: scalable decides)
    scalable: pool.can_scale ?? !!pool.scalable,
    embedded: !!pool.embedded,
    workers: pool.workers ?? 0,
    defaultFraction: validFraction(pool.default_fraction),
    gpus,
    queue,
    sessions: [...sessions.values()],
    inHostMemory: (snapshot.in_host_memory ?? []).filter(p => p.user === me).map(p => parkedView(p, now)),
    runs: (snapshot.runs ?? []).map(r => runView(r, me)),
    quotas: quotaView(snapshot.quotas, me, Math.round(myShare * 1000) / 1000),
    tokenMissing: snapshot.quotas?.identity === 'tokens' && snapshot.token_set === false,
    myShare: Math.round(myShare * 1000) / 1000,
    myQueued: queue.filter(q => q.mine).length,
    poolLeased: Math.round(poolLeased * 1000) / 1000,
    poolTotal
  };
}

/** The status bar's short text: my share of the pool and whether I wait. */
export function statusText(vm: IViewModel): string {
  switch (vm.state) {
    case 'loading':
      return 'GPU: …';
    case 'no-pool':
      return 'GPU: no pool';
    case 'unreachable':
      return 'GPU: pool unreachable';
  }
  const parts = [`GPU: ${formatShare(vm.myShare)} of ${vm.poolTotal}`];
  if (vm.myQueued) {
    const first = vm.queue.find(q => q.mine);
    parts.push(`${vm.myQueued} queued${first ? ` (#${first.position})` : ''}`);
  }
  return parts.join(' · ');
}

/** The scale request body from the dialog's fields, or an error message for the dialog to show. */
export function scaleRequest(
  mode: 'manual' | 'adaptive',
  fields: { n?: string; minimum?: string; maximum?: string }
): { body: { n: number } | { minimum: number; maximum: number } } | { error: string } {
  const whole = (text: string | undefined, name: string): number | string => {
    const value = Number((text ?? '').trim());
    if ((text ?? '').trim() === '' || !Number.isInteger(value) || value < 0) {
      return `${name} must be a whole number of workers (0 or more)`;
    }
    return value;
  };
  if (mode === 'manual') {
    const n = whole(fields.n, 'Workers');
    return typeof n === 'string' ? { error: n } : { body: { n } };
  }
  const minimum = whole(fields.minimum, 'Minimum');
  if (typeof minimum === 'string') {
    return { error: minimum };
  }
  const maximum = whole(fields.maximum, 'Maximum');
  if (typeof maximum === 'string') {
    return { error: maximum };
  }
  if (minimum > maximum) {
    return { error: `Minimum (${minimum}) must not exceed maximum (${maximum})` };
  }
  return { body: { minimum, maximum } };
}

/**
 * How a lease's notebook is shown. This server's kernels are mapped to server paths (notebooks.ts); other
 * kernels report an absolute path on their own machine, which would only be cut off in a narrow panel,
 * so those show their file name (the full path stays in the tooltip).
 */
export function notebookLabel(path: string | null | undefined): string | null {
  if (!path) {
    return null;
  }
  const absolute = path.startsWith('/') || /^[A-Za-z]:[\\/]/.test(path);
  return absolute ? path.split(/[\\/]/).pop() || path : path;
}

/** How one of my sessions in host memory reads in the panel. */
export function parkedView(p: IParked, nowSeconds: number): IParkedView {
  const names = p.saved ?? [];
  const size = typeof p.bytes === 'number' ? `, ${formatBytes(p.bytes)}` : '';
  const moved = p.standby
    ? ', moved at once from its standby copy'
    : typeof p.move_seconds === 'number'
      ? `, moved in ${p.move_seconds.toFixed(1)} s`
      : '';
  return {
    id: p.id,
    notebook: p.notebook ?? null,
    cell: p.cell ?? null,
    what:
      p.state === 'pending'
        ? 'being moved to host memory'
        : `${names.length} variable${names.length === 1 ? '' : 's'}${size}${moved}`,
    since: formatDuration(typeof p.since === 'number' ? nowSeconds - p.since : null),
    reason: p.reason ?? null,
    lost: p.lost ?? []
  };
}
