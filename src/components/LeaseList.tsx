import * as React from 'react';

import { formatBytes, formatShare } from '../format';
import { ISegmentView, segmentTitle, segmentWhere } from '../views/gpus';
import { leaseColour } from './colour';
import { PreemptibleBadge } from './PreemptibleBadge';

/**
 * The leases on one GPU card (mine first), or ``idle`` when it has none. Each row: who and how much on one
 * line, where (notebook › cell, and the rank of a --workers run) on the next, wrapped rather than cut, so
 * that leases of one notebook stay apart in a narrow side bar.
 */
export function LeaseList(props: { segments: ISegmentView[] }): JSX.Element {
  if (!props.segments.length) {
    return <div className="jp-GpuPanel-empty">idle</div>;
  }
  return (
    <ul className="jp-GpuPanel-leases">
      {props.segments.map(s => (
        <li
          key={s.leaseId}
          className={`${s.mine ? 'jp-mod-mine' : ''}${s.preemptible ? ' jp-mod-preemptible' : ''}`}
          data-lease-id={s.leaseId}
          title={segmentTitle(s)}
        >
          <div className="jp-GpuPanel-leaseMain">
            <span className="jp-GpuPanel-swatch" style={leaseColour(s.user, s.mine)} />
            <span className="jp-GpuPanel-user">{s.user}</span>
            <span className="jp-GpuPanel-fraction">
              {s.fraction !== null ? formatShare(s.fraction) : formatBytes(s.bytes)}
            </span>
            {s.preemptible ? <PreemptibleBadge /> : null}
            <span className="jp-GpuPanel-isolation">{s.isolation}</span>
          </div>
          {segmentWhere(s) ? <div className="jp-GpuPanel-where">{segmentWhere(s)}</div> : null}
        </li>
      ))}
    </ul>
  );
}
