import * as React from 'react';

import { IQuotaView, ITeamQuotaView, myQuotaText } from '../views/quotas';
import { PREEMPTIBLE_HELP } from './help';

/** A team's bar: held within its guarantee, the borrowed rest, and a tick at the guarantee. */
function QuotaBar(props: { row: ITeamQuotaView }): JSX.Element {
  const { row } = props;
  const pct = (share: number) => `${(share * 100).toFixed(2)}%`;
  return (
    <div className="jp-GpuPanel-quotaBar" role="img" aria-label={`${row.team}: ${row.text}`} title={row.text}>
      <div className="jp-GpuPanel-quotaHeld" style={{ width: pct(row.withinShare) }} />
      {row.overShare > 0 ? (
        <div className="jp-GpuPanel-quotaOver" style={{ width: pct(row.overShare) }} title={PREEMPTIBLE_HELP} />
      ) : null}
      {/* the bar ends at the limit, else at the guarantee: a tick marks the guarantee only inside the bar */}
      {row.guarantee > 0 && row.guaranteeAt < 1 ? (
        <div className="jp-GpuPanel-quotaTick" style={{ left: pct(row.guaranteeAt) }} title="guarantee" />
      ) : null}
    </div>
  );
}

/** Teams' guarantees, what each holds and whether it borrows; my team first and highlighted. */
export function QuotaSection(props: { quotas: IQuotaView; me: string }): JSX.Element {
  const { quotas } = props;
  return (
    <section className="jp-GpuPanel-section jp-GpuPanel-quotas">
      <h3>Quotas</h3>
      <ul className="jp-GpuPanel-list">
        {quotas.teams.map(t => (
          <li
            key={t.team}
            className={`jp-GpuPanel-quotaRow${t.mine ? ' jp-mod-mine' : ''}`}
            data-team={t.team}
            title={t.members.length ? `members: ${t.members.join(', ')}` : undefined}
          >
            <div className="jp-GpuPanel-itemMain">
              <span className="jp-GpuPanel-team">{t.team}</span>
              <span className="jp-GpuPanel-quotaText">{t.text}</span>
            </div>
            <QuotaBar row={t} />
            {t.over ? (
              <div className="jp-GpuPanel-quotaHint" title={PREEMPTIBLE_HELP}>
                over guarantee: preemptible
              </div>
            ) : null}
          </li>
        ))}
      </ul>
      <div className="jp-GpuPanel-sub jp-GpuPanel-myQuota">
        {props.me}
        {quotas.myTeam ? ` (team ${quotas.myTeam})` : ''}: {myQuotaText(quotas)}
      </div>
    </section>
  );
}
