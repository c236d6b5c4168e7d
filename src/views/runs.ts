/**
 * Scale-out runs (``%%gpu --workers N``): a progress bar per rank and a loss curve, from what the ranks
 * reported with ``jupyter_gpu.report(step=..., loss=...)``.
 */
import { IRankReport, IRun, IRunRank } from '../wire';

/** One rank's row: its progress (0..1, null when unknown) and a ``step 5/10 · loss 0.500`` label. */
export interface IRankView {
  rank: number;
  progress: number | null;
  label: string;
  state: string;
}

export interface IRunView {
  id: string;
  title: string;
  user: string;
  mine: boolean;
  state: string;
  ranks: IRankView[];
  loss: number[];
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

/** Each rank's summary (sorted by rank) and, where ranks sent report streams, each one's loss series. */
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
