import * as React from 'react';

import { notebookLabel } from '../format';
import { IQueueView } from '../views/queue';
import { CancelButton } from './CancelButton';

export interface IQueueListProps {
  queue: IQueueView[];
  /** The pool has no quota file: say what orders the queue instead. */
  noQuotas: boolean;
  /** Another action is under way. */
  busy: boolean;
  onCancel: (id: string) => void;
}

/** The Queue section: waiting requests by position, each with the broker's reason; mine can be cancelled. */
export function QueueList(props: IQueueListProps): JSX.Element {
  const { queue } = props;
  return (
    <section className="jp-GpuPanel-section jp-GpuPanel-queue">
      <h3>Queue ({queue.length})</h3>
      {props.noQuotas ? (
        <div className="jp-GpuPanel-sub jp-GpuPanel-noQuotas">
          No quotas: the queue is ordered by fair share of recent use.
        </div>
      ) : null}
      {queue.length ? (
        <ol className="jp-GpuPanel-list">
          {queue.map(q => (
            <li key={q.id} className={`jp-GpuPanel-item${q.mine ? ' jp-mod-mine' : ''}`} data-request-id={q.id}>
              <div className="jp-GpuPanel-itemMain">
                <span className="jp-GpuPanel-position">#{q.position}</span>
                <span className="jp-GpuPanel-user">{q.user}</span>
                <span className="jp-GpuPanel-request">{q.request}</span>
                {q.mine ? (
                  <CancelButton
                    title={`cancel request ${q.id}`}
                    disabled={props.busy}
                    onClick={() => props.onCancel(q.id)}
                  />
                ) : null}
              </div>
              <div className="jp-GpuPanel-reason">{q.reason}</div>
              <div className="jp-GpuPanel-sub">
                waiting {q.waited} · eta {q.eta}
                {q.etaNote ? <span className="jp-GpuPanel-etaNote"> ({q.etaNote})</span> : null}
                {q.notebook ? ` · ${notebookLabel(q.notebook)}` : ''}
              </div>
            </li>
          ))}
        </ol>
      ) : (
        <div className="jp-GpuPanel-empty">Nobody is waiting.</div>
      )}
    </section>
  );
}
