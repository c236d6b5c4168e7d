import * as React from 'react';

import { whereLabel } from '../format';
import { IParkedView } from '../views/parked';

/** My sessions waiting in host memory, under their own heading; nothing when there are none. */
export function ParkedList(props: { parked: IParkedView[] }): JSX.Element | null {
  const { parked } = props;
  if (!parked.length) {
    return null;
  }
  return (
    <>
      <h4 className="jp-GpuPanel-parkedTitle">In host memory ({parked.length})</h4>
      <ul className="jp-GpuPanel-list jp-GpuPanel-parked">
        {parked.map(p => (
          <li key={p.id} className="jp-GpuPanel-item jp-mod-mine jp-mod-parked" data-lease-id={p.id}>
            <div className="jp-GpuPanel-itemMain">
              <span className="jp-GpuPanel-where">{whereLabel(p.notebook, p.cell, p.id)}</span>
            </div>
            <div className="jp-GpuPanel-sub">
              {p.what} · off the GPU for {p.since} · back with your next <code>%%gpu</code> cell there
            </div>
            {p.reason ? <div className="jp-GpuPanel-sub jp-GpuPanel-parkedReason">{p.reason}</div> : null}
            {p.lost.length ? (
              <div className="jp-GpuPanel-sub jp-GpuPanel-parkedLost">
                not kept (cannot be pickled): {p.lost.join(', ')}
              </div>
            ) : null}
          </li>
        ))}
      </ul>
    </>
  );
}
