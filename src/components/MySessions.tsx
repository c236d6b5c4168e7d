import * as React from 'react';

import { IParkedView } from '../views/parked';
import { ParkedList } from './ParkedList';
import { ISessionListProps, SessionList } from './SessionList';

export interface IMySessionsProps extends ISessionListProps {
  inHostMemory: IParkedView[];
  /** The pool's administrator: ``sessions`` are every user's. */
  admin?: boolean;
}

/** The "My sessions" section: my sessions on GPUs, then those waiting in host memory (an admin: everyone's). */
export function MySessions(props: IMySessionsProps): JSX.Element {
  return (
    <section className="jp-GpuPanel-section jp-GpuPanel-mine" data-admin={props.admin ? 'true' : undefined}>
      <h3>
        {props.admin ? 'Sessions of every user' : 'My sessions'} ({props.sessions.length})
      </h3>
      <SessionList sessions={props.sessions} goToCell={props.goToCell} busy={props.busy} onCancel={props.onCancel} />
      <ParkedList parked={props.inHostMemory} />
    </section>
  );
}
