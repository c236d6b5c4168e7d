import * as React from 'react';

import { formatBytes } from '../format';
import { IGpuView } from '../views/gpus';
import { IGpuHistory } from '../views/history';
import { LeaseList } from './LeaseList';
import { MemoryBar } from './MemoryBar';
import { TimeChart } from './TimeChart';

export interface IGpuCardProps {
  gpu: IGpuView;
  /** Its utilisation and memory samples over the charts' span. */
  history: IGpuHistory;
  span: [number, number];
}

const PERCENT_TICKS: [number, string][] = [
  [0, '0'],
  [50, '50%'],
  [100, '100%']
];

/**
 * One GPU: its name (never cut: it wraps) and badge, its host, memory by lease, a chart of utilisation and
 * memory in use over time with its axes, and its leases.
 */
export function GpuCard(props: IGpuCardProps): JSX.Element {
  const { gpu, history } = props;
  const util = gpu.utilization !== null ? `${Math.round(gpu.utilization)}%` : '–';
  const mem = gpu.usedBytes !== null ? formatBytes(gpu.usedBytes) : '–';
  return (
    <div className="jp-GpuPanel-card" data-gpu-id={gpu.id}>
      <div className="jp-GpuPanel-cardHeader">
        <span className="jp-GpuPanel-gpuName" title={gpu.id}>
          {gpu.title}
        </span>
        {gpu.badge ? (
          <span className={`jp-GpuPanel-badge jp-GpuPanel-badge-${gpu.badge.toLowerCase()}`}>{gpu.badge}</span>
        ) : null}
      </div>
      {gpu.host ? <div className="jp-GpuPanel-host">{gpu.host}</div> : null}
      <MemoryBar gpu={gpu} />
      <div className="jp-GpuPanel-memText">
        {formatBytes(gpu.leasedBytes)} of {formatBytes(gpu.totalBytes)} leased · {formatBytes(gpu.freeBytes)} free
      </div>
      <TimeChart
        title="Utilization and memory in use"
        className="jp-mod-gpu"
        yMax={100}
        yTicks={PERCENT_TICKS}
        start={props.span[0]}
        end={props.span[1]}
        series={[
          { label: 'util', value: util, points: history.util, className: 'jp-mod-util' },
          { label: 'mem', value: mem, points: history.mem, className: 'jp-mod-mem' }
        ]}
      />
      <LeaseList segments={gpu.segments} />
    </div>
  );
}
