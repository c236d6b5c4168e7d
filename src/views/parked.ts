/** My sessions moved to host memory (suspended, reclaimed or timed out), as the panel lists them. */
import { formatBytes, formatDuration } from '../format';
import { IParked } from '../wire';

/** One of my sessions waiting in host memory; my next ``%%gpu`` cell in its notebook brings it back. */
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

/** How one of my sessions in host memory reads in the panel. */
export function parkedView(p: IParked, nowSeconds: number): IParkedView {
  const names = p.saved ?? [];
  const size = typeof p.bytes === 'number' ? `, ${formatBytes(p.bytes)}` : '';
  const moved = p.standby
    ? ', moved at once from its standby copy'
    : typeof p.move_seconds === 'number'
      ? `, moved in ${p.move_seconds.toFixed(1)} s`
      : '';
  const disk = p.spilled ? ', on disk (host memory was short)' : '';
  return {
    id: p.id,
    notebook: p.notebook ?? null,
    cell: p.cell ?? null,
    what:
      p.state === 'pending'
        ? 'being moved to host memory'
        : `${names.length} variable${names.length === 1 ? '' : 's'}${size}${moved}${disk}`,
    since: formatDuration(typeof p.since === 'number' ? nowSeconds - p.since : null),
    reason: p.reason ?? null,
    lost: p.lost ?? []
  };
}

/** Only mine: the broker lists everyone's, and only the owner's next cell can bring a session back. */
export function myParked(parked: IParked[], me: string, nowSeconds: number): IParkedView[] {
  return parked.filter(p => p.user === me).map(p => parkedView(p, nowSeconds));
}
