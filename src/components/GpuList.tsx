import * as React from 'react';

import { formatBytes } from '../format';
import { IGpuView, IHostGroup } from '../views/gpus';
import { GpuCard } from './GpuCard';

/**
 * The GPUs section: a card per GPU, in the broker's order (by host, worker, then index). When the pool spans
 * several machines the cards are grouped under a heading per host, with that host's memory leased and total.
 */
export function GpuList(props: { gpus: IGpuView[]; groups?: IHostGroup[] }): JSX.Element {
  const { gpus } = props;
  const groups = props.groups ?? [];
  let body: React.ReactNode;
  if (!gpus.length) {
    body = <div className="jp-GpuPanel-empty">No GPU workers yet.</div>;
  } else if (groups.length > 1) {
    body = groups.map(group => (
      <div className="jp-GpuPanel-hostGroup" key={group.host} data-host={group.host}>
        <div className="jp-GpuPanel-hostHeader">
          <span className="jp-GpuPanel-hostName">{group.host}</span>
          <span className="jp-GpuPanel-hostSummary">
            {group.gpus.length} GPU{group.gpus.length === 1 ? '' : 's'} · {formatBytes(group.leasedBytes)} of{' '}
            {formatBytes(group.totalBytes)} leased
          </span>
        </div>
        {group.gpus.map(g => (
          <GpuCard key={g.id} gpu={g} />
        ))}
      </div>
    ));
  } else {
    body = gpus.map(g => <GpuCard key={g.id} gpu={g} />);
  }
  return (
    <section className="jp-GpuPanel-section jp-GpuPanel-gpus">
      <h3>
        GPUs ({gpus.length}){groups.length > 1 ? ` on ${groups.length} hosts` : ''}
      </h3>
      {body}
    </section>
  );
}
