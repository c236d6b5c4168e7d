import * as React from 'react';

import { formatShare } from '../format';
import { gpuIcon } from '../icon';
import { IViewModel } from '../views/viewmodel';

export interface IPanelHeaderProps {
  vm: IViewModel;
  /** Snapshots arrive over the websocket (else by polling). */
  live: boolean;
  /** Another action is under way. */
  busy: boolean;
  onScale: () => void;
}

/** The title row (live dot, Scale button for users the pool lets scale) and the pool's one-line summary. */
export function PanelHeader(props: IPanelHeaderProps): JSX.Element {
  const { vm } = props;
  return (
    <div className="jp-GpuPanel-header">
      <div className="jp-GpuPanel-headerRow">
        <gpuIcon.react tag="span" className="jp-GpuPanel-headerIcon" />
        <span className="jp-GpuPanel-title">GPU pool</span>
        <span
          className={`jp-GpuPanel-live${props.live ? ' jp-mod-live' : ''}`}
          title={props.live ? 'live (websocket)' : 'polling'}
        />
        {vm.state === 'ok' && vm.scalable ? (
          <button
            className="jp-GpuPanel-scale jp-mod-styled jp-mod-accept"
            disabled={props.busy}
            onClick={props.onScale}
          >
            Scale
          </button>
        ) : null}
      </div>
      {vm.state === 'ok' ? (
        <div className="jp-GpuPanel-summary" title={vm.address ?? ''}>
          {vm.workers} worker{vm.workers === 1 ? '' : 's'} · {formatShare(vm.poolLeased)} of {vm.poolTotal} GPU
          {vm.poolTotal === 1 ? '' : 's'} leased{vm.embedded ? ' · embedded' : ''}
        </div>
      ) : null}
    </div>
  );
}
