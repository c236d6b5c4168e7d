/** The status bar item: my GPU share and whether I wait in the queue; a click opens the panel. */
import { ReactWidget } from '@jupyterlab/apputils';
import { UseSignal } from '@jupyterlab/ui-components';
import * as React from 'react';

import { SnapshotFeed } from './client';
import { gpuIcon } from './icon';
import { statusText } from './views/status';
import { buildViewModel } from './views/viewmodel';
import { ISnapshot } from './wire';

export class GpuStatus extends ReactWidget {
  constructor(
    private _feed: SnapshotFeed,
    private _onClick: () => void
  ) {
    super();
    this.addClass('jp-GpuStatus');
  }

  protected render(): JSX.Element {
    return (
      <UseSignal signal={this._feed.changed} initialArgs={this._feed.latest ?? undefined}>
        {(_, snapshot?: ISnapshot) => {
          const vm = buildViewModel(snapshot ?? null, Date.now() / 1000);
          return (
            <span
              className={`jp-GpuStatus-item${vm.myQueued ? ' jp-mod-queued' : ''}`}
              title="jupyter-gpu: my share of the pool (GPU-equivalents) and my queued requests"
              onClick={this._onClick}
            >
              <gpuIcon.react tag="span" className="jp-GpuStatus-icon" />
              <span className="jp-GpuStatus-text">{statusText(vm)}</span>
            </span>
          );
        }}
      </UseSignal>
    );
  }
}
