import * as React from 'react';

import { whereLabel } from '../format';
import { ISessionView } from '../views/sessions';
import { CancelButton } from './CancelButton';
import { RIGHT_SIZE_HELP } from './help';
import { PreemptibleBadge } from './PreemptibleBadge';

export interface ISessionListProps {
  sessions: ISessionView[];
  /** Open the session's notebook at its cell; absent without a document manager (no link is drawn). */
  goToCell?: (notebook: string, cell: string | null) => Promise<void>;
  /** Another action is under way. */
  busy: boolean;
  onCancel: (id: string) => void;
}

/** Where a session runs: a link to its cell when the panel can open it, else its notebook's name. */
function SessionWhere(props: { session: ISessionView; goToCell?: ISessionListProps['goToCell'] }): JSX.Element {
  const { session: s, goToCell } = props;
  return (
    <span className="jp-GpuPanel-where">
      {s.notebook && goToCell ? (
        <a
          href="#"
          className="jp-GpuPanel-goto"
          title="go to cell"
          onClick={e => {
            e.preventDefault();
            void goToCell(s.notebook!, s.cell);
          }}
        >
          {s.notebook}
          {s.cell ? ` › ${s.cell}` : ''}
        </a>
      ) : (
        whereLabel(s.notebook, s.cell, s.id)
      )}
    </span>
  );
}

/** My sessions on GPUs: where each runs, its state, usage and right-sizing hint, and its Cancel button. */
export function SessionList(props: ISessionListProps): JSX.Element {
  if (!props.sessions.length) {
    return (
      <div className="jp-GpuPanel-empty">
        None. Start one with <code>%%gpu</code> in a notebook cell.
      </div>
    );
  }
  return (
    <ul className="jp-GpuPanel-list">
      {props.sessions.map(s => (
        <li
          key={s.id}
          className={`jp-GpuPanel-item${s.mine ? ' jp-mod-mine' : ''}`}
          data-lease-id={s.id}
          data-user={s.user}
        >
          <div className="jp-GpuPanel-itemMain">
            {s.mine ? null : <span className="jp-GpuPanel-owner">{s.user}</span>}
            <SessionWhere session={s} goToCell={props.goToCell} />
            <CancelButton title={`end session ${s.id}`} disabled={props.busy} onClick={() => props.onCancel(s.id)} />
          </div>
          <div className="jp-GpuPanel-sub">
            {s.state} · GPU {s.gpus.join(', ')} · {s.elapsed} · isolation {s.isolation}
            {s.preemptible ? (
              <>
                {' '}
                · <PreemptibleBadge />
              </>
            ) : null}
          </div>
          <div className="jp-GpuPanel-sub jp-GpuPanel-usage">{s.usage}</div>
          {s.rightSize ? (
            <div className="jp-GpuPanel-rightSize" title={RIGHT_SIZE_HELP}>
              {s.rightSize}
            </div>
          ) : null}
        </li>
      ))}
    </ul>
  );
}
