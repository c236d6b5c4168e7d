/**
 * Scale-out runs (``%%gpu --workers N``): a progress bar per rank and a loss curve, from what the ranks
 * reported with ``jupyter_gpu.report(step=..., loss=...)``, and when each run started and how long it took.
 *
 * Every run of a cell has a run id of its own (a rerun is a new run, not more points on the old curve), and
 * the newest run comes first. Steps read as the notebook's progress bar reads them
 * (jupyter_gpu/kernelext/progress_bar.py): a loop that reported ``step=0`` first counts from zero, so its last
 * step ``total - 1`` is ``total/total`` done, and so is a finished run whose last step is ``total - 1``.
 */
import { formatClock, formatDuration, notebookLabel } from '../format';
import { IRankReport, IRun, IRunRank } from '../wire';

/** One rank's row: its progress (0..1, null when unknown) and a ``5/10 steps · loss 0.500`` label. */
export interface IRankView {
  rank: number;
  progress: number | null;
  label: string;
  state: string;
}

export interface IRunView {
  id: string;
  title: string;
  /** ``train.ipynb · started 14:03:12 · took 8s`` (or ``running for 5s``). */
  subtitle: string;
  user: string;
  mine: boolean;
  state: string;
  /** Epoch seconds (for ordering: newest first), null when unknown. */
  started: number | null;
  ranks: IRankView[];
  loss: number[];
}

function num(value: unknown): number | null {
  return typeof value === 'number' && isFinite(value) ? value : null;
}

interface IRankSummary extends IRunRank {
  /** The first step the rank reported (0: it counts from zero). */
  firstStep?: number | null;
}

/** A rank's summary from its report stream: the first and last step, loss and (if reported) total steps. */
function summarise(rank: number, reports: IRankReport[]): { summary: IRankSummary; loss: number[] } {
  const loss: number[] = [];
  let last: IRankReport | undefined;
  let firstStep: number | null = null;
  for (const r of reports) {
    last = r;
    if (firstStep === null) {
      firstStep = num(r.step);
    }
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
      loss: loss.length ? loss[loss.length - 1] : null,
      firstStep
    },
    loss
  };
}

/** Each rank's summary (sorted by rank) and, where ranks sent report streams, each one's loss series. */
function rankData(run: IRun): { ranks: IRankSummary[]; lossByRank: Map<number, number[]> } {
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

/** Steps done: the last step, plus one for a loop counting from zero (see the module docstring). */
export function stepsDone(r: IRankSummary, finished: boolean): number | null {
  if (typeof r.step !== 'number') {
    return null;
  }
  const total = typeof r.total === 'number' ? r.total : null;
  const zeroBased = r.firstStep === 0 || (finished && total !== null && r.step === total - 1);
  return zeroBased ? r.step + 1 : r.step;
}

/** ``train.ipynb · started 14:03:12 · took 8s``; ``running for 5s`` while it runs. */
function subtitle(run: IRun, now: number): string {
  const parts: string[] = [];
  const where = notebookLabel(run.notebook);
  if (where) {
    parts.push(where);
  }
  const started = num(run.started);
  if (started !== null) {
    parts.push(`started ${formatClock(started)}`);
    const ended = num(run.ended);
    const running = (run.state ?? 'running') === 'running';
    if (ended !== null && !running) {
      parts.push(`took ${formatDuration(ended - started)}`);
    } else if (running) {
      parts.push(`running for ${formatDuration(now - started)}`);
    }
  }
  if (run.resumes) {
    parts.push(`resumes ${run.resumes}`);
  }
  return parts.join(' · ');
}

/**
 * A run's per-rank progress (0..1) and its loss curve (rank 0's, else every report's). Progress is
 * done/total when a total is reported, else relative to the furthest rank (ranks of a synchronous run
 * should move together: a lagging bar is the signal). ``now`` (seconds) times a running run.
 */
export function runView(run: IRun, me: string, now: number = Date.now() / 1000): IRunView {
  const { ranks: rankList, lossByRank } = rankData(run);
  const finished = !!run.state && run.state !== 'running';
  const done = rankList.map(r => stepsDone(r, finished));
  const furthest = Math.max(0, ...done.map(d => d ?? 0));
  const ranks = rankList.map((r, i) => {
    const steps = done[i];
    let progress: number | null = null;
    if (typeof r.progress === 'number') {
      progress = r.progress;
    } else if (steps !== null && typeof r.total === 'number' && r.total > 0) {
      progress = steps / r.total;
    } else if (steps !== null && furthest > 0) {
      progress = steps / furthest;
    }
    if (progress !== null) {
      progress = Math.min(1, Math.max(0, progress));
    }
    const parts: string[] = [];
    if (steps !== null) {
      parts.push(typeof r.total === 'number' ? `${steps}/${r.total} steps` : `step ${r.step}`);
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
    subtitle: subtitle(run, now),
    user: run.user ?? '',
    mine: run.user === me,
    state: `${run.state || 'running'}${run.attempt ? ` (retry ${run.attempt})` : ''}`,
    started: num(run.started),
    ranks,
    loss
  };
}

/** The runs, newest first (the broker keeps them oldest first). */
export function runViews(runs: IRun[], me: string, now: number): IRunView[] {
  return runs
    .map((r, i) => ({ view: runView(r, me, now), order: i }))
    .sort((a, b) => (b.view.started ?? -Infinity) - (a.view.started ?? -Infinity) || b.order - a.order)
    .map(x => x.view);
}
