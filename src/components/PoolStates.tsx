/** What the panel shows instead of the pool while there is none to show: connecting, no pool, no answer. */
import * as React from 'react';

import { formatShare } from '../format';

export function Connecting(): JSX.Element {
  return <div className="jp-GpuPanel-state jp-GpuPanel-loading">Connecting to the pool…</div>;
}

export interface INoPoolProps {
  /** What a ``%%gpu`` cell asks for by default (the settings' default fraction). */
  defaultFraction: number;
  /** The Start button was pressed and the pool is starting. */
  starting: boolean;
  /** Another action is under way. */
  busy: boolean;
  onStart: () => void;
}

/** No pool runs for this server: offer to start the embedded one, and say how to join a shared one. */
export function NoPool(props: INoPoolProps): JSX.Element {
  return (
    <div className="jp-GpuPanel-state jp-GpuPanel-noPool">
      <p>No GPU pool is running for this server.</p>
      <p>
        Start the embedded pool on this machine, or set <code>JUPYTER_GPU_SCHEDULER</code> to a shared pool's address
        before starting JupyterLab. A <code>%%gpu</code> cell asks for {formatShare(props.defaultFraction)} GPU by
        default.
      </p>
      <button className="jp-GpuPanel-start jp-mod-styled jp-mod-accept" disabled={props.busy} onClick={props.onStart}>
        {props.starting ? 'Starting…' : 'Start pool'}
      </button>
    </div>
  );
}

/** The pool's address is known but it does not answer; the feed keeps retrying. */
export function Unreachable(props: { address: string | null; error: string | null }): JSX.Element {
  return (
    <div className="jp-GpuPanel-state jp-GpuPanel-unreachable">
      <p>The GPU pool{props.address ? <code> {props.address}</code> : null} does not answer.</p>
      <pre className="jp-GpuPanel-error">{props.error}</pre>
      <p>It may be starting or have stopped; the panel keeps retrying.</p>
    </div>
  );
}
