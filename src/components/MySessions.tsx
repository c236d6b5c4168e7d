import * as React from 'react';

import { IParkedView } from '../views/parked';
import { ParkedList } from './ParkedList';
import { ISessionListProps, SessionList } from './SessionList';

export interface IMySessionsProps extends ISessionListProps {
  inHostMemory: IParkedView[];
}

/** The "My sessions" section: my sessions on GPUs, then those waiting in host memory. */
export function MySessions(props: IMySessionsProps): JSX.Element {
  return (
    <section className="jp-GpuPanel-section jp-GpuPanel-mine">
      <h3>My sessions ({props.sessions.length})</h3>
      <SessionList sessions={props.sessions} goToCell={props.goToCell} busy={props.busy} onCancel={props.onCancel} />
      <ParkedList parked={props.inHostMemory} />
    </section>
  );
}
