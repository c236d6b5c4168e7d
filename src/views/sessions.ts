/**
 * "My sessions": one row per lease of mine, however many GPUs it spans, with its usage and the broker's
 * right-sizing hint.
 */
import { formatBytes, formatDuration } from '../format';
import { IGpu, ILease } from '../wire';

export interface ISessionView {
  id: string;
  /** Whose session: mine, or (for the pool's administrators) another user's. */
  user: string;
  mine: boolean;
  /** Where it runs: ``<index>@<host>`` per GPU. */
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
  /**
   * A smaller ``--memory`` to ask for next time, as the broker words it (the lease's ``right_size``): the
   * rule lives in jupyter_gpu/common/rightsizing.py, so the panel and the notebook never disagree.
   */
  rightSize: string | null;
  /** Granted beyond the team's guarantee: the pool may reclaim it for a team that is owed its guarantee. */
  preemptible: boolean;
  /**
   * It has run a cell (or runs one): its namespace holds what the notebook's %%gpu cells built, which ending
   * the session loses, so the panel asks before its Cancel ends it.
   */
  holdsVariables: boolean;
}

/** Whether a lease's session has run (or runs) a cell: a measured peak, a cell running or one started. */
export function ranCells(lease: ILease): boolean {
  return (
    typeof lease.peak_bytes === 'number' ||
    lease.state === 'running' ||
    typeof lease.cell_started === 'number' ||
    (lease.resident_bytes ?? 0) > 0
  );
}

/** ``peak X of Y reserved``, or ``Y reserved`` while no peak has been measured (no CUDA use yet). */
export function usageText(peakBytes: number | null, reservedBytes: number): string {
  const reserved = `${formatBytes(reservedBytes)} reserved`;
  return peakBytes === null ? reserved : `peak ${formatBytes(peakBytes)} of ${reserved}`;
}

/** How a GPU is named in a session row: its index, and its host when known. */
function gpuLabel(gpu: IGpu): string {
  return gpu.host ? `${gpu.index}@${gpu.host}` : String(gpu.index);
}

/**
 * My sessions, in snapshot order; with ``everyone`` (the pool's administrators), every user's, mine first. A
 * lease over several GPUs (whole GPUs) is listed under each of them in the snapshot: it is one session here,
 * with all its GPUs. Elapsed times count from ``now`` (seconds).
 */
export function mySessions(gpus: IGpu[], me: string, now: number, everyone = false): ISessionView[] {
  const sessions = new Map<string, ISessionView>();
  for (const gpu of gpus) {
    for (const lease of gpu.leases ?? []) {
      if (lease.user !== me && !everyone) {
        continue;
      }
      const existing = sessions.get(lease.id);
      if (existing) {
        existing.gpus.push(gpuLabel(gpu));
        continue;
      }
      const peakBytes = typeof lease.peak_bytes === 'number' ? lease.peak_bytes : null;
      const bytes = lease.bytes ?? 0;
      sessions.set(lease.id, {
        id: lease.id,
        user: lease.user,
        mine: lease.user === me,
        gpus: [gpuLabel(gpu)],
        notebook: lease.notebook ?? null,
        cell: lease.cell ?? null,
        state: lease.state || 'unknown',
        elapsed: formatDuration(typeof lease.started === 'number' ? now - lease.started : null),
        peak: peakBytes !== null ? formatBytes(peakBytes) : '–',
        peakBytes,
        bytes,
        isolation: lease.isolation || 'none',
        usage: usageText(peakBytes, bytes),
        rightSize: lease.right_size ?? null,
        preemptible: !!lease.preemptible,
        holdsVariables: ranCells(lease)
      });
    }
  }
  const all = [...sessions.values()];
  return [...all.filter(s => s.mine), ...all.filter(s => !s.mine)];
}
