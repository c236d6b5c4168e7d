/** The Scale dialog (manual worker count or adaptive bounds, as in dask-labextension). */
import { Dialog, ReactWidget, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import * as React from 'react';

import { scalePool } from '../api';
import { scaleRequest } from '../validate';

/** The dialog's body; its value is the request body, or what is wrong with the fields. */
class ScaleForm extends ReactWidget {
  constructor(current: number) {
    super();
    this._n = String(current);
    this._min = String(Math.min(1, current));
    this._max = String(Math.max(1, current));
    this.addClass('jp-GpuPanel-scaleForm');
  }

  getValue(): ReturnType<typeof scaleRequest> {
    return scaleRequest(this._mode, { n: this._n, minimum: this._min, maximum: this._max });
  }

  protected render(): JSX.Element {
    const set = (f: () => void) => () => {
      f();
      this.update();
    };
    return (
      <div>
        <label>
          <input
            type="radio"
            name="jp-gpu-scale-mode"
            checked={this._mode === 'manual'}
            onChange={set(() => (this._mode = 'manual'))}
          />
          Manual scaling
        </label>
        <div className="jp-GpuPanel-scaleRow">
          Workers
          <input
            className="jp-mod-styled"
            type="number"
            min={0}
            name="n"
            disabled={this._mode !== 'manual'}
            defaultValue={this._n}
            onChange={e => (this._n = e.target.value)}
          />
        </div>
        <label>
          <input
            type="radio"
            name="jp-gpu-scale-mode"
            checked={this._mode === 'adaptive'}
            onChange={set(() => (this._mode = 'adaptive'))}
          />
          Adaptive scaling
        </label>
        <div className="jp-GpuPanel-scaleRow">
          Minimum
          <input
            className="jp-mod-styled"
            type="number"
            min={0}
            name="minimum"
            disabled={this._mode !== 'adaptive'}
            defaultValue={this._min}
            onChange={e => (this._min = e.target.value)}
          />
          Maximum
          <input
            className="jp-mod-styled"
            type="number"
            min={0}
            name="maximum"
            disabled={this._mode !== 'adaptive'}
            defaultValue={this._max}
            onChange={e => (this._max = e.target.value)}
          />
        </div>
      </div>
    );
  }

  private _mode: 'manual' | 'adaptive' = 'manual';
  private _n: string;
  private _min: string;
  private _max: string;
}

/** Ask for a new size and send it; true when the pool was scaled, false when cancelled or refused. */
export async function openScaleDialog(current: number): Promise<boolean> {
  const result = await showDialog({
    title: 'Scale the GPU pool',
    body: new ScaleForm(current),
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Scale' })]
  });
  if (!result.button.accept || !result.value) {
    return false;
  }
  const value = result.value;
  if ('error' in value) {
    await showErrorMessage('Scale the GPU pool', value.error);
    return false;
  }
  try {
    await scalePool(value.body);
  } catch (error) {
    await showErrorMessage('Scale the GPU pool', String((error as Error).message ?? error));
    return false;
  }
  return true;
}
