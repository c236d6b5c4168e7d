import * as React from 'react';

import { formatBytes } from '../format';
import { IGpuView } from '../views/gpus';
import { LeaseList } from './LeaseList';
import { MemoryBar } from './MemoryBar';
import { Sparkline } from './Sparkline';

/** One GPU: its name and badge, memory by lease, utilisation and memory sparklines, and its leases. */
export function GpuCard(props: { gpu: IGpuView }): JSX.Element {
  const { gpu } = props;
  const util = gpu.utilization !== null ? `${Math.round(gpu.utilization)}%` : '–';
  return (
    <div className="jp-GpuPanel-card" data-gpu-id={gpu.id}>
      <div className="jp-GpuPanel-cardHeader">
        <span className="jp-GpuPanel-gpuName" title={gpu.id}>
          {gpu.title}
        </span>
        {gpu.host ? <span className="jp-GpuPanel-host">{gpu.host}</span> : null}
        {gpu.badge ? (
          <span className={`jp-GpuPanel-badge jp-GpuPanel-badge-${gpu.badge.toLowerCase()}`}>{gpu.badge}</span>
        ) : null}
      </div>
      <MemoryBar gpu={gpu} />
      <div className="jp-GpuPanel-memText">
        {formatBytes(gpu.leasedBytes)} of {formatBytes(gpu.totalBytes)} leased · {formatBytes(gpu.freeBytes)} free
      </div>
      <div className="jp-GpuPanel-metrics">
        <div className="jp-GpuPanel-metric">
          <span className="jp-GpuPanel-metricLabel">util {util}</span>
          <Sparkline values={gpu.utilSeries} max={100} label="utilization" className="jp-mod-util" />
        </div>
        <div className="jp-GpuPanel-metric">
          <span className="jp-GpuPanel-metricLabel">
            mem {gpu.usedBytes !== null ? formatBytes(gpu.usedBytes) : '–'}
          </span>
          <Sparkline values={gpu.memSeries} max={1} label="memory in use" className="jp-mod-mem" />
        </div>
      </div>
      <LeaseList segments={gpu.segments} />
    </div>
  );
}
