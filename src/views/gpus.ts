/**
 * One GPU card's view: its memory split by lease (one coloured segment per lease), its utilisation and
 * memory series for the sparklines, and the badge that says a GPU is virtual or a MIG slice.
 */
import { formatBytes, formatShare, notebookLabel } from '../format';
import { IGpu, IHost, ILease } from '../wire';

/** One coloured segment of a GPU's memory bar, and its row in the card's lease list. */
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
  /** A rank of a ``--workers`` run: ``rank 1 of 2`` (its cell label is the same on every rank). */
  rank: string | null;
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

function gpuTitle(gpu: IGpu): string {
  return gpu.name || `GPU ${gpu.index}`;
}

function badgeOf(gpu: IGpu): IGpuView['badge'] {
  if (gpu.virtual) {
    return 'virtual';
  }
  return gpu.mig ? 'MIG' : null;
}

/** The lease's bytes on the GPU it is listed under. */
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
      preemptible: !!lease.preemptible,
      rank: (lease.world_size ?? 1) > 1 ? `rank ${lease.rank ?? 0} of ${lease.world_size}` : null
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

/** Where a lease runs, as its row reads: ``train.ipynb › fit · rank 1 of 2`` (a notebook's path in full). */
export function segmentWhere(s: ISegmentView): string {
  const where = [notebookLabel(s.notebook), s.cell].filter(Boolean).join(' › ');
  return [where, s.rank].filter(Boolean).join(' · ');
}

/** A segment's tooltip (on the memory bar and on its lease row): who, where, how much, how isolated. */
export function segmentTitle(s: ISegmentView): string {
  const where = [[s.notebook, s.cell].filter(Boolean).join(' › '), s.rank].filter(Boolean).join(' · ');
  const fraction = s.fraction !== null ? `${formatShare(s.fraction)} GPU` : formatBytes(s.bytes);
  return `${s.user}${where ? ` – ${where}` : ''}: ${fraction} (${formatBytes(s.bytes)}), isolation ${s.isolation}, ${
    s.state
  }${s.preemptible ? ', preemptible' : ''}`;
}

/** Whole-pool totals in GPU-equivalents, each GPU counting 1 whatever its size. */
export interface IPoolShares {
  /** My leased memory: the sum over GPUs of my bytes / that GPU's total. */
  myShare: number;
  /** Leased memory of everyone, the same way. */
  poolLeased: number;
  /** GPUs with a known size. */
  poolTotal: number;
}

/** Rounded to a thousandth, so that sums of shares read as the quota file writes GPUs. */
function round3(value: number): number {
  return Math.round(value * 1000) / 1000;
}

/** My share and the pool's, from the GPU views (a lease over several GPUs counts on each). */
export function poolShares(gpus: IGpuView[]): IPoolShares {
  let myShare = 0;
  let poolLeased = 0;
  let poolTotal = 0;
  for (const gpu of gpus) {
    if (gpu.totalBytes) {
      poolTotal += 1;
      poolLeased += Math.min(1, gpu.leasedBytes / gpu.totalBytes);
    }
    for (const s of gpu.segments) {
      myShare += s.mine ? s.share : 0;
    }
  }
  return { myShare: round3(myShare), poolLeased: round3(poolLeased), poolTotal };
}

/** The GPUs of one machine, for the GPU list's groups. */
export interface IHostGroup {
  host: string;
  gpus: IGpuView[];
  totalBytes: number;
  leasedBytes: number;
  /** Its host memory and cores as the header says them (null: the broker sent none). */
  resources: string | null;
  /** Its workers report what they leave to sessions (memory or cores): worth a header alone. */
  bounded: boolean;
}

/**
 * A machine's host memory and cores for its header: what its sessions' leases book of what it leaves to
 * sessions, what idle sessions' copies hold in memory and on disk, and cores booked of its cores
 * (``64.0 GiB of 256.0 GiB host memory booked, 2.0 GiB parked · 6 of 32 cores``). Null when the broker
 * sends none (an older broker).
 */
export function hostResources(host: IHost | undefined): string | null {
  if (!host || host.host_memory_leased === undefined) {
    return null;
  }
  const booked = formatBytes(host.host_memory_leased);
  const memory =
    host.host_memory === null || host.host_memory === undefined
      ? `${booked} host memory booked (no limit)`
      : `${booked} of ${formatBytes(host.host_memory)} host memory booked`;
  const parked = host.host_memory_parked ? `, ${formatBytes(host.host_memory_parked)} parked` : '';
  const spilled = host.host_memory_spilled ? `, ${formatBytes(host.host_memory_spilled)} on disk` : '';
  const leased = +(host.cpus_leased ?? 0).toFixed(3);
  const cores =
    host.cpus === null || host.cpus === undefined
      ? `${leased} cores booked (no limit)`
      : `${leased} of ${+host.cpus.toFixed(3)} cores`;
  return `${memory}${parked}${spilled} · ${cores}`;
}

/**
 * The GPUs grouped by machine, in the snapshot's order (the broker lists them by host, then worker, then
 * index); one group per host. The list draws groups only when the pool spans several hosts.
 */
export function hostGroups(gpus: IGpuView[], hosts: IHost[] = []): IHostGroup[] {
  const groups: IHostGroup[] = [];
  const byHost = new Map<string, IHostGroup>();
  const sent = new Map(hosts.map(h => [h.host, h]));
  for (const gpu of gpus) {
    let group = byHost.get(gpu.host);
    if (!group) {
      const host = sent.get(gpu.host);
      group = {
        host: gpu.host,
        gpus: [],
        totalBytes: 0,
        leasedBytes: 0,
        resources: hostResources(host),
        bounded: typeof host?.host_memory === 'number' || typeof host?.cpus === 'number'
      };
      byHost.set(gpu.host, group);
      groups.push(group);
    }
    group.gpus.push(gpu);
    group.totalBytes += gpu.totalBytes;
    group.leasedBytes += gpu.leasedBytes;
  }
  return groups;
}
