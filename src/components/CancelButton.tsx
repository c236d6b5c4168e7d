import * as React from 'react';

export interface ICancelButtonProps {
  /** What it ends, for the tooltip: ``end session L3``, ``cancel request R9``. */
  title: string;
  /** Another action is under way: one at a time, so its outcome is the one the panel reports. */
  disabled: boolean;
  onClick: () => void;
}

/** The Cancel button of one of my sessions or queued requests. */
export function CancelButton(props: ICancelButtonProps): JSX.Element {
  return (
    <button
      className="jp-GpuPanel-cancel jp-mod-styled jp-mod-reject"
      disabled={props.disabled}
      title={props.title}
      onClick={props.onClick}
    >
      Cancel
    </button>
  );
}
