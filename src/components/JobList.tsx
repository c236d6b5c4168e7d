import * as React from 'react';

import { formatDuration } from '../format';
import { IClusterView } from '../views/jobs';

/**
 * The cluster manager's jobs that are not GPUs yet, or no longer: pending ones with the manager's own state
 * and reason (Slurm: ``PENDING (Resources)``) and the ones that ended by themselves. Nothing when there are
 * none.
 */
export function JobList(props: { cluster: IClusterView | null }): JSX.Element | null {
  const { cluster } = props;
  if (!cluster || (!cluster.pending.length && !cluster.ended.length)) {
    return null;
  }
  return (
    <section className="jp-GpuPanel-section jp-GpuPanel-jobs">
      <h3>
        Jobs of {cluster.manager}
        {cluster.mode ? ` · ${cluster.mode}` : ''}
      </h3>
      {cluster.pending.map(j => (
        <div className="jp-GpuPanel-job jp-mod-pending" key={`p-${j.label}`}>
          <span className="jp-GpuPanel-jobLabel">{j.label}</span>
          <span className="jp-GpuPanel-jobStatus">{j.status}</span>
          {j.age !== null ? <span className="jp-GpuPanel-jobAge">for {formatDuration(j.age)}</span> : null}
        </div>
      ))}
      {cluster.ended.map(j => (
        <div className="jp-GpuPanel-job jp-mod-ended" key={`e-${j.label}`}>
          <span className="jp-GpuPanel-jobLabel">{j.label}</span>
          <span className="jp-GpuPanel-jobStatus">ended: {j.status}</span>
          {j.age !== null ? <span className="jp-GpuPanel-jobAge">{formatDuration(j.age)} ago</span> : null}
        </div>
      ))}
    </section>
  );
}
