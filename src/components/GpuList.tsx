import * as React from 'react';

import { formatBytes } from '../format';
import { IGpuView, IHostGroup } from '../views/gpus';
import { UsageHistory } from '../views/history';
import { GpuCard } from './GpuCard';
import { chartSpan } from './TimeChart';

/**
 * The GPUs section: a card per GPU, in the broker's order (by host, worker, then index), charts on one time
 * axis. When the pool spans several machines the cards are grouped under a heading per host, with that
 * host's GPU memory leased and total, and its host memory and cores (booked, parked copies, total); a
 * one-machine pool draws them above its cards once its worker reports what it leaves to sessions.
 */
export function GpuList(props: { gpus: IGpuView[]; history: UsageHistory; groups?: IHostGroup[] }): JSX.Element {
  const { gpus, history } = props;
  const groups = props.groups ?? [];
  const span = chartSpan(
    gpus.map(g => history.gpu(g.id).util),
    history.now,
    history.window
  );
  const card = (g: IGpuView) => <GpuCard key={g.id} gpu={g} history={history.gpu(g.id)} span={span} />;
  let body: React.ReactNode;
  if (!gpus.length) {
    body = <div className="jp-GpuPanel-empty">No GPU workers yet.</div>;
  } else if (groups.length > 1 || groups[0]?.bounded) {
    body = groups.map(group => (
      <div className="jp-GpuPanel-hostGroup" key={group.host} data-host={group.host}>
        <div className="jp-GpuPanel-hostHeader">
          <span className="jp-GpuPanel-hostName">{group.host}</span>
          <span className="jp-GpuPanel-hostSummary">
            {group.gpus.length} GPU{group.gpus.length === 1 ? '' : 's'} · {formatBytes(group.leasedBytes)} of{' '}
            {formatBytes(group.totalBytes)} leased
          </span>
        </div>
        {group.resources ? <div className="jp-GpuPanel-hostResources">{group.resources}</div> : null}
        {group.gpus.map(card)}
      </div>
    ));
  } else {
    body = gpus.map(card);
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
