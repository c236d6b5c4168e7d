/** The queue as the panel lists it: in the broker's order, my requests marked, times relative to now. */
import { formatDuration } from '../format';
import { IQueueItem } from '../wire';

export interface IQueueView {
  id: string;
  position: number;
  user: string;
  mine: boolean;
  request: string;
  /** The broker's words for why it waits. */
  reason: string;
  /** Time until the broker's estimated start, or ``unknown``. */
  eta: string;
  /** What the estimate rests on, in the broker's words (``median of alice's last 12 cells: 40 s``). */
  etaNote: string | null;
  waited: string;
  notebook: string | null;
}

/** The waiting requests by position; ``now`` (seconds) is the snapshot's clock. */
export function queueViews(queue: IQueueItem[], me: string, now: number): IQueueView[] {
  return [...queue]
    .sort((a, b) => a.position - b.position)
    .map(q => ({
      id: q.id,
      position: q.position,
      user: q.user,
      mine: q.user === me,
      request: q.request,
      reason: q.reason,
      eta: typeof q.eta === 'number' ? formatDuration(q.eta - now) : 'unknown',
      etaNote: q.eta_note ?? null,
      waited: formatDuration(typeof q.since === 'number' ? now - q.since : null),
      notebook: q.notebook ?? null
    }));
}
