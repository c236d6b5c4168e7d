/**
 * Usage over time, for the charts: each GPU's utilisation and memory samples, and the GPUs each user held.
 *
 * Why it is kept here: a snapshot carries only the broker's last minute of samples per GPU and what is
 * leased now. The panel receives a snapshot every second or so; keeping what they said (up to ``window``
 * seconds) gives charts that span the minutes a person looks back over, per GPU and per user, without the
 * broker keeping more for every open panel.
 */
import { ISnapshot } from '../wire';

/** One point of a series: epoch seconds and a value. */
export type Point = [number, number];

/** How far back the charts go (seconds). */
export const HISTORY_WINDOW = 15 * 60;

export interface IGpuHistory {
  /** Utilisation, percent. */
  util: Point[];
  /** Memory in use, percent of the GPU's total. */
  mem: Point[];
}

export class UsageHistory {
  constructor(readonly window: number = HISTORY_WINDOW) {}

  /** Take in a snapshot (the same one twice is harmless: samples are merged by time). */
  add(snapshot: ISnapshot | null | undefined): void {
    if (!snapshot || snapshot.state !== 'ok') {
      return;
    }
    const now = typeof snapshot.time === 'number' ? snapshot.time : Date.now() / 1000;
    this._now = Math.max(this._now, now);
    for (const gpu of snapshot.gpus ?? []) {
      const h = this._gpus.get(gpu.id) ?? { util: [], mem: [] };
      this._gpus.set(gpu.id, h);
      const last = h.util.length ? h.util[h.util.length - 1][0] : -Infinity;
      for (const s of gpu.samples ?? []) {
        if (typeof s.t !== 'number' || s.t <= last) {
          continue;
        }
        h.util.push([s.t, typeof s.utilization === 'number' ? s.utilization : 0]);
        const used = typeof s.memory_used_bytes === 'number' && gpu.total_bytes > 0 ? s.memory_used_bytes : 0;
        h.mem.push([s.t, gpu.total_bytes > 0 ? (100 * used) / gpu.total_bytes : 0]);
      }
    }
    // what each user holds now, in GPU-equivalents (a lease's bytes on a GPU / that GPU's total)
    const held = new Map<string, number>();
    for (const gpu of snapshot.gpus ?? []) {
      for (const lease of gpu.leases ?? []) {
        const bytes = typeof lease.bytes_on_gpu === 'number' ? lease.bytes_on_gpu : (lease.bytes ?? 0);
        const share = gpu.total_bytes > 0 ? bytes / gpu.total_bytes : 0;
        held.set(lease.user, (held.get(lease.user) ?? 0) + share);
      }
    }
    const lastAt = this._held.length ? this._held[this._held.length - 1].t : -Infinity;
    if (now > lastAt) {
      this._held.push({ t: now, users: held });
    }
    this._prune();
  }

  /** A GPU's samples in the window, oldest first. */
  gpu(id: string): IGpuHistory {
    return this._gpus.get(id) ?? { util: [], mem: [] };
  }

  /**
   * Per user, the GPUs held at each snapshot in the window (0 when a user held none then), users ordered
   * by the most they held. A step series: what was held lasts until the next snapshot.
   */
  users(): { user: string; points: Point[] }[] {
    const names = new Map<string, number>();
    for (const h of this._held) {
      for (const [user, share] of h.users) {
        names.set(user, Math.max(names.get(user) ?? 0, share));
      }
    }
    return [...names.entries()]
      .sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))
      .map(([user]) => ({ user, points: this._held.map(h => [h.t, round3(h.users.get(user) ?? 0)] as Point) }));
  }

  /** The newest time seen (seconds). */
  get now(): number {
    return this._now;
  }

  private _prune(): void {
    const since = this._now - this.window;
    for (const h of this._gpus.values()) {
      h.util = h.util.filter(p => p[0] >= since);
      h.mem = h.mem.filter(p => p[0] >= since);
    }
    this._held = this._held.filter(h => h.t >= since);
  }

  private _gpus = new Map<string, IGpuHistory>();
  private _held: { t: number; users: Map<string, number> }[] = [];
  private _now = 0;
}

function round3(value: number): number {
  return Math.round(value * 1000) / 1000;
}
