/**
 * The cluster manager's jobs as the panel shows them: those on their way (pending in Slurm's queue, or
 * started but whose worker has not joined yet) with the manager's own state and reason, and those that ended
 * by themselves (walltime, node failure). Running jobs whose workers joined are the GPU list already.
 */
import { ICluster, IJob } from '../wire';

export interface IJobView {
  /** ``job 123``, or the worker name where the manager gives no id. */
  label: string;
  /** ``PENDING (Resources)``: the manager's state and reason, as its own tools print them. */
  status: string;
  /** Seconds since it was asked for (or since it ended, for ended jobs). */
  age: number | null;
}

export interface IClusterView {
  /** Who stands behind the Scale button: ``Slurm (dask_jobqueue.SLURMCluster)``. */
  manager: string;
  /** ``adaptive 0–4`` or ``4 workers``; null when never scaled. */
  mode: string | null;
  pending: IJobView[];
  ended: IJobView[];
}

function label(job: IJob): string {
  return job.job_id ? `job ${job.job_id}` : job.name;
}

/** ``PENDING (Resources)``, as squeue users read it. */
export function jobStatus(job: IJob): string {
  const state = job.state || 'submitted';
  return job.reason ? `${state} (${job.reason})` : state;
}

function kindName(kind: string | undefined): string {
  switch (kind) {
    case 'slurm':
      return 'Slurm';
    case 'embedded':
      return 'this machine';
    default:
      return 'Dask cluster manager';
  }
}

/** The panel's view of the cluster manager; null for a pool without one, or the embedded pool's. */
export function clusterView(cluster: ICluster | null | undefined, now: number): IClusterView | null {
  if (!cluster || cluster.kind === 'embedded') {
    return null;
  }
  const age = (t: number | null | undefined) => (typeof t === 'number' ? Math.max(0, now - t) : null);
  const pending = (cluster.jobs ?? [])
    .filter(j => !j.workers)
    .map(j => ({ label: label(j), status: jobStatus(j), age: age(j.since) }));
  const ended = (cluster.ended ?? []).map(j => ({ label: label(j), status: jobStatus(j), age: age(j.ended) }));
  let mode: string | null = null;
  if (cluster.adaptive) {
    mode = `adaptive ${cluster.adaptive.minimum}–${cluster.adaptive.maximum} workers`;
  } else if (typeof cluster.target === 'number') {
    mode = `${cluster.target} worker${cluster.target === 1 ? '' : 's'}`;
  }
  return {
    manager: cluster.manager ? `${kindName(cluster.kind)} (${cluster.manager})` : kindName(cluster.kind),
    mode,
    pending,
    ended
  };
}
